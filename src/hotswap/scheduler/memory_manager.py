"""Release and resume device memory by tag (`weights`, `kv_cache`, `cuda_graph`) so a trainer can share
the GPU. Only when idle; while anything is released no batch runs."""

from __future__ import annotations

import gc
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hotswap import protocol as p
from hotswap.runner.model_runner import ModelRunner

TAGS = ("weights", "kv_cache", "cuda_graph")


@dataclass(kw_only=True, slots=True)
class MemoryManager:
    model_runner: ModelRunner
    can_release: Callable[[], bool]
    reset_prefix_cache: Callable[[], object]
    released: set[str] = field(default_factory=set)
    host_weights: dict[str, torch.Tensor] | None = None  # parameter name -> host copy while released
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def any_released(self) -> bool:
        return bool(self.released)

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
            return p.ControlOutput(success=False, message="release_memory_occupation refused: requests are running or a weight-update session is open")
        already = [t for t in tags if t in self.released]
        if already:
            return p.ControlOutput(success=False, message=f"already released: {already}")
        runner = self.model_runner
        graphs = runner.cuda_graphs
        # graphs point at weights and KV storage: they go whenever either goes
        if graphs is not None and ("cuda_graph" in tags or "weights" in tags or "kv_cache" in tags):
            graphs.release()
        if "kv_cache" in tags:
            self.reset_prefix_cache()
            runner.pool.free_storage()
        if "weights" in tags:
            keep = req.keep_weights_on_host
            pin = runner.device.type == "cuda"
            self.host_weights = {}
            self.param_shapes = {name: tuple(param.shape) for name, param in runner.model.named_parameters()}
            for name, param in runner.model.named_parameters():
                if keep:
                    host = torch.empty(param.shape, dtype=param.dtype, pin_memory=pin)
                    host.copy_(param.data)
                    self.host_weights[name] = host
                # a one-element stand-in of the same shape: storage is freed, views stay well-formed
                param.data = torch.zeros((1,) * param.dim(), dtype=param.dtype, device=runner.device).expand(param.shape)
            runner.model.model.rotary.cos_sin = torch.empty(0, device=runner.device)
            runner.rebuild_weight_map()  # the old views would keep the released storage alive
            self.host_weights = self.host_weights if keep else None
        self.released.update(tags)
        gc.collect()
        if runner.device.type == "cuda":
            torch.cuda.empty_cache()
        return p.ControlOutput(success=True, message=f"released {tags}")

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
        runner = self.model_runner
        if "weights" in tags:
            for name, param in runner.model.named_parameters():
                host = self.host_weights.get(name) if self.host_weights is not None else None
                data = torch.empty(self.param_shapes[name], dtype=param.dtype, device=runner.device)
                if host is not None:
                    data.copy_(host)
                else:
                    data.zero_()  # the caller said it will reload weights
                param.data = data
            runner.model.model.rotary.rebuild(runner.device)
            runner.rebuild_weight_map()
            self.host_weights = None
        if "kv_cache" in tags:
            runner.pool.allocate_storage()
        self.released.difference_update(tags)
        graphs = runner.cuda_graphs
        if graphs is not None and not self.released and not graphs.captured:
            graphs.capture()
        return p.ControlOutput(success=True, message=f"resumed {tags}")

