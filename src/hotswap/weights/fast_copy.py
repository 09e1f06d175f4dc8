"""The tensor transports' copy path: validate by metadata, then copy with little Python per tensor.

Trainers send the same names every step, so the name -> slot matching (aliases, duplicates, unknown
names) is done once per names tuple by `check_tensor_metas` and cached as a `TensorPlan`; a later call with
those names compares the tensors' shapes with the plan's in one list comparison and their dtypes as a set
(a mismatch re-runs the full check, which names the problem).

On CUDA the copies of whole, same-dtype, 16-byte-aligned tensors then go out as one launch of a Triton
kernel that walks a table of (source, destination, size) rows (`_multi_copy_kernel`): the table's
destination half is built once per plan, and a call only uploads its sources' addresses. A few hundred
1-12 MB copies launched one by one leave the copy engine idle between launches (a 0.6B model's 310 tensors
reached 68 % of the device-to-device ceiling that way). Everything else (tensor-parallel slices, dtype
casts, strided or misaligned sources, CPU engines) goes out as plain `copy_` for large tensors and one
grouped `_foreach_copy_` for small ones. All on the current stream, with no host synchronisation: the
caller synchronises once.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass, field
from operator import attrgetter

import torch

from hotswap.errors import CheckpointError, shown
from hotswap.weights.loader import TensorMeta, check_tensor_metas
from hotswap.weights.mapping import WeightMap, WeightSlot
from hotswap.wire.buckets import BUCKET_CALLS_REMEMBERED

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines copy with copy_
    triton = None

SMALL_COPY_BYTES = 16 << 20  # tensors under this go out in one grouped launch
COPY_STREAMS = 2  # CUDA streams the large copies are spread over
_ALIGN = 16  # bytes: the one-launch copy moves 16-byte vectors
_CHUNK = 8192  # int32 words (32 KiB) a program of the one-launch copy moves
_WARPS = 8


@dataclass(frozen=True, slots=True)
class _Target:
    slot: WeightSlot
    dest: torch.Tensor
    shape: torch.Size  # the HF shape the incoming tensor must have
    dtype: torch.dtype
    full: bool  # the slot takes the whole HF tensor (no TP slice)
    nbytes: int


@dataclass(slots=True)
class _MultiCopy:
    """Device tables of the one-launch copy for a plan's eligible targets (rows in item order)."""

    rows: list[int]  # indices into the matched items
    rest: list[int]  # the items it leaves to the per-tensor path
    base: torch.Tensor  # int32 view of the first destination: the kernel addresses everything from it
    dst_offsets: torch.Tensor  # int64 [n], in int32 words from base
    sizes: torch.Tensor  # int64 [n], in int32 words
    owner: torch.Tensor  # int32 [programs]: the row each program copies a chunk of
    first: torch.Tensor  # int32 [n]: each row's first program
    dtype: torch.dtype
    device_index: int
    nbytes: int
    last_ptrs: list[int] = field(default_factory=list)  # the previous call's sources, and their device copy
    last_ptrs_dev: torch.Tensor | None = None
    checked: weakref.ref | None = None  # the trusted MatchedTensors those pointers were checked for (weak: never pins a source)


@dataclass(slots=True)
class TensorPlan:
    targets: list[_Target | None]  # per incoming entry; None where it is skipped (ignored suffix, tied alias)
    shapes: list[torch.Size]  # the incoming shapes this plan was checked with
    dtypes: frozenset  # the incoming dtypes it was checked with (all floating point)
    kept: list[int] | None  # entries with a target, or None when every entry has one
    multi: _MultiCopy | None  # the one-launch tables for its targets (None: none qualify, or not CUDA)


@dataclass(slots=True, weakref_slot=True)
class MatchedTensors:
    """What `TensorPlanCache.match` returns: (incoming name, target, tensor) per tensor to load, and the plan."""

    items: list[tuple[str, _Target, torch.Tensor]]
    tensors: tuple[torch.Tensor, ...]  # the items' tensors, in order
    plan: TensorPlan
    names: tuple[str, ...]  # the incoming names (the plan's key)
    trusted: bool = False  # engine-held views whose metadata cannot change (see TensorPlanCache.match)


