"""What every transport shares: engines as a list, bounded parallel calls, the weight-update sessions that
make a multi-bucket push one update on every engine, results and errors.

Multi-engine semantics (sessions on, the default): a push is two phases.
1. Every engine opens a session (`begin_weight_update`) and loads every bucket into it. Nothing is served
   from a session until it is committed. Any failure here (an engine down, refusing, too slow, dead) ends
   every session with `abort=True`: each engine that answers rolls back to its weights and version before
   the push, and the error says which engine failed and what each one holds now.
2. Only when every engine has loaded every bucket does the pusher commit (`end_weight_update(version)`) on
   all of them. A commit can still fail on one engine (it dies, or its reply is lost); a commit whose reply
   was lost is resolved by reading the engine's `weight_version` back. When some engines committed and some
   did not, the error (`WeightPushError.states`) names both sets: the trainer must push again (the same
   weights and version: engines that already hold them load them again, nothing changes there) or take
   the others out of rollout, before generating, so no two engines serve different weights. Give every push
   a fresh `weight_version`: it is what makes a lost commit reply decidable and mixed versions visible.

Session ids: an engine that answers `begin_weight_update` with a `session_id` (hotswap) gets it on every
bucket call and on the commit or abort of that push, so a call that reaches it late (after the pusher gave
up and aborted, or inside the session of a later push) is refused there and changes nothing; an abort
names only the push's own session. Engines that answer no id (SGLang) get none: their calls run in
whatever session is open, as SGLang's callers expect.

A `begin_weight_update` answered after the push stopped waiting for it has its session aborted by the id it
answered (`abort_late_session`). Any other session left open on an engine by a push that timed out is ended
by the next push (its refused `begin_weight_update` is followed by an id-less abort, since that session's id
may never have reached the pusher, and one more begin) or expires on the engine. The pusher assumes it is
the only writer to its engines' sessions. A push with no tensor is refused before any engine is called.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field

import torch

from hotswap.trainer.client import EngineConnectionError, EngineHandle, EngineResult
from hotswap.wire.buckets import Weights, iter_buckets, iter_named_tensors, tensor_nbytes

log = logging.getLogger(__name__)

DEFAULT_BUCKET_BYTES = 512 << 20  # engines accept 1 GiB per call by default (weight_update_bucket_bytes)
DEFAULT_CALL_TIMEOUT_S = 600.0

# What a push left each engine holding (WeightPushError.states)
COMMITTED = "committed"  # the pushed weights, served
ROLLED_BACK = "rolled_back"  # its weights before the push (it confirmed the abort)
UNTOUCHED = "untouched"  # its weights before the push (no session was ever opened on it)
UNKNOWN = "unknown"  # unreachable or silent: it may hold an open session (it expires) or be gone


class WeightPushError(RuntimeError):
    """A push failed. `reason` names each failing engine and what failed; `results` holds every engine's
    reply to the failing step; `states[i]` says what engine i holds now (COMMITTED, ROLLED_BACK, UNTOUCHED,
    UNKNOWN); `rolled_back` is True when every engine is back on its weights before the push;
    `group_broken` says a distributed group lost lockstep and was torn down (call `connect()` again)."""

    def __init__(self, reason: str, *, results: Sequence[EngineResult] = (), rolled_back: bool = False, group_broken: bool = False,
                 states: Sequence[str] = ()):
        self.reason = reason
        self.results = list(results)
        self.rolled_back = rolled_back
        self.group_broken = group_broken
        self.states = list(states)
        super().__init__(reason)

    @property
    def committed(self) -> list[int]:
        """Indices of the engines that committed the push (non-empty only when the commit itself failed somewhere)."""
        return [i for i, s in enumerate(self.states) if s == COMMITTED]


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
    except EngineConnectionError as exc:
        return EngineResult(False, str(exc), exception=exc, outcome_unknown=exc.outcome_unknown)
    except Exception as exc:
        return EngineResult(False, f"{type(exc).__name__}: {exc}", exception=exc)


def call_method(engine: EngineHandle, method: str, *args, **kwargs) -> EngineResult:
    """`call_result` of `engine.method`; a handle without that method is a failed result, not a crash."""
    fn = getattr(engine, method, None)
    if fn is None:
        return EngineResult(False, f"{engine!r} has no method {method}")
    return call_result(fn, *args, **kwargs)


def spawn(fn: Callable, *args, **kwargs) -> Future:
    """Run `fn` in a daemon thread of its own: a call stuck in an engine never holds a worker another call
    needs, nor the interpreter's exit."""
    future: Future = Future()
    future.set_running_or_notify_cancel()

    def run() -> None:
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)

    threading.Thread(target=run, name=f"hotswap-push-{getattr(fn, '__name__', 'call')}", daemon=True).start()
    return future


