"""What every transport shares: engines as a list, parallel calls, the weight-update session that makes a
multi-bucket push one atomic update, results and errors."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.wire.buckets import Weights, iter_buckets, iter_named_tensors, tensor_nbytes

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 << 20  # engines accept 1 GiB per call by default (weight_update_bucket_bytes)


class WeightPushError(RuntimeError):
    """A push failed. `reason` is the first engine's (or the trainer's) explanation; `results` holds every
    engine's reply to the failing step; `rolled_back` says the sessions were ended without committing
    (each engine holds the weights it had before the push); `group_broken` says a distributed group lost
    lockstep and was torn down (call `connect()` again)."""

    def __init__(self, reason: str, *, results: Sequence[EngineResult] = (), rolled_back: bool = False, group_broken: bool = False):
        self.reason = reason
        self.results = list(results)
        self.rolled_back = rolled_back
        self.group_broken = group_broken
        super().__init__(reason)


@dataclass(slots=True)
class PushResult:
    """A committed push: what was sent, how long it took, and each engine's final reply."""

    weight_version: str | None
    num_tensors: int
    num_bytes: int
    num_buckets: int
    elapsed_s: float
    transfer_s: float  # time spent in the buckets (elapsed_s less session begin/end)
    engine_results: list[EngineResult] = field(default_factory=list)

    @property
    def gb_per_s(self) -> float:
        return self.num_bytes / self.elapsed_s / 1e9 if self.elapsed_s > 0 else 0.0


def as_engines(engines: EngineHandle | Sequence[EngineHandle]) -> list[EngineHandle]:
    items = list(engines) if isinstance(engines, (list, tuple)) else [engines]
    if not items:
        raise ValueError("no engines given")
    return items


def call_result(fn: Callable, *args, **kwargs) -> EngineResult:
    """Call an engine method; an exception (engine unreachable, bad input) becomes a failed result."""
    try:
        return EngineResult.of(fn(*args, **kwargs))
    except Exception as exc:
        return EngineResult(False, f"{type(exc).__name__}: {exc}", {"exception": exc})


def first_failure(results: Sequence[EngineResult], engines: Sequence[EngineHandle]) -> str:
    for engine, r in zip(engines, results):
        if not r.success:
            return r.message if len(engines) == 1 else f"{engine!r}: {r.message}"
    return ""


def failure_reason(step: str, results: Sequence[EngineResult], engines: Sequence[EngineHandle]) -> str:
    """The first failing engine's message, naming the step unless the engine already did."""
    msg = first_failure(results, engines)
    return msg if step in msg else f"{step} failed: {msg}"