class TensorPlanCache:
    """names tuple -> per-tensor targets (None for entries that are skipped: ignored suffixes, a tied
    alias given beside its embedding). Invalidated when the weight map is rebuilt (memory resume)."""

    def __init__(self, max_entries: int = BUCKET_CALLS_REMEMBERED):  # one name set per bucket call of a push
        self.max_entries = max_entries
        self.weight_map: weakref.ref | None = None  # weak: a rebuilt map drops the old one, and our plans with it
        self.plans: OrderedDict[tuple[str, ...], list[_Target | None]] = OrderedDict()

    def _dropped(self, _ref) -> None:
        self.plans.clear()  # the plans' views would otherwise keep released parameter storage alive

    def match(self, weight_map: WeightMap, named: list[tuple[str, torch.Tensor]], trusted: bool = False) -> MatchedTensors:
        """The tensors to load and their targets; raises CheckpointError (a HotswapError) naming every
        problem when the set does not fit the model.

        `trusted`: `named` is a list only the engine holds, whose tensors' metadata cannot change (the
        views `CudaIpcMappings` keeps for remembered descriptors). The result may then be used again for
        the same list while `current` says so, and the copy checks its sources once (`_MultiCopy.checked`)."""
        if self.weight_map is None or self.weight_map() is not weight_map:
            self.plans.clear()
            self.weight_map = weakref.ref(weight_map, self._dropped)
        names, tensors = zip(*named) if named else ((), ())
        _check_dense(names, tensors)
        plan = self.plans.get(names)
        if plan is None or list(map(_SHAPE, tensors)) != plan.shapes or not set(map(_DTYPE, tensors)) <= plan.dtypes:
            plan = self._plan(weight_map, named, names, tensors)
        return _matched(plan, names, tensors, trusted)

    def current(self, matched: object, weight_map: WeightMap) -> bool:
        """Whether a trusted result of `match` still stands: same weight map, and its plan still cached."""
        return (isinstance(matched, MatchedTensors) and matched.trusted and self.weight_map is not None
                and self.weight_map() is weight_map and self.plans.get(matched.names) is matched.plan)

    def _plan(self, weight_map: WeightMap, named: list[tuple[str, torch.Tensor]], names: tuple[str, ...],
              tensors: tuple[torch.Tensor, ...]) -> TensorPlan:
        """Check the set in full (naming every problem) and cache its plan under its names."""
        metas = [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in named]
        pairs = check_tensor_metas(weight_map, metas, require_all=False)
        slot_of = {id(meta): slot for meta, slot in pairs}
        targets = []
        for meta in metas:
            slot = slot_of.get(id(meta))
            targets.append(None if slot is None else _Target(slot, slot.dest, torch.Size(slot.hf_shape), slot.dtype, slot.is_full,
                                                             slot.dest.numel() * slot.dest.element_size()))
        kept = None if all(t is not None for t in targets) else [i for i, t in enumerate(targets) if t is not None]
        plan = TensorPlan(targets, list(map(_SHAPE, tensors)), frozenset(map(_DTYPE, tensors)), kept,
                          build_multi([t for t in targets if t is not None]))
        self.plans[names] = plan
        while len(self.plans) > self.max_entries:
            self.plans.popitem(last=False)
        return plan


_SHAPE = attrgetter("shape")
_DTYPE = attrgetter("dtype")
_LAYOUT = attrgetter("layout")
_NESTED = attrgetter("is_nested")
_META = attrgetter("is_meta")