def wait_result(future: Future, timeout_s: float | None, what: str, limit_s: float | None = None) -> EngineResult:
    """The EngineResult a `spawn(call_result, ...)` future resolves to, or a failed one once `timeout_s` passed
    (`limit_s`: the limit to name in the message, when `timeout_s` is what is left of it)."""
    try:
        return future.result(timeout=None if timeout_s is None else max(0.0, timeout_s))
    except FutureTimeout:
        return EngineResult(False, f"{what}: no reply within {limit_s or timeout_s:g} s (the engine may still act on it)",
                            outcome_unknown=True, timed_out=True)


def engine_failures(results: Sequence[EngineResult], engines: Sequence[EngineHandle]) -> str:
    """Every failing engine, by name, with its message."""
    return "; ".join(f"{engine!r}: {r.message}" for engine, r in zip(engines, results) if not r.success)


def failure_reason(step: str, results: Sequence[EngineResult], engines: Sequence[EngineHandle]) -> str:
    """`step` and every failing engine's message, each named."""
    return f"{step} failed on {engine_failures(results, engines)}"


class WeightPusher:
    """Base of the transports: `push(weights, weight_version)` opens a weight-update session on every
    engine (`begin_weight_update`), sends the buckets, and commits (`end_weight_update`); on any failure
    before the commit it ends every session with `abort=True` (each engine rolls back to its weights
    before the push) and raises `WeightPushError` naming the engines and what they hold (see the module
    docstring for the multi-engine rules).

    `use_sessions=False` drives engines without sessions (SGLang): each call is then atomic on its own,
    not the push as a whole. Engines are driven in parallel, one thread per call; `call_timeout_s` bounds
    the wait for each engine call (in process or over HTTP, whose client has its own timeouts too)."""

    def __init__(self, engines: EngineHandle | Sequence[EngineHandle], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, flush_cache: bool = True, use_sessions: bool = True,
                 call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S):
        self.engines = as_engines(engines)
        if bucket_bytes <= 0:
            raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
        if call_timeout_s is not None and call_timeout_s <= 0:
            raise ValueError(f"call_timeout_s must be positive or None, got {call_timeout_s}")
        self.bucket_bytes = int(bucket_bytes)
        self.dtype = dtype
        self.flush_cache = flush_cache
        self.use_sessions = use_sessions
        self.call_timeout_s = call_timeout_s
        self.push_version: str | None = None  # the version of the push under way
        # each engine's session of the push under way, from its begin reply (None: it gave none); set it
        # yourself to call push_bucket inside sessions you opened
        self.session_ids: list[str | None] = [None] * len(self.engines)

    # ---- engine calls -----------------------------------------------------------------------------

    def submit_all(self, method: str, *args, **kwargs) -> list[Future]:
        """Start `method(*args, **kwargs)` on every engine; futures resolve to EngineResults."""
        return [spawn(call_method, e, method, *args, **kwargs) for e in self.engines]

    def gather(self, method: str, futures: Sequence[Future], timeout_s: float | None = None) -> list[EngineResult]:
        """Each future's EngineResult, all waited for within one `timeout_s` (default `call_timeout_s`)."""
        timeout_s = self.call_timeout_s if timeout_s is None else timeout_s
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return [wait_result(f, None if deadline is None else deadline - time.monotonic(), method, timeout_s) for f in futures]

    def call_all(self, method: str, *args, **kwargs) -> list[EngineResult]:
        return self.gather(method, self.submit_all(method, *args, **kwargs))

    def call_one(self, engine: EngineHandle, method: str, *args, **kwargs) -> EngineResult:
        return wait_result(spawn(call_method, engine, method, *args, **kwargs), self.call_timeout_s, method)

    def session_kw(self, i: int) -> dict:
        """`session_id=` for engine i's calls in the push's session, when it answered one (SGLang's do not)."""
        sid = self.session_ids[i]
        return {} if sid is None else {"session_id": sid}

    def submit_each(self, method: str, *args, **kwargs) -> list[Future]:
        """`submit_all` inside the push's sessions: each engine's call names its own session."""
        return [spawn(call_method, e, method, *args, **kwargs, **self.session_kw(i)) for i, e in enumerate(self.engines)]

    def call_each(self, method: str, *args, **kwargs) -> list[EngineResult]:
        return self.gather(method, self.submit_each(method, *args, **kwargs))

    def close(self) -> None:
        """Release what the transport holds between pushes (the distributed pusher: its group); none here."""

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
        named = iter_named_tensors(weights)
        first = next(named, None)
        if first is None:  # committing nothing would label the old weights with the new version
            raise WeightPushError(f"nothing to push for weight_version {weight_version!r}: the weights hold no tensor (an iterator "
                                  "already consumed?); no engine was called", rolled_back=True, states=[UNTOUCHED] * len(self.engines))
        self.push_version = weight_version
        try:
            return self._push(itertools.chain([first], named), weight_version, progress, start)
        finally:
            self.session_ids = [None] * len(self.engines)  # a later call never names this push's sessions

    def _push(self, weights: Weights, weight_version: str | None, progress: Callable[[int, int, int], None] | None,
              start: float) -> PushResult:
        if self.use_sessions:
            self._begin()
        t0 = time.perf_counter()
        try:
            stats = self._send(weights, None if self.use_sessions else weight_version, progress)
        except BaseException as exc:
            if self.use_sessions:
                states = self._abort()
                if isinstance(exc, WeightPushError):
                    exc.states, exc.rolled_back = states, all_back(states)
                    exc.reason = exc.args[0] + holding(states, self.engines)
                    exc.args = (exc.reason,)
                elif isinstance(exc, Exception):
                    raise WeightPushError(f"push failed on the trainer side: {type(exc).__name__}: {exc}{holding(states, self.engines)}",
                                          rolled_back=all_back(states), states=states) from exc
            raise
        transfer = time.perf_counter() - t0
        final = self._commit(weight_version) if self.use_sessions else stats.pop("last_results")
        versions = {r.get("weight_version") for r in final} - {None}
        if weight_version is not None and versions - {weight_version}:
            raise WeightPushError(f"engines report another weight_version than {weight_version!r} after the push: "
                                  + "; ".join(f"{e!r}: {r.get('weight_version')!r}" for e, r in zip(self.engines, final)),
                                  results=final, states=[COMMITTED] * len(final))
        version = weight_version if weight_version is not None else (versions.pop() if len(versions) == 1 else None)
        return PushResult(weight_version=version, num_tensors=stats["num_tensors"], num_bytes=stats["num_bytes"],
                          num_buckets=stats["num_buckets"], elapsed_s=time.perf_counter() - start, transfer_s=transfer,
                          engine_results=list(final))

    def _begin(self) -> None:
        """Open a session on every engine and keep the ids they answer. A refused begin (a session left open
        by a push that timed out or died) is followed by an abort without an id (that session's id may never
        have reached this pusher) and one more begin; when an engine still has none, every session is
        aborted and the push refused. A begin answered after the wait for it ended opened a session this push
        never ends, which holds the engine's generation: it is aborted by its id then."""
        futures = self.submit_all("begin_weight_update")
        began = self.gather("begin_weight_update", futures)
        for engine, future, r in zip(self.engines, futures, began):
            if r.timed_out:
                future.add_done_callback(lambda f, engine=engine: abort_late_session(engine, f))
        # refused outright (not unreachable, not still in flight): a stale session, most likely
        retry = [i for i, r in enumerate(began) if not r.success and not r.outcome_unknown and r.exception is None]
        for i in retry:
            stale = self.call_one(self.engines[i], "end_weight_update", abort=True)
            if stale.success:
                log.warning("%r had a weight-update session left open; it was aborted before this push", self.engines[i])
            began[i] = self.call_one(self.engines[i], "begin_weight_update")
        self.session_ids = [session_id_of(r) for r in began]
        if all(began):
            return
        states = self._abort([UNKNOWN if r.success or r.outcome_unknown else UNTOUCHED for r in began])
        raise WeightPushError(failure_reason("begin_weight_update", began, self.engines) + holding(states, self.engines),
                              results=began, rolled_back=all_back(states), states=states)

    def _abort(self, states: Sequence[str] | None = None) -> list[str]:
        """End every session that is (or may be) open without committing; what each engine holds afterwards.
        `states` marks engines with nothing to abort (UNTOUCHED, COMMITTED); the others are all aborted, each by
        its session id when it gave one (never another push's session). An answer of the engine's sessions means
        this push's session is not open there now (aborted, or already ended), unless it says it was committed; to
        an abort naming a session that answer is a success or says how the session ended, and any other reply (a
        front end whose engine process died, a refused key) leaves the engine's state unknown."""
        states = list(states) if states is not None else [UNKNOWN] * len(self.engines)
        todo = [i for i, s in enumerate(states) if s not in (UNTOUCHED, COMMITTED)]
        futures = [spawn(call_method, self.engines[i], "end_weight_update", abort=True, **self.session_kw(i)) for i in todo]
        for i, r in zip(todo, self.gather("end_weight_update(abort=True)", futures)):
            answered = not r.outcome_unknown and r.exception is None and (
                r.success or ended_as(r) is not None or self.session_ids[i] is None)
            states[i] = COMMITTED if ended_as(r) == "committed" else ROLLED_BACK if answered else UNKNOWN
            if not answered:
                log.warning("aborting the weight-update session on %r failed: %s", self.engines[i], r.message)
        return states

    def _commit(self, weight_version: str | None) -> list[EngineResult]:
        """Phase 2: commit on every engine; a lost reply is settled by reading the engine's version back."""
        ends = self.call_each("end_weight_update", weight_version=weight_version)
        states = [COMMITTED if r.success else UNKNOWN if r.outcome_unknown or r.exception is not None else ROLLED_BACK for r in ends]
        for i, r in enumerate(ends):
            if r.outcome_unknown:
                states[i] = self._settle_commit(i, weight_version)
                if states[i] == COMMITTED:
                    ends[i] = EngineResult(True, f"committed (the reply was lost; the engine reports weight_version {weight_version!r})",
                                           {"weight_version": weight_version})
        if all(s == COMMITTED for s in states):
            return ends
        reason = failure_reason("end_weight_update", ends, self.engines)
        if not any(s == COMMITTED for s in states):  # nothing of the push is served anywhere
            states = self._abort(states)
            raise WeightPushError(reason + holding(states, self.engines), results=ends, rolled_back=all_back(states), states=states)
        states = self._abort(states)
        raise WeightPushError(reason + holding(states, self.engines) + f"; engines now serve different weights: push again (the same "
                              f"weights, version {weight_version!r}) or take the others out of rollout", results=ends, states=states)

    def _settle_commit(self, i: int, weight_version: str | None) -> str:
        """Whether engine i's commit whose reply was lost took effect: the version says so; else an abort of the
        session closes it if it is still open (the commit never ran; arriving later, it is refused), or says
        how it ended; without a session id the version is read once more."""
        engine = self.engines[i]
        if weight_version is not None and engine_version(self, engine) == weight_version:
            return COMMITTED
        abort = self.call_one(engine, "end_weight_update", abort=True, **self.session_kw(i))
        if ended_as(abort) == "committed":
            return COMMITTED
        if abort.success:
            return ROLLED_BACK
        if abort.outcome_unknown or abort.exception is not None or weight_version is None:
            return UNKNOWN
        version = engine_version(self, engine)  # no session open: the commit ran, or failed, since the first read
        return COMMITTED if version == weight_version else ROLLED_BACK if version is not None else UNKNOWN

    def _send(self, named, weight_version: str | None, progress: Callable | None) -> dict:
        """Send every bucket through `push_bucket`; returns {"num_tensors", "num_bytes", "num_buckets", "last_results"}."""
        stats = new_stats()
        for bucket in iter_buckets(named, self.bucket_bytes, self.dtype):
            self._landed(stats, progress, bucket, self.push_bucket(bucket, weight_version=weight_version))
        return stats

    def _landed(self, stats: dict, progress: Callable | None, bucket: list[tuple[str, torch.Tensor]], results: list[EngineResult]) -> None:
        """Count a bucket every engine loaded (buckets land in order) and report it to `progress`."""
        stats["num_tensors"] += len(bucket)
        stats["num_bytes"] += sum(tensor_nbytes(t, self.dtype) for _, t in bucket)
        stats["num_buckets"] += 1
        stats["last_results"] = results
        if progress is not None:
            progress(stats["num_buckets"] - 1, stats["num_tensors"], stats["num_bytes"])

    def push_bucket(self, bucket: list[tuple[str, torch.Tensor]], *, weight_version: str | None = None) -> list[EngineResult]:
        """Deliver one bucket to every engine (each transport's own job)."""
        raise NotImplementedError

    def _before_push(self) -> None:
        pass



