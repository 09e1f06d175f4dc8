"""Free and restore the device memory a ModelRunner holds, by tag (`weights`, `kv_cache`, `cuda_graph`).

The mechanics only: rank 0's MemoryManager (scheduler) decides when and which tags, and every
tensor-parallel worker runs the same on its own GPU. The caller empties the KV cache's page bookkeeping
(the prefix cache) before releasing `kv_cache`, which covers the routed-experts table kept beside the KV."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hotswap.errors import HotswapError
from hotswap.runner.model_runner import ModelRunner
from hotswap.weights.rollback import HostArena

TAGS = ("weights", "kv_cache", "cuda_graph")
_ALIGN = 256


@dataclass(kw_only=True, slots=True)
class DeviceMemory:
    runner: ModelRunner
    released: set[str] = field(default_factory=set)
    host_weights: dict[str, torch.Tensor] | None = None  # parameter name -> host copy (a view of host_arena) while released
    host_arena: HostArena = field(default_factory=HostArena)  # pinned host for released weights, kept across cycles
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def release(self, tags: list[str], keep_weights_on_host: bool) -> None:
        already = [t for t in tags if t in self.released]
        if already:
            raise HotswapError(f"already released: {already}")
        runner = self.runner
        graphs = runner.cuda_graphs
        # graphs point at weights and KV storage (routing table included): they go whenever either goes
        if graphs is not None and ("cuda_graph" in tags or "weights" in tags or "kv_cache" in tags):
            graphs.release()
        if "kv_cache" in tags:
            runner.kv_cache.free_storage()
            if runner.routed_experts is not None:  # its rows describe the KV slots: they go (and come back) together
                runner.routed_experts.free_storage()
        if "weights" in tags:
            self._release_weights(keep_on_host=keep_weights_on_host)
        self.released.update(tags)
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()

    def resume(self, tags: list[str]) -> None:
        missing = [t for t in tags if t not in self.released]
        if missing:
            raise HotswapError(f"resume refused: {missing} not released")
        runner = self.runner
        if "weights" in tags:
            self._resume_weights()
        if "kv_cache" in tags:
            runner.kv_cache.allocate_storage()
            if runner.routed_experts is not None:
                runner.routed_experts.allocate_storage()
        self.released.difference_update(tags)
        graphs = runner.cuda_graphs
        if graphs is not None and not self.released and not graphs.captured:
            graphs.capture()

    def _release_weights(self, keep_on_host: bool) -> None:
        """Copy every weight into the pinned host arena (kept across cycles: a pinned allocation per tensor
        cost about 1 s for a 0.6B model), then swap each parameter for a zero-stride stand-in."""
        runner = self.runner
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
        for _, param in params:
            # a one-element stand-in of the same shape: storage is freed, views stay well-formed
            zero = stand_ins.setdefault(param.dtype, torch.zeros((), dtype=param.dtype, device=runner.device))
            param.data = zero.view((1,) * param.dim()).expand(param.shape)
        runner.model.model.rotary.cos_sin = torch.empty(0, device=runner.device)
        runner.rebuild_weight_map()  # the old views would keep the released storage alive

    def _resume_weights(self) -> None:
        """One device allocation for all weights (not one per tensor) and asynchronous copies from the
        pinned arena, then one synchronize."""
        runner = self.runner
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


def _typed(buf: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """A uint8 buffer seen as a tensor of `dtype` and `shape`."""
    return buf.view(dtype).view(shape)
