"""The scheduler's watchdog: a forward step that runs longer than `step_timeout_s` (SGLang's `watchdog_timeout`,
300 s) marks the engine failed, so `hotswap serve` (which polls `Engine.failure()`) drains and exits non-zero, as
SGLang's scheduler watchdog ends its server (`ProcessWatchdog`: SIGQUIT to the launcher when `forward_ct` stops
moving while a batch runs). It covers what no collective's timeout does: a hung kernel, or a device sync that never
returns, on a single GPU or on rank 0 of an NCCL group. Idle time and control requests (weight loads, bounded by
their own timeouts) are not watched: only the scheduler thread's launch and read-back of a step.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

log = logging.getLogger(__name__)


@dataclass(kw_only=True)
class StepWatchdog:
    timeout_s: float
    # why the engine failed: a step ran past the bound (set once, never cleared)
    expired: str | None = field(init=False, default=None)
    _since: float | None = field(init=False, default=None)  # when the step part now running began (monotonic), None while none runs
    _what: str = field(init=False, default="")
    _stop: threading.Event = field(init=False, default_factory=threading.Event)
    _thread: threading.Thread | None = field(init=False, default=None)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._watch, name="hotswap-step-watchdog", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    @contextlib.contextmanager
    def watching(self, what: str) -> Iterator[None]:
        """Bound the scheduler thread's `what` (a step's launch or read-back) by `timeout_s`."""
        self._what, self._since = what, time.monotonic()
        try:
            yield
        finally:
            self._since = None

    def _watch(self) -> None:
        # checked four times a bound: a step is caught within 1.25 bounds of its start
        while self.expired is None and not self._stop.wait(self.timeout_s / 4):
            since = self._since
            if since is not None and time.monotonic() - since > self.timeout_s:
                self.expired = (f"the scheduler's watchdog: {self._what} has run for more than {self.timeout_s:g} s "
                                "(step_timeout_s, SGLang's watchdog_timeout): the device or a rank is hung; restart the engine")
                log.error(self.expired)
