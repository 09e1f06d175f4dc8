"""The tensor transports' copy path: validate by metadata, then copy with little Python per tensor.

Trainers send the same names every step, so the name -> slot matching (aliases, duplicates, unknown
names) is done once per names tuple by `check_tensor_metas` and cached; a later call with those names
only compares each tensor's shape and dtype class with its slot (a mismatch re-runs the full check, which
names the problem). The copies then go out as plain `copy_` for large tensors (a cudaMemcpyAsync each)
and one grouped `_foreach_copy_` launch for the small ones (norms, biases), all on the current stream,
with no host synchronisation: the caller synchronises once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch

from hotswap.errors import CheckpointError
from hotswap.weights.loader import TensorMeta, check_tensor_metas
from hotswap.weights.mapping import WeightMap, WeightSlot

SMALL_COPY_BYTES = 16 << 20  # tensors under this go out in one grouped launch
COPY_STREAMS = 2  # CUDA streams the large copies are spread over


@dataclass(frozen=True, slots=True)
class _Target:
    slot: WeightSlot
    dest: torch.Tensor
    shape: torch.Size  # the HF shape the incoming tensor must have
    dtype: torch.dtype
    full: bool  # the slot takes the whole HF tensor (no TP slice)
    nbytes: int


class TensorPlanCache:
    """names tuple -> per-tensor targets (None for entries that are skipped: ignored suffixes, a tied
    alias given beside its embedding). Invalidated when the weight map is rebuilt (memory resume)."""

    def __init__(self, max_entries: int = 16):
        self.max_entries = max_entries
        self.weight_map: weakref.ref | None = None  # weak: a rebuilt map drops the old one, and our plans with it
        self.plans: OrderedDict[tuple[str, ...], list[_Target | None]] = OrderedDict()

    def _dropped(self, _ref) -> None:
        self.plans.clear()  # the plans' views would otherwise keep released parameter storage alive

    def match(self, weight_map: WeightMap, named: list[tuple[str, torch.Tensor]]) -> list[tuple[str, _Target, torch.Tensor]]:
        """(incoming name, target, tensor) for every tensor to load; raises CheckpointError (a
        HotswapError) naming every problem when the set does not fit the model."""
        if self.weight_map is None or self.weight_map() is not weight_map:
            self.plans.clear()
            self.weight_map = weakref.ref(weight_map, self._dropped)
        names = tuple(n for n, _ in named)
        plan = self.plans.get(names)
        if plan is not None:
            out = []
            for (name, t), target in zip(named, plan):
                if target is None:
                    continue
                if t.shape != target.shape or not t.dtype.is_floating_point:
                    break
                out.append((name, target, t))
            else:
                return out
        metas = [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in named]
        pairs = check_tensor_metas(weight_map, metas, require_all=False)
        slot_of = {id(meta): slot for meta, slot in pairs}
        plan = []
        for meta in metas:
            slot = slot_of.get(id(meta))
            plan.append(None if slot is None else _Target(slot, slot.dest, torch.Size(slot.hf_shape), slot.dtype, slot.is_full,
                                                          slot.dest.numel() * slot.dest.element_size()))
        self.plans[names] = plan
        while len(self.plans) > self.max_entries:
            self.plans.popitem(last=False)
        return [(name, target, t) for (name, t), target in zip(named, plan) if target is not None]


def check_finite(items: list[tuple[str, _Target, torch.Tensor]]) -> None:
    """Refuse NaN or Inf in what each slot takes: under tensor parallelism, this rank's slice only (the
    other ranks check theirs, and the update fails on all of them if any finds one)."""
    for name, target, src in items:
        if not bool(torch.isfinite(target.slot.spec.src_view(src)).all()):
            where = "" if target.full else " (in this rank's tensor-parallel slice)"
            raise CheckpointError(f"tensor {name!r} holds NaN or Inf values{where}")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


def copy_into(items: list[tuple[str, _Target, torch.Tensor]], small_bytes: int | None = None, streams: int | None = None) -> int:
    """Copy each tensor into its slot, asynchronously with respect to the host; returns bytes written.

    Tensors under `small_bytes` go out in one grouped `_foreach_copy_` launch; larger ones as one `copy_`
    each. On CUDA the large copies are spread over `streams` streams (the current one and side streams that
    wait for it first and that it waits for at the end), so one copy's ramp-down overlaps the next one's
    ramp-up; callers see the usual semantics: everything is ordered on the current stream."""
    small = SMALL_COPY_BYTES if small_bytes is None else small_bytes
    nstreams = COPY_STREAMS if streams is None else streams
    group_dst, group_src = [], []
    large: list[tuple[_Target, torch.Tensor]] = []
    nbytes = 0
    for _, target, src in items:
        nbytes += target.nbytes
        if target.full and target.nbytes < small and src.dtype is target.dtype:
            group_dst.append(target.dest)
            group_src.append(src)
        else:
            large.append((target, src))
    side = None
    if nstreams > 1 and large and large[0][0].dest.is_cuda:
        device = large[0][0].dest.device
        current = torch.cuda.current_stream(device)
        side = _side_stream(device)
        side.wait_stream(current)
    if group_dst:
        torch._foreach_copy_(group_dst, group_src, non_blocking=True)
    if side is None:
        for target, src in large:
            _copy_one(target, src)
    else:
        loads = [0, 0]  # bytes queued on the current stream, on the side stream
        for target, src in large:
            k = 0 if loads[0] <= loads[1] else 1
            loads[k] += target.nbytes
            if k:
                with torch.cuda.stream(side):
                    _copy_one(target, src)
            else:
                _copy_one(target, src)
        current.wait_stream(side)
    return nbytes


def _copy_one(target: _Target, src: torch.Tensor) -> None:
    if target.full:
        target.dest.copy_(src, non_blocking=True)
    else:
        target.slot.load(src)
