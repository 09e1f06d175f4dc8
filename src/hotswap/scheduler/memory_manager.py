"""When and what device memory to release and resume, by tag (`weights`, `kv_cache`, `cuda_graph`), so a
trainer can share the GPU. Only when idle; while anything is released no batch runs. The runner's
DeviceMemory does the freeing; under tensor parallelism (`peers`, rank 0) every worker releases and
resumes the same tags on its own GPU."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hotswap import protocol as p
from hotswap.errors import shown
from hotswap.runner.device_memory import TAGS, DeviceMemory

if TYPE_CHECKING:
    from hotswap.runner.tp_peers import TPPeers


@dataclass(kw_only=True, slots=True)
class MemoryManager:
    device_memory: DeviceMemory  # the runner's release/resume mechanics
    why_not_release: Callable[[], str | None]  # why memory may not move now (None: it may)
    reset_prefix_cache: Callable[[], object]
    weights_discarded: Callable[[], None] = lambda: None  # released without keeping them: other weights come back
    peers: TPPeers | None = None

    def any_released(self) -> bool:
        return bool(self.device_memory.released)

    @property
    def released(self) -> frozenset[str]:
        """The tags whose device memory is released now."""
        return frozenset(self.device_memory.released)

    def weights_released(self) -> bool:
        """Weight updates and reads need the weights resident, not the KV cache (SGLang's rule)."""
        return "weights" in self.released

    def _tags(self, tags: list[str] | None) -> list[str] | str:
        """The tags a call names; None or an empty list names every tag, as in SGLang's scheduler (which releases and
        resumes `GPU_MEMORY_ALL_TYPES` when `not tags`)."""
        if not tags:
            return list(TAGS)
        if isinstance(tags, str):
            tags = [tags]
        bad = [t for t in tags if t not in TAGS]
        return f"unknown memory tag(s) {shown(bad)}; use {list(TAGS)}" if bad else list(dict.fromkeys(tags))

    def release_memory_occupation(self, req: p.ReleaseMemoryOccupationRequest) -> p.ControlOutput:
        tags = self._tags(req.tags)
        if isinstance(tags, str):
            return p.ControlOutput(success=False, message=tags)
        why = self.why_not_release()
        if why is not None:
            return p.ControlOutput(success=False, message=f"release_memory_occupation refused: {why}")
        already = [t for t in tags if t in self.device_memory.released]
        if already:
            return p.ControlOutput(success=False, message=f"already released: {already}")
        if self.peers is not None:
            self.peers.release(tags, req.keep_weights_on_host)
        if "kv_cache" in tags:
            self.reset_prefix_cache()  # no cached prefix may hold pages of the storage about to go
        self.device_memory.release(tags, req.keep_weights_on_host)
        if "weights" in tags and not req.keep_weights_on_host:
            self.weights_discarded()
        return self._agreed(f"released {tags}")

    def resume_memory_occupation(self, req: p.ResumeMemoryOccupationRequest) -> p.ControlOutput:
        tags = self._tags(req.tags)
        if isinstance(tags, str):
            return p.ControlOutput(success=False, message=tags)
        released = self.device_memory.released
        tags = [t for t in tags if t in released] if not req.tags else tags
        missing = [t for t in tags if t not in released]
        if missing:
            return p.ControlOutput(success=False, message=f"resume refused: {missing} not released")
        if not tags:
            return p.ControlOutput(success=False, message="resume refused: nothing is released")
        if self.peers is not None:
            self.peers.resume(tags)
        self.device_memory.resume(tags)
        return self._agreed(f"resumed {tags}")

    def _agreed(self, done: str) -> p.ControlOutput:
        failure = self.peers.agree(None) if self.peers is not None else None
        if failure is not None:
            return p.ControlOutput(success=False, message=f"{done} on rank 0, but {failure}")
        return p.ControlOutput(success=True, message=done)