def new_stats() -> dict:
    """What `_send` returns, before any bucket landed."""
    return {"num_tensors": 0, "num_bytes": 0, "num_buckets": 0, "last_results": []}


def session_id_of(reply: EngineResult) -> str | None:
    """The session id a begin_weight_update reply names (None: the engine gave none, as SGLang)."""
    sid = reply.get("session_id") if reply.success else None
    return sid if isinstance(sid, str) and sid else None


def ended_as(reply: EngineResult) -> str | None:
    """How the session a refused or no-op end_weight_update named had ended (`extra["session"]`), if said."""
    extra = reply.get("extra")
    return extra.get("session") if isinstance(extra, Mapping) else None


def all_back(states: Sequence[str]) -> bool:
    """Every engine holds its weights from before the push."""
    return all(s in (ROLLED_BACK, UNTOUCHED) for s in states)


def holding(states: Sequence[str], engines: Sequence[EngineHandle]) -> str:
    """'; now: A rolled_back, B committed, ...' for an error message."""
    return "; now: " + ", ".join(f"{e!r} {s}" for e, s in zip(engines, states)) if states else ""


def abort_late_session(engine: EngineHandle, begun: Future) -> None:
    """End the session a begin_weight_update opened after its push stopped waiting for it (by its id: never
    another push's session)."""
    sid = session_id_of(begun.result())
    if sid is not None:
        r = call_method(engine, "end_weight_update", abort=True, session_id=sid)
        log.warning("%r opened a weight-update session after its push gave up on it; it was aborted: %s", engine, r.message)


def engine_version(pusher: WeightPusher, engine: EngineHandle) -> str | None:
    """The engine's current weight_version (None when it cannot say in time)."""
    r = pusher.call_one(engine, "get_model_info")
    version = r.get("weight_version") if r.success else None
    return str(version) if version is not None else None
