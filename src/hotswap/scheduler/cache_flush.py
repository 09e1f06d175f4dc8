"""flush_cache: drop every cached prefix, SGLang's rules and its `timeout`.

Without a timeout a flush acts at once or is refused while requests run (SGLang's rule; waiting requests hold
no pages of the prefix cache, so they do not stop it). With `timeout_s > 0` a flush met by running requests
waits for them, up to `timeout_s`, and acts the first time none runs; new requests are still admitted meanwhile
(as in SGLang: a flush is cache upkeep and does not stall the rollout). One such flush waits at a time: a second
is refused by name, as SGLang refuses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from hotswap import protocol as p


@dataclass(kw_only=True, slots=True)
class CacheFlush:
    num_running: Callable[[], int]
    invalidate_cache: Callable[[], None]
    retract_all: Callable[[], None]
    waiting: tuple[Future, float, float] | None = None  # a flush waiting for running requests: (its reply, deadline, timeout_s)

    def flush(self) -> bool:
        """Drop every cached prefix; refused (False) while requests run."""
        if self.num_running():
            return False
        self.invalidate_cache()
        return True

    def handle(self, req: p.FlushCacheRequest) -> p.ControlOutput | Future:
        if req.timeout_s < 0:
            return p.ControlOutput(success=False, message=f"flush_cache timeout must be >= 0 seconds, got {req.timeout_s:g}")
        if req.reset_running_requests:
            self.retract_all()  # their KV goes with the cache; they recompute it (with the weights then served)
        if self.flush():
            return p.ControlOutput(success=True, message="cache flushed")
        if req.timeout_s == 0:
            return p.ControlOutput(success=False, message=f"cannot flush the cache while {self.num_running()} request(s) are running")
        if self.waiting is not None:
            return p.ControlOutput(success=False, message="another flush_cache is already waiting for the running requests")
        reply: Future = Future()
        self.waiting = (reply, time.monotonic() + req.timeout_s, req.timeout_s)
        return reply

    def settle(self) -> None:
        """Called by the scheduler loop between steps: the waiting flush acts once no request runs, or is refused
        at its deadline."""
        if self.waiting is None:
            return
        reply, deadline, timeout_s = self.waiting
        if self.flush():
            self.waiting = None
            reply.set_result(p.ControlOutput(success=True, message="cache flushed (after the running requests finished)"))
        elif time.monotonic() >= deadline:
            self.waiting = None
            reply.set_result(p.ControlOutput(success=False, message=f"cannot flush the cache: {self.num_running()} request(s) were "
                                                                    f"still running after the timeout of {timeout_s:g} s"))

    def fail_waiting(self, reason: str) -> None:
        """The loop stops: the waiting flush is answered with the reason instead of never."""
        if self.waiting is not None:
            reply, self.waiting = self.waiting[0], None
            reply.set_result(p.ControlOutput(success=False, message=f"flush_cache not run: {reason}"))
