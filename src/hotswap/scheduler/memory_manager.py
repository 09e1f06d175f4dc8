"""Release and resume device memory by tag (`weights`, `kv_cache`, `cuda_graph`) so a trainer can share
the GPU. Only when idle; while anything is released no batch runs. Under tensor parallelism (`peers`, rank
0) every worker releases and resumes the same tags on its own GPU."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from hotswap import protocol as p
from hotswap.runner.model_runner import ModelRunner
from hotswap.weights.rollback import HostArena

if TYPE_CHECKING:
    from hotswap.runner.tp_peers import TPPeers

TAGS = ("weights", "kv_cache", "cuda_graph")


@dataclass(kw_only=True, slots=True)
class MemoryManager:
    model_runner: ModelRunner
    can_release: Callable[[], bool]
    reset_prefix_cache: Callable[[], object]
    weights_discarded: Callable[[], None] = lambda: None  # released without keeping them: other weights come back
    peers: TPPeers | None = None
    released: set[str] = field(default_factory=set)
    host_weights: dict[str, torch.Tensor] | None = None  # parameter name -> host copy (a view of host_arena) while released
    host_arena: HostArena = field(default_factory=HostArena)  # pinned host for released weights, kept across cycles
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def any_released(self) -> bool:
        return bool(self.released)

    def weights_released(self) -> bool:
        """Weight updates and reads need the weights resident, not the KV cache (SGLang's rule)."""
        return "weights" in self.released

    def _tags(self, tags: list[str] | None) -> list[str] | str:
        if tags is None:
            return list(TAGS)
        if isinstance(tags, str):
            tags = [tags]
        bad = [t for t in tags if t not in TAGS]
        return f"unknown memory tag(s) {bad}; use {list(TAGS)}" if bad else list(dict.fromkeys(tags))

    def release_memory_occupation(self, req: p.ReleaseMemoryOccupationRequest) -> p.ControlOutput:
        tags = self._tags(req.tags)
        if isinstance(tags, str):
            return p.ControlOutput(success=False, message=tags)
        if not self.can_release():
            return p.ControlOutput(success=False, message="release_memory_occupation refused: requests are running or a weight-update "
                                                          "session holds uncommitted updates")
        already = [t for t in tags if t in self.released]
        if already:
            return p.ControlOutput(success=False, message=f"already released: {already}")
        if self.peers is not None:
            self.peers.release(tags, req.keep_weights_on_host)
        runner = self.model_runner
        graphs = runner.cuda_graphs
        # graphs point at weights and KV storage: they go whenever either goes
        if graphs is not None and ("cuda_graph" in tags or "weights" in tags or "kv_cache" in tags):
            graphs.release()
        if "kv_cache" in tags:
            self.reset_prefix_cache()
            runner.pool.free_storage()
        if "weights" in tags:
            self._release_weights(keep_on_host=req.keep_weights_on_host)
            if not req.keep_weights_on_host:
                self.weights_discarded()
        self.released.update(tags)
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        return self._agreed(f"released {tags}")

    def resume_memory_occupation(self, req: p.ResumeMemoryOccupationRequest) -> p.ControlOutput:
        tags = self._tags(req.tags)
        if isinstance(tags, str):
            return p.ControlOutput(success=False, message=tags)
        tags = [t for t in tags if t in self.released] if req.tags is None else tags
        missing = [t for t in tags if t not in self.released]
        if missing:
            return p.ControlOutput(success=False, message=f"resume refused: {missing} not released")
        if not tags:
            return p.ControlOutput(success=False, message="resume refused: nothing is released")
        if self.peers is not None:
            self.peers.resume(tags)
        runner = self.model_runner
        if "weights" in tags:
            self._resume_weights()
        if "kv_cache" in tags:
            runner.pool.allocate_storage()
        self.released.difference_update(tags)
        graphs = runner.cuda_graphs
        if graphs is not None and not self.released and not graphs.captured:
            graphs.capture()
        return self._agreed(f"resumed {tags}")

    def _agreed(self, done: str) -> p.ControlOutput:
        failure = self.peers.agree(None) if self.peers is not None else None
        if failure is not None:
            return p.ControlOutput(success=False, message=f"{done} on rank 0, but {failure}")
        return p.ControlOutput(success=True, message=done)

    def _release_weights(self, keep_on_host: bool) -> None:
        """Copy every weight into the pinned host arena (kept across cycles: a pinned allocation per tensor
        cost about 1 s for a 0.6B model), then swap each parameter for a zero-stride stand-in."""
        runner = self.model_runner
        params = list(runner.model.named_parameters())
        self.param_shapes = {name: tuple(param.shape) for name, param in params}
        self.host_weights = None
        if keep_on_host:
            self.host_arena.reset()
            pin = runner.device.type == "cuda"
            self.host_weights = {}
            for name, param in params:
                host = _typed(self.host_arena.take(param.numel() * param.element_size(), pin), param.dtype, param.shape)
                host.copy_(param.data, non_blocking=True)
                self.host_weights[name] = host
            if pin:
                torch.cuda.synchronize(runner.device)
        stand_ins: dict[torch.dtype, torch.Tensor] = {}
        for name, param in params:
            # a one-element stand-in of the same shape: storage is freed, views stay well-formed
            zero = stand_ins.setdefault(param.dtype, torch.zeros((), dtype=param.dtype, device=runner.device))
            param.data = zero.view((1,) * param.dim()).expand(param.shape)
        runner.model.model.rotary.cos_sin = torch.empty(0, device=runner.device)
        runner.rebuild_weight_map()  # the old views would keep the released storage alive

    def _resume_weights(self) -> None:
        """One device allocation for all weights (not one per tensor) and asynchronous copies from the
        pinned arena, then one synchronize."""
        runner = self.model_runner
        params = list(runner.model.named_parameters())
        nbytes = [math.prod(self.param_shapes[name]) * param.element_size() for name, param in params]
        flat = torch.empty(sum(-(-n // _ALIGN) * _ALIGN for n in nbytes), dtype=torch.uint8, device=runner.device)
        offset = 0
        for (name, param), n in zip(params, nbytes):
            data = _typed(flat[offset : offset + n], param.dtype, self.param_shapes[name])
            offset += -(-n // _ALIGN) * _ALIGN  # every dtype view starts aligned
            host = self.host_weights.get(name) if self.host_weights is not None else None
            if host is not None:
                data.copy_(host, non_blocking=True)
            else:
                data.zero_()  # the caller said it will reload weights
            param.data = data
        if runner.device.type == "cuda":
            torch.cuda.synchronize(runner.device)
        runner.model.model.rotary.rebuild(runner.device)
        runner.rebuild_weight_map()
        self.host_weights = None


_ALIGN = 256


def _typed(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 buffer seen as a tensor of `dtype` and `shape`."""
    return buf.view(dtype).view(shape)