def _check_dense(names: tuple[str, ...], tensors: tuple[torch.Tensor, ...]) -> None:
    """Refuse what `copy_` would fail on after earlier tensors of the call were copied (sparse, nested or
    meta tensors): checked in bulk on every call, since a cached plan knows only shapes and dtypes."""
    if set(map(_LAYOUT, tensors)) <= {torch.strided} and not any(map(_NESTED, tensors)) and not any(map(_META, tensors)):
        return
    bad = [(n, t) for n, t in zip(names, tensors) if t.layout != torch.strided or t.is_nested or t.is_meta]
    name, t = bad[0]
    kind = "a nested tensor" if t.is_nested else "a meta tensor (no data)" if t.is_meta else f"a {t.layout} tensor"
    raise CheckpointError(f"tensor {shown(name)} is {kind}; send dense tensors" + (f" ({len(bad) - 1} more like it)" if len(bad) > 1 else ""))


def _matched(plan: TensorPlan, names: tuple[str, ...], tensors: tuple[torch.Tensor, ...], trusted: bool) -> MatchedTensors:
    if plan.kept is None:
        return MatchedTensors(list(zip(names, plan.targets, tensors)), tensors, plan, names, trusted)
    kept = [tensors[i] for i in plan.kept]
    return MatchedTensors([(names[i], plan.targets[i], t) for i, t in zip(plan.kept, kept)], tuple(kept), plan, names, trusted)


def check_finite(items: list[tuple[str, _Target, torch.Tensor]]) -> None:
    """Refuse NaN or Inf in what each slot takes: under tensor parallelism, this rank's slice only (the
    other ranks check theirs, and the update fails on all of them if any finds one)."""
    for name, target, src in items:
        if not bool(torch.isfinite(target.slot.spec.src_view(src)).all()):
            where = "" if target.full else " (in this rank's tensor-parallel slice)"
            raise CheckpointError(f"tensor {shown(name)} holds NaN or Inf values{where}")


