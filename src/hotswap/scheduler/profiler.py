"""SGLang's `start_profile` / `stop_profile`: a torch.profiler trace of the scheduler's steps, written as a
Chrome trace (`<output_dir>/[<prefix>-]<profile_id>-TP-0.trace.json.gz`, SGLang's file name), for RL frameworks
that profile their rollouts through the engine (slime's `start_profile`, its tools/profile_rollout.py).

The profiler runs on the scheduler thread (torch.profiler records the CPU ops of the thread that starts it,
and every kernel of the process): it starts when a request says so or once `start_step` steps have run, and
stops on `stop_profile` or after `num_steps` steps, writing its files before the next step. Under tensor
parallelism the trace is rank 0's (the scheduler's process); the workers are not traced."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from hotswap import protocol as p
from hotswap.errors import shown

log = logging.getLogger("hotswap.scheduler")

ACTIVITIES = ("CPU", "GPU", "MEM", "CUDA_PROFILER")  # SGLang's names; MEM: a CUDA memory snapshot beside the trace
DEFAULT_ACTIVITIES = ("CPU", "GPU")
_SAFE_PREFIX = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")


def default_profile_dir() -> str:
    """Where traces go when a request names no folder: SGLang's SGLANG_TORCH_PROFILER_DIR, else /tmp."""
    return os.environ.get("SGLANG_TORCH_PROFILER_DIR") or "/tmp"


@dataclass(kw_only=True, slots=True)
class _Run:
    output_dir: str
    activities: tuple[str, ...]
    name: str  # file name stem: [<prefix>-]<profile_id>-TP-0
    start_at: int  # the step count at which it starts (now, or a start_step ahead)
    stop_after: int | None  # the step count at which it stops by itself
    with_stack: bool
    record_shapes: bool
    started: bool = False
    trace: torch.profiler.profile | None = None  # None without CPU/GPU activities (MEM or CUDA_PROFILER alone)


@dataclass(kw_only=True, slots=True)
class StepProfiler:
    """One profiling run at a time; the loop calls `after_step` only while there is one (`run`)."""

    device: torch.device
    steps: Callable[[], int]  # the loop's steps so far (a run's start_step counts them)
    run: _Run | None = None

    def start_profile(self, req: p.StartProfileRequest) -> p.ControlOutput:
        steps_so_far = self.steps()
        problem = self._refusal(req)
        if problem:
            return p.ControlOutput(success=False, message=f"start_profile refused: {problem}")
        output_dir = req.output_dir or default_profile_dir()
        try:
            os.makedirs(output_dir, exist_ok=True)
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the name
            why = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
            return p.ControlOutput(success=False, message=f"start_profile refused: cannot create output_dir {shown(output_dir)}: {why}")
        if not os.access(output_dir, os.W_OK):
            return p.ControlOutput(success=False, message=f"start_profile refused: output_dir {shown(output_dir)} is not writable")
        start = steps_so_far if req.start_step is None else max(req.start_step, steps_so_far)
        self.run = _Run(output_dir=output_dir, activities=tuple(req.activities or DEFAULT_ACTIVITIES),
                        name=f"{req.profile_prefix + '-' if req.profile_prefix else ''}{time.time():.6f}-TP-0", start_at=start,
                        stop_after=None if req.num_steps is None else start + req.num_steps,
                        with_stack=bool(req.with_stack), record_shapes=bool(req.record_shapes))
        if start <= steps_so_far:
            self._begin(self.run)
        return p.ControlOutput(success=True, message="Start profiling.")

    def stop_profile(self, req: p.StopProfileRequest) -> p.ControlOutput:
        if self.run is None:
            return p.ControlOutput(success=False, message="stop_profile refused: no profile is running; call start_profile first")
        files = self._finish()
        return p.ControlOutput(success=True, message="Stop profiling. Wrote " + ", ".join(files) if files else
                               "Stop profiling. No step had run: nothing was written")

    def after_step(self, steps: int) -> None:
        """Called by the loop after each step while a run is on: starts it at its start_step, ends it after num_steps."""
        run = self.run
        if not run.started:
            if steps >= run.start_at:
                self._begin(run)
        elif run.stop_after is not None and steps >= run.stop_after:
            try:
                files = self._finish()
            except Exception:  # a full disk must not stop the engine's loop
                log.exception("writing the profile failed")
                return
            log.info("profile written: %s", ", ".join(files))

    # ---- internals -----------------------------------------------------------------------------

    def _refusal(self, req: p.StartProfileRequest) -> str | None:
        if self.run is not None:
            return "a profile is already running; stop_profile first"
        activities = req.activities or DEFAULT_ACTIVITIES
        unknown = [a for a in activities if a not in ACTIVITIES]
        if unknown:
            return f"unknown activities {shown(unknown)}; expected some of {list(ACTIVITIES)}"
        if self.device.type != "cuda" and not ("CPU" in activities and set(activities) <= {"CPU", "GPU"}):
            return f"activities {list(activities)}: on a {self.device.type} engine only CPU records anything"
        if req.num_steps is not None and req.num_steps < 1:
            return f"num_steps must be >= 1 (got {shown(req.num_steps)})"
        if req.start_step is not None and req.start_step < 0:
            return f"start_step must be >= 0 (got {shown(req.start_step)})"
        if req.profile_prefix and not _SAFE_PREFIX.fullmatch(req.profile_prefix):
            return f"profile_prefix {shown(req.profile_prefix)} may hold only letters, digits, '.', '_' and '-' (it names files)"
        if req.profile_by_stage:
            return "profile_by_stage is not served: one trace covers prefill and decode steps (they share steps here)"
        return None

    def _begin(self, run: _Run) -> None:
        kinds = [torch.profiler.ProfilerActivity.CPU] if "CPU" in run.activities else []
        if "GPU" in run.activities and self.device.type == "cuda":
            kinds.append(torch.profiler.ProfilerActivity.CUDA)
        if kinds:
            run.trace = torch.profiler.profile(activities=kinds, with_stack=run.with_stack, record_shapes=run.record_shapes)
            run.trace.start()
        if "MEM" in run.activities:
            torch.cuda.memory._record_memory_history(max_entries=100_000)
        if "CUDA_PROFILER" in run.activities:
            torch.cuda.cudart().cudaProfilerStart()
        run.started = True

    def _finish(self) -> list[str]:
        """Stop the run and write its files (none when it never started)."""
        run, self.run = self.run, None
        if not run.started:
            return []
        written = []
        if "CUDA_PROFILER" in run.activities:
            torch.cuda.cudart().cudaProfilerStop()
        if "MEM" in run.activities:
            path = os.path.join(run.output_dir, f"{run.name}-memory.pickle")
            torch.cuda.memory._dump_snapshot(path)  # torch's snapshot format, for pytorch.org/memory_viz
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(path)
        if run.trace is not None:
            run.trace.stop()
            path = os.path.join(run.output_dir, f"{run.name}.trace.json.gz")
            run.trace.export_chrome_trace(path)
            written.append(path)
        return written
