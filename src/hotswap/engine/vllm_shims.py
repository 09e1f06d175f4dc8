"""vLLM's RL control plane by vLLM's names (prime-rl, SkyRL, OpenRLHF call them; so do the /pause, /sleep... HTTP
routes): pause / resume / sleep / wake_up / reset_prefix_cache, each over the SGLang-named methods of EngineAPI,
which is the one class that uses this mixin."""

from __future__ import annotations

from hotswap import protocol as p
from hotswap.errors import shown
from hotswap.runner.device_memory import TAGS as MEMORY_TAGS

# vLLM's pause modes -> ours: keep freezes requests in place, wait lets started ones finish first
VLLM_PAUSE_MODES = {"abort": "abort", "wait": "wait", "keep": "in_place"}
# vLLM's memory tags -> ours: CUDA graphs point into the KV cache, so they sleep and wake with it
_VLLM_MEMORY_TAGS = {"weights": ("weights",), "kv_cache": ("kv_cache", "cuda_graph")}


class VllmControl:
    """vLLM's names over EngineAPI's pause_generation, continue_generation, flush_cache, get_load,
    release_memory_occupation, resume_memory_occupation and _call."""

    def pause(self, mode: str = "abort", clear_cache: bool = True) -> p.ControlOutput:
        """vLLM's pause_generation: `abort` in-flight requests, `wait` for them to finish, or `keep` them
        frozen until `resume`. `clear_cache` drops the prefix cache once drained (never with keep, as vLLM)."""
        ours = VLLM_PAUSE_MODES.get(mode)
        if ours is None:
            return p.ControlOutput(success=False, message=f"unknown pause mode {shown(mode)}; use abort, wait or keep")
        out = self.pause_generation(ours)
        if out.success and clear_cache and mode != "keep":
            flushed = self.flush_cache()
            if not flushed.success:
                return p.ControlOutput(success=False, message=f"paused, but the prefix cache was not cleared: {flushed.message}")
        return out

    def resume(self) -> p.ControlOutput:
        """vLLM's resume_generation (a no-op when not paused)."""
        return self.continue_generation()

    def is_paused(self) -> bool:
        return self.get_load().paused

    def sleep(self, level: int = 1, mode: str = "abort", tags: list[str] | None = None) -> p.ControlOutput:
        """vLLM's sleep: level 1 keeps the weights on the host, level 2 discards them (an update must follow
        the wake-up); the KV cache is discarded. In-flight requests are handled by `mode` first (as `pause`).
        Asleep, generation is refused (503) until `wake_up`. Tags already asleep are skipped."""
        if mode not in VLLM_PAUSE_MODES:
            return p.ControlOutput(success=False, message=f"unknown pause mode {shown(mode)}; use abort, wait or keep")
        if level not in (1, 2) or isinstance(level, bool):
            return p.ControlOutput(success=False, message=f"sleep level must be 1 (weights kept on the host) or 2 (weights discarded), got {shown(level)}")
        wanted = self._vllm_memory_tags(tags)
        if isinstance(wanted, str):
            return p.ControlOutput(success=False, message=wanted)
        load = self.get_load()
        todo = [t for t in wanted if t not in load.memory_released]
        if not todo:
            return p.ControlOutput(success=True, message="already asleep (no-op)")
        paused = self.pause(mode, clear_cache=False)
        if not paused.success:
            return paused
        out = self.release_memory_occupation(todo, keep_weights_on_host=level == 1)
        if not load.paused:  # the pause only drained the requests: asleep, generation is refused anyway
            self.continue_generation()
        return out

    def wake_up(self, tags: list[str] | None = None) -> p.ControlOutput:
        """vLLM's wake_up: resume the given tags (all when None); tags that are awake are skipped."""
        wanted = self._vllm_memory_tags(tags)
        if isinstance(wanted, str):
            return p.ControlOutput(success=False, message=wanted)
        released = self.get_load().memory_released
        todo = [t for t in wanted if t in released]
        if not todo:
            return p.ControlOutput(success=True, message="already awake (no-op)")
        return self.resume_memory_occupation(todo)

    def is_sleeping(self) -> bool:
        return bool(self.get_load().memory_released)

    def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        """vLLM's reset_prefix_cache: False while requests hold cached pages (callers retry), unless
        `reset_running_requests`: then running requests give their pages back and are recomputed later."""
        return self._call(p.FlushCacheRequest(reset_running_requests=reset_running_requests)).success

    @staticmethod
    def _vllm_memory_tags(tags: list[str] | None) -> list[str] | str:
        if tags is None:
            return list(MEMORY_TAGS)
        if isinstance(tags, str) or not all(isinstance(t, str) for t in tags):
            return f"tags must be a list of strings from {sorted(_VLLM_MEMORY_TAGS)}, got {shown(tags)}"
        bad = [t for t in tags if t not in _VLLM_MEMORY_TAGS]
        if bad:
            return f"unknown memory tag(s) {shown(bad)}; use {sorted(_VLLM_MEMORY_TAGS)}"
        return list(dict.fromkeys(t for tag in tags for t in _VLLM_MEMORY_TAGS[tag]))