_SIDE_STREAMS: dict[torch.device, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    stream = _SIDE_STREAMS.get(device)
    if stream is None:
        stream = _SIDE_STREAMS[device] = torch.cuda.Stream(device=device)
    return stream


if triton is not None:

    @triton.jit
    def _multi_copy_kernel(BASE, SRC_PTRS, DST_OFFSETS, SIZES, OWNER, FIRST, base_addr, CHUNK: tl.constexpr):
        """Program p copies chunk p - FIRST[r] of row r = OWNER[p]: SIZES[r] int32 words from the address
        SRC_PTRS[r] to BASE + DST_OFFSETS[r]. Everything is 16-byte aligned (checked by the caller), so
        the loads and stores are 16-byte vectors."""
        pid = tl.program_id(0)
        row = tl.load(OWNER + pid)
        n = tl.multiple_of(tl.load(SIZES + row), 4)
        src = tl.multiple_of((tl.load(SRC_PTRS + row) - base_addr) // 4, 4)
        dst = tl.multiple_of(tl.load(DST_OFFSETS + row), 4)
        offs = (pid - tl.load(FIRST + row)).to(tl.int64) * CHUNK + tl.arange(0, CHUNK)
        mask = offs < n
        tl.store(BASE + dst + offs, tl.load(BASE + src + offs, mask=mask), mask=mask)


def _qualifies(target: _Target, dtype: torch.dtype) -> bool:
    """Whether the one-launch copy can write this target: the whole tensor, contiguous, 16-byte aligned."""
    return (target.full and target.dtype is dtype and target.dest.is_contiguous() and target.dest.data_ptr() % _ALIGN == 0
            and target.nbytes % _ALIGN == 0)


def build_multi(targets: list[_Target]) -> _MultiCopy | None:
    """The one-launch tables for the targets that qualify (in the dtype of the first), or None when fewer
    than two do or this is not a CUDA engine with Triton."""
    if triton is None or not targets or not targets[0].dest.is_cuda:
        return None
    rows = [i for i, t in enumerate(targets) if _qualifies(t, targets[0].dtype)]
    if len(rows) < 2:
        return None
    dests = [targets[i].dest for i in rows]
    base = dests[0].view(-1).view(torch.int32)
    base_addr = base.data_ptr()
    sizes = [d.numel() * d.element_size() // 4 for d in dests]
    owner, first = chunk_tables(sizes)
    device = base.device

    def dev(values: list[int], dt: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dt).to(device)

    done = set(rows)
    return _MultiCopy(rows=rows, rest=[i for i in range(len(targets)) if i not in done], base=base,
                      dst_offsets=dev([(d.data_ptr() - base_addr) // 4 for d in dests], torch.int64),
                      sizes=dev(sizes, torch.int64), owner=owner.to(device), first=first.to(device),
                      dtype=targets[0].dtype, device_index=device.index, nbytes=sum(sizes) * 4)


def chunk_tables(sizes: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The one-launch copy's program tables for rows of `sizes` int32 words: `owner[p]`, the row program p copies
    a chunk of (every row has at least one program), and `first[r]`, row r's first program; both int32. Built with
    tensor ops: a 617 MB bucket is ~19K programs, and a Python list of them made into a tensor took about a
    millisecond a plan (61 GB of MoE weights: ~1.9M programs a push)."""
    counts = torch.tensor([max(1, -(-n // _CHUNK)) for n in sizes], dtype=torch.int64)
    owner = torch.repeat_interleave(torch.arange(len(sizes), dtype=torch.int32), counts)
    first = (torch.cumsum(counts, 0) - counts).to(torch.int32)
    return owner, first


def _copy_multi(multi: _MultiCopy, matched: MatchedTensors) -> bool:
    """Launch the one-launch copy for the plan's rows when every source qualifies (same dtype as its
    target, contiguous, on this device, 16-byte aligned); False (nothing launched) otherwise. A trusted
    MatchedTensors whose sources were checked before (a repeated IPC call) is not checked again."""
    tensors = matched.tensors
    if multi.checked is None or multi.checked() is not matched:
        srcs = [tensors[i] for i in multi.rows] if len(multi.rows) != len(tensors) else tensors
        # match() has checked the dtypes against the plan's: a plan of one dtype needs no second look
        if ((matched.plan.dtypes != {multi.dtype} and set(map(_DTYPE, srcs)) != {multi.dtype})
                or not all(map(torch.Tensor.is_contiguous, srcs)) or set(map(torch.Tensor.get_device, srcs)) != {multi.device_index}):
            return False
        ptrs = list(map(torch.Tensor.data_ptr, srcs))
        if ptrs != multi.last_ptrs:
            host = torch.tensor(ptrs, dtype=torch.int64)
            if bool((host % _ALIGN).any()):
                return False
            multi.last_ptrs, multi.last_ptrs_dev = ptrs, host.to(multi.base.device, non_blocking=True)
        multi.checked = weakref.ref(matched) if matched.trusted else None
    _multi_copy_kernel[(multi.owner.numel(),)](multi.base, multi.last_ptrs_dev, multi.dst_offsets, multi.sizes, multi.owner, multi.first,
                                               multi.base.data_ptr(), CHUNK=_CHUNK, num_warps=_WARPS)
    return True


def copy_into(matched: MatchedTensors, small_bytes: int | None = None, streams: int | None = None, one_launch: bool = True) -> int:
    """Copy each tensor into its slot, asynchronously with respect to the host; returns bytes written.

    With `one_launch` (CUDA with Triton), the plan's qualifying tensors go out in one kernel launch. The
    rest: tensors under `small_bytes` in one grouped `_foreach_copy_` launch, larger ones as one `copy_`
    each, spread over `streams` streams (the current one and side streams that wait for it first and that
    it waits for at the end), so one copy's ramp-down overlaps the next one's ramp-up. Callers see the
    usual semantics: everything is ordered on the current stream."""
    items, multi = matched.items, matched.plan.multi
    if one_launch and multi is not None and _copy_multi(multi, matched):
        return multi.nbytes + _copy_each([items[i] for i in multi.rest], small_bytes, streams)
    return _copy_each(items, small_bytes, streams)


def _copy_each(items: list[tuple[str, _Target, torch.Tensor]], small_bytes: int | None, streams: int | None) -> int:
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
    if nstreams > 1 and len(large) > 1 and large[0][0].dest.is_cuda:  # one copy has nothing to overlap with
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