class WeightPusher:
    """Base of the transports: `push(weights, weight_version)` opens a weight-update session on every
    engine (`begin_weight_update`), sends the buckets, and commits (`end_weight_update`); on any failure
    it ends every session with `abort=True` (each engine rolls back to its weights before the push) and
    raises `WeightPushError` carrying the engine's reason.

    `use_sessions=False` drives engines without sessions (SGLang): each call is then atomic on its own,
    not the push as a whole. Engines are driven in parallel, one thread each."""

    def __init__(self, engines: EngineHandle | Sequence[EngineHandle], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, flush_cache: bool = True, use_sessions: bool = True):
        self.engines = as_engines(engines)
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self.flush_cache = flush_cache
        self.use_sessions = use_sessions
        self.push_version: str | None = None  # the version of the push under way
        self._pool = ThreadPoolExecutor(max_workers=len(self.engines) + 2, thread_name_prefix="hotswap-push")

    # ---- engine calls -----------------------------------------------------------------------------

    def submit_all(self, method: str, *args, **kwargs) -> list[Future]:
        """Start `method(*args, **kwargs)` on every engine; futures resolve to EngineResults."""
        return [self._pool.submit(call_result, getattr(e, method), *args, **kwargs) for e in self.engines]

    def call_all(self, method: str, *args, **kwargs) -> list[EngineResult]:
        return [f.result() for f in self.submit_all(method, *args, **kwargs)]

    def close(self) -> None:
        self._pool.shutdown(wait=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the push ---------------------------------------------------------------------------------

    def push(self, weights: Weights, weight_version: str | None = None, *,
             progress: Callable[[int, int, int], None] | None = None) -> PushResult:
        """Send `weights` (a state_dict or iterable of (HF name, tensor)) to every engine as one update.

        `progress(bucket_index, num_tensors_so_far, num_bytes_so_far)` is called after each bucket lands.
        Returns a PushResult; raises WeightPushError (after rolling the sessions back) on failure."""
        start = time.perf_counter()
        self._before_push()
        self.push_version = weight_version
        if self.use_sessions:
            began = self.call_all("begin_weight_update")
            if not all(began):
                self._abort([r.success for r in began])
                raise WeightPushError(failure_reason("begin_weight_update", began, self.engines), results=began, rolled_back=True)
        t0 = time.perf_counter()
        try:
            stats = self._send(iter_named_tensors(weights), None if self.use_sessions else weight_version, progress)
        except BaseException as exc:
            if self.use_sessions:
                aborted = self._abort([True] * len(self.engines))
                if isinstance(exc, WeightPushError):
                    exc.rolled_back = all(aborted)
                elif isinstance(exc, Exception):
                    raise WeightPushError(f"push failed on the trainer side: {type(exc).__name__}: {exc}",
                                          rolled_back=all(aborted)) from exc
            raise
        transfer = time.perf_counter() - t0
        if self.use_sessions:
            ends = self.call_all("end_weight_update", weight_version=weight_version)
            if not all(ends):
                # a failed commit rolls that engine back; roll the others back too only if still open
                raise WeightPushError(failure_reason("end_weight_update", ends, self.engines), results=ends,
                                      rolled_back=not any(ends))
            final = ends
        else:
            final = stats.pop("last_results")
        versions = {r.get("weight_version") for r in final}
        return PushResult(weight_version=versions.pop() if len(versions) == 1 else weight_version, num_tensors=stats["num_tensors"],
                          num_bytes=stats["num_bytes"], num_buckets=stats["num_buckets"], elapsed_s=time.perf_counter() - start,
                          transfer_s=transfer, engine_results=list(final))

    def _abort(self, opened: list[bool]) -> list[bool]:
        """End the given engines' sessions without committing; True where the engine confirmed."""
        out = []
        for engine, was_open in zip(self.engines, opened):
            if not was_open:
                out.append(True)
                continue
            r = call_result(engine.end_weight_update, abort=True)
            if not r.success:
                log.warning("aborting the weight-update session on %r failed: %s", engine, r.message)
            out.append(r.success)
        return out

    def _send(self, named, weight_version: str | None, progress: Callable | None) -> dict:
        """Send every bucket through `push_bucket`; returns {"num_tensors", "num_bytes", "num_buckets", "last_results"}."""
        stats = {"num_tensors": 0, "num_bytes": 0, "num_buckets": 0, "last_results": []}
        for bucket in iter_buckets(named, self.bucket_bytes, self.dtype):
            results = self.push_bucket(bucket, weight_version=weight_version)
            stats["num_tensors"] += len(bucket)
            stats["num_bytes"] += sum(tensor_nbytes(t, self.dtype) for _, t in bucket)
            stats["num_buckets"] += 1
            stats["last_results"] = results
            if progress is not None:
                progress(stats["num_buckets"] - 1, stats["num_tensors"], stats["num_bytes"])
        return stats

    def push_bucket(self, bucket: list[tuple[str, torch.Tensor]], *, weight_version: str | None = None) -> list[EngineResult]:
        """Deliver one bucket to every engine (each transport's own job)."""
        raise NotImplementedError

    def _before_push(self) -> None:
        pass

    def _check(self, step: str, results: list[EngineResult], **kw) -> None:
        if not all(results):
            raise WeightPushError(failure_reason(step, results, self.engines), results=results, **kw)
