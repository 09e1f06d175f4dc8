"""Update sessions: several calls that are one update, committed or rolled back whole.

A session is opened explicitly (`begin_weight_update`; `pause_generation` opens one that holds the
updates made during the pause, or, while a begun session is open, once that one ends) or implicitly by a
single update call. Each call's `apply` runs inside
it; slices it overwrites are saved first when a later failure could strand them (`guard`); every rank
agrees on the call's outcome; a failure rolls back every call of the session on every rank.

Versions follow SGLang's rule: the version changes only when a call gives one (`weight_version`), and
then at once, so a trainer reads it back between its update and `continue_generation`; an update
without one leaves it as it was, and an update that changed nothing (no tensors) changes nothing else
either. A rollback restores the version the session started from. Operations that change the weights
without a version to name them (`reset_tensors`, memory released without keeping the weights) mark the
version (`mark`) with a suffix such as `+reset`, so two different sets of weights are never served
under one name.

Session ids: `begin_weight_update` answers the id of the session it opened. A call that gives a
`session_id` runs only inside that session while it is open; otherwise (the session was committed,
aborted, rolled back or expired: a trainer's late bucket, or its abort after it gave up) it is refused
and changes nothing, neither the weights nor the session open now (it is not marked failed nor rolled
back: it belongs to a newer push). `end_weight_update` with a stale id is refused likewise, except an
abort of a session that already ended without a commit: its goal holds, so it answers success as a
no-op; an abort of a committed (or unknown) session is refused, so a trainer never mistakes a commit for
a rollback. Replies to stale calls say how the named session ended in `extra["session"]`. A call
without an id behaves as before ids existed (SGLang's callers send none): it runs in whatever session is
open. Only rank 0 keeps sessions: the other ranks follow its commit and rollback.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from hotswap import protocol as p
from hotswap.errors import HotswapError, shown
from hotswap.weights.ranks import WeightRanks
from hotswap.weights.rollback import HostArena, RollbackBuffer

log = logging.getLogger(__name__)

MAX_VERSION_CHARS = 256  # a version name rides on every output token, and in every streamed chunk's versions


def version_problem(version: object, field: str = "weight_version") -> str | None:
    """Why `version` cannot name the weights (None: it can, or it is not given); `field`: its name in the call."""
    if version is not None and len(str(version)) > MAX_VERSION_CHARS:
        return f"{field} has {len(str(version))} characters; at most {MAX_VERSION_CHARS}"
    return None


PAUSE = "pause_generation"
BEGIN = "begin_weight_update"
ENDED_KEPT = 64  # how many ended sessions' outcomes are remembered for the replies to their late calls

# how a session ended (`Sessions.ended`, and `extra["session"]` of a reply to a call naming it) -> the words for it
COMMITTED, ABORTED, ROLLED_BACK, EXPIRED = "committed", "aborted", "rolled_back", "expired"
ENDINGS = {COMMITTED: "it was committed", ABORTED: "it was aborted", ROLLED_BACK: "it was rolled back after a failure",
           EXPIRED: "it expired"}
UNKNOWN = "unknown"  # never opened here, or ended too long ago to be remembered


class UpdateFailed(HotswapError):
    """An update failed after validation began; the session rolls back."""


@dataclass(kw_only=True, slots=True)
class UpdateSession:
    explicit: bool  # opened by begin_weight_update / pause_generation (else: one call)
    opened_by: str
    rollback: RollbackBuffer
    base_version: str  # restored by a rollback
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    begun: bool = False  # begin_weight_update was called (possibly inside a pause)
    failure: str | None = None
    num_tensors: int = 0
    num_bytes: int = 0
    changed: bool = False  # some call copied tensors
    id: str = field(default_factory=lambda: secrets.token_hex(8))  # handed out by begin_weight_update
    paused_inside: bool = False  # generation was paused while this begun session was open: the pause outlives it


@dataclass(kw_only=True, slots=True)
class Sessions:
    ranks: WeightRanks
    device_budget_bytes: int  # saved originals kept on the device up to this, the rest in pinned host memory
    invalidate_cache: Callable[[], None]  # KV of the old weights is never matched again
    timeout_s: float
    synchronize: Callable[[], None] = lambda: None  # wait for the device's copies (a failed copy fails here)
    enable_rollback: bool = True
    arena: HostArena = field(default_factory=HostArena)  # pinned host for saved originals, kept across sessions (pinning is slow)
    # device memory a session's saved originals may fill before the budget (the KV pool's bytes when no request
    # holds a page: the scheduler's `lend_kv_pool`), asked at a session's first save; None: nothing to lend
    lend_scratch: Callable[[], torch.Tensor | None] = lambda: None
    weight_version: str = "default"
    session: UpdateSession | None = None
    expired_message: str | None = None  # told once to the next call: the last session expired
    expired_id: str | None = None  # that session's id
    ended: dict[str, str] = field(default_factory=dict)  # id -> how it ended (ENDINGS), the last ENDED_KEPT begun sessions

    # ---- state ------------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        """An explicit session is open: no batch may run."""
        return self.session is not None and self.session.explicit

    @property
    def begun(self) -> bool:
        return self.session is not None and self.session.begun

    @property
    def holds_changes(self) -> bool:
        """Uncommitted updates or a begun session: memory must not move under their saved originals."""
        s = self.session
        return s is not None and (s.begun or s.changed or not s.explicit)

    def _open(self, *, explicit: bool, opened_by: str, begun: bool = False) -> UpdateSession:
        rollback = RollbackBuffer(device_budget_bytes=self.device_budget_bytes, arena=self.arena, scratch=self.lend_scratch)
        self.session = UpdateSession(explicit=explicit, opened_by=opened_by, rollback=rollback, base_version=self.weight_version, begun=begun)
        return self.session

    def guard(self, session: UpdateSession, *, source_can_fail: bool) -> RollbackBuffer | None:
        """The buffer to save originals into when a later failure could strand this call's copies: inside an
        explicit session, when the source can still fail after the first copy, or when another rank can."""
        if self.enable_rollback and (session.explicit or source_can_fail or self.ranks.size > 1):
            return session.rollback
        return None

    # ---- one update call --------------------------------------------------------------------------

    def refusal(self, kind: str, weight_version: str | None, session_id: str | None) -> p.WeightUpdateOutput | None:
        """Why an update call may not run now, as its refusal (None: it may): a session that is not open, a bad
        version, an expired or failed session."""
        stale = self.stale(session_id)
        if stale is not None:
            return self.refuse_stale(f"{kind} refused: {stale}; weights unchanged", session_id)
        bad_version = version_problem(weight_version)
        if bad_version is not None:
            return self.refuse_update(f"{kind} refused: {bad_version}; weights unchanged", session_id)
        expired = self.take_expired()
        if expired is not None:
            return self.refuse(f"{kind} refused: {expired}")
        if self.session is not None and self.session.failure is not None:
            return self.refuse(f"{kind} refused: this weight-update session already failed: {self.session.failure}")
        return None

    def run(self, kind: str, weight_version: str | None, apply: Callable[[UpdateSession], tuple[int, int]], *,
            session_id: str | None = None, on_start: Callable[[], object] | None = None, sync: bool = True) -> p.WeightUpdateOutput:
        """Run one update call inside the open session or one of its own; commit or roll back. A call naming a
        session that is not open is refused and touches nothing. `on_start` runs once nothing refuses the call,
        before it changes anything (abort_all_requests' abort). `sync` False: the copies may still run when this
        returns (a call whose reply waits for them: scheduler/copy_replies.py)."""
        refused = self.refusal(kind, weight_version, session_id)
        if refused is not None:
            return refused
        if on_start is not None:
            on_start()
        implicit = self.session is None
        session = self.session if not implicit else self._open(explicit=False, opened_by="a single update")
        start = time.perf_counter()
        reason = None
        try:
            n, nbytes = apply(session)
            if sync:
                self.synchronize()
        except Exception as exc:
            reason = str(exc) if isinstance(exc, HotswapError) else f"{type(exc).__name__}: {exc}"
        reason = self.ranks.agree(reason)  # every rank loads its slices; any failure fails them all
        if reason is not None:
            if not sync:
                self.synchronize()  # what was launched before the failure has run before the caller hears of it
            restored = self.roll_back(session)
            if implicit:
                self.session = None
            else:
                session.failure = reason
            log.warning("%s failed: %s (rolled back %d tensors)", kind, reason, restored)
            where = "" if implicit else " The session is marked failed; end it with end_weight_update."
            return p.WeightUpdateOutput(success=False, message=f"{kind} failed: {reason}; weights unchanged.{where}",
                                        weight_version=self.weight_version, rolled_back=restored > 0)
        session.last_activity = time.monotonic()
        session.num_tensors += n
        session.num_bytes += nbytes
        session.changed = session.changed or n > 0
        if weight_version is not None:
            self.weight_version = str(weight_version)  # SGLang's rule: set when given, readable at once
        elapsed = time.perf_counter() - start
        # SGLang's http_server.py ends a versioned update's message so
        versioned = f" Weight version updated to {weight_version}." if weight_version is not None else ""
        if implicit:
            msg = self.commit()
            return p.WeightUpdateOutput(success=True, message=f"{kind}: updated {n} tensor(s); {msg}{versioned}",
                                        weight_version=self.weight_version, num_tensors=n, num_bytes=nbytes, elapsed_s=elapsed)
        return p.WeightUpdateOutput(success=True, message=f"{kind}: applied {n} tensor(s) inside the open session{versioned}",
                                    weight_version=self.weight_version, num_tensors=n, num_bytes=nbytes, elapsed_s=elapsed)

    def commit(self) -> str:
        """Close the open session keeping its updates (every rank drops its saved originals). Changed weights
        always invalidate the prefix cache, whatever the call's `flush_cache` said: KV the old weights computed is
        never matched again (SGLang keeps it with flush_cache=False; a request then reads it under the new
        version's label)."""
        s, self.session = self.session, None
        s.rollback.clear()
        self.ranks.commit()
        if not s.changed:
            return f"nothing to commit; weight version {self.weight_version}"
        self.invalidate_cache()
        return f"weight version {self.weight_version}, prefix cache flushed"

    def roll_back(self, s: UpdateSession) -> int:
        """Restore the session's saved originals (here and on every rank) and the version it started from."""
        self.ranks.rollback()
        self.weight_version = s.base_version
        return s.rollback.restore()

    def refuse(self, message: str) -> p.WeightUpdateOutput:
        return p.WeightUpdateOutput(success=False, message=message, weight_version=self.weight_version)

    def refuse_update(self, message: str, session_id: str | None = None) -> p.WeightUpdateOutput:
        """Refuse an update call; inside an explicit session the refused bucket fails the session (rolled
        back now, closed by end_weight_update), so ending it can never commit the other buckets alone. A call
        naming a session that is not open leaves the open one alone: it is not that session's bucket."""
        stale = self.stale(session_id)
        if stale is not None:
            return self.refuse_stale(f"{message}; besides, {stale}", session_id)
        s = self.session
        rolled_back = False
        if s is not None and s.explicit and s.failure is None:
            rolled_back = self.roll_back(s) > 0
            s.failure = message
            message += "; the open session is marked failed and rolled back: end it with end_weight_update"
        out = self.refuse(message)
        out.rolled_back = rolled_back
        return out

    # ---- session ids --------------------------------------------------------------------------------

    def stale(self, session_id: str | None) -> str | None:
        """Why a call naming `session_id` may not run (None: it names the open session, or none)."""
        if session_id is None or (self.session is not None and self.session.id == session_id):
            return None
        how = self.ended.get(session_id)
        return f"session {shown(session_id)} is not open: {ENDINGS[how] if how else 'it ended, was aborted or expired'}"

    def refuse_stale(self, message: str, session_id: str) -> p.WeightUpdateOutput:
        """The reply to a call of a session that is not open: nothing changed, the open session included."""
        if self.expired_id == session_id:  # its trainer hears of the expiry now
            message += f" ({self.take_expired()})"
        out = self.refuse(message + ("; the open session is untouched" if self.session is not None else ""))
        out.extra.session = self.ended.get(session_id, UNKNOWN)
        return out

    def _record_end(self, s: UpdateSession, how: str) -> None:
        if s.begun:  # only a begun session's id was handed out
            self.ended[s.id] = how
            while len(self.ended) > ENDED_KEPT:
                del self.ended[next(iter(self.ended))]

    # ---- explicit sessions ------------------------------------------------------------------------

    def begin(self) -> p.BeginWeightUpdateOutput:
        self.take_expired()
        s = self.session
        if s is not None:
            if s.opened_by == PAUSE and not s.begun:
                s.begun = True
                return p.BeginWeightUpdateOutput(success=True, message="weight-update session begun inside the paused generation",
                                                 session_id=s.id)
            return p.BeginWeightUpdateOutput(success=False,
                                             message=f"begin_weight_update refused: a session opened by {s.opened_by} is already open")
        s = self._open(explicit=True, opened_by=BEGIN, begun=True)
        return p.BeginWeightUpdateOutput(success=True, message="weight-update session open; generation holds until end_weight_update",
                                         session_id=s.id)

    def end(self, weight_version: str | None, abort: bool, session_id: str | None = None) -> p.WeightUpdateOutput:
        """Commit the open session, or roll it back (`abort`, or after a failure). With a `session_id` that
        is not open nothing changes: a commit is refused; an abort answers success (a no-op) when that
        session already ended without a commit, and is refused when it was committed or is unknown."""
        stale = self.stale(session_id)
        if stale is not None:
            how = self.ended.get(session_id)
            if abort and how in (ABORTED, ROLLED_BACK, EXPIRED):
                out = self.refuse_stale(f"end_weight_update(abort=True): nothing to abort, {stale}; its updates are not served", session_id)
                out.success = True
                return out
            what = "nothing aborted" if abort else "nothing committed"
            return self.refuse_stale(f"end_weight_update refused: {stale}; {what}", session_id)
        bad_version = version_problem(weight_version)
        if bad_version is not None and not abort:
            return self.refuse(f"end_weight_update refused: {bad_version}; the session stays open")
        expired = self.take_expired()
        if expired is not None:
            return self.refuse(f"end_weight_update: {expired}")
        s = self.session
        if s is None or not s.begun:
            return self.refuse("end_weight_update refused: no weight-update session is open")
        if abort or s.failure is not None:
            self.roll_back(s)
            self._record_end(s, ABORTED if abort else ROLLED_BACK)
            self._after_end(s)
            why = "aborted by the caller" + (f" after a failure: {s.failure}" if s.failure else "") if abort else f"rolled back: {s.failure}"
            return p.WeightUpdateOutput(success=abort, rolled_back=True, weight_version=self.weight_version,
                                        message=f"session {why}; weights are as before begin_weight_update")
        if weight_version is not None:
            self.weight_version = str(weight_version)
        n, nbytes, elapsed = s.num_tensors, s.num_bytes, time.monotonic() - s.started
        msg = self.commit()
        self._record_end(s, COMMITTED)
        self._after_end(s)
        return p.WeightUpdateOutput(success=True, message=f"session committed {n} tensor(s); {msg}", weight_version=self.weight_version,
                                    num_tensors=n, num_bytes=nbytes, elapsed_s=elapsed)

    def _after_end(self, s: UpdateSession) -> None:
        """A session begun inside a pause, or paused while open, leaves the pause holding (a fresh pause session) until
        continue."""
        self.session = None
        if s.opened_by == PAUSE or s.paused_inside:
            self._open(explicit=True, opened_by=PAUSE)

    def open_pause(self) -> None:
        """pause_generation: updates made during the pause form one session, committed at continue. A begun session
        open now stays as it is; the pause's own session opens when it ends (`_after_end`)."""
        if self.session is None:
            self._open(explicit=True, opened_by=PAUSE)
        else:
            self.session.paused_inside = True

    def close_pause(self) -> str | None:
        """continue_generation: commit the pause's updates (or roll back a failed pause session). Returns
        what happened, or None when it must be refused: a begun session is half-pushed and stays open."""
        s = self.session
        if s is None or s.opened_by != PAUSE:
            return "" if s is None or not s.begun else None
        if s.begun:
            return None
        if s.failure is not None:
            self.roll_back(s)
            self.session = None
            return f"the failed session was rolled back ({s.failure})"
        return self.commit()

    # ---- expiry and versions ----------------------------------------------------------------------

    def expire(self) -> bool:
        """Roll back and close a session whose trainer went silent (died or hung); True when one expired.

        A pause's own session never expires: a pause lasts until continue_generation, as in SGLang and vLLM, and
        the updates made in it were answered as applied. Rolling them back after a quiet spell (prime-rl resumes
        only once its slowest server has loaded, 720 s a try) served the old policy under the trainer's new step
        without a word. A trainer that dies mid-pause leaves the engine paused: requests sent meanwhile are refused
        after max_queue_wait_s, and continue_generation commits what was loaded. A session begun with
        begin_weight_update (inside a pause or not) expires: its trainer asked for push-or-nothing."""
        s = self.session
        if s is None or not s.explicit:
            return False
        if s.opened_by == PAUSE and not s.begun:
            return False
        idle = time.monotonic() - s.last_activity
        if idle < self.timeout_s:
            return False
        restored = self.roll_back(s)
        self.expired_message = (f"the weight-update session opened by {s.opened_by} expired after {idle:.0f} s without a call; "
                                f"{restored} tensor(s) were rolled back and serving resumed")
        log.warning(self.expired_message)
        self.expired_id = s.id
        self._record_end(s, EXPIRED)
        self.session = None
        return True

    def take_expired(self) -> str | None:
        msg, self.expired_message, self.expired_id = self.expired_message, None, None
        return msg

    def set_version(self, version: str) -> None:
        self.weight_version = str(version)

    def mark(self, suffix: str) -> None:
        """The weights changed without a version naming them: make that visible (`v` -> `v+reset`)."""
        if not self.weight_version.endswith(f"+{suffix}"):  # the same change twice gives the same weights
            self.weight_version = f"{self.weight_version}+{suffix}"
