"""The CopyReplies component: a tensor update's reply is sent once its copy has run on the device, and the scheduler
thread takes the next call meanwhile.

A trainer pushing buckets keeps calls in flight (IPCWeightPusher's `calls_in_flight`, slime's in-flight buckets) so
that bucket k+1 is on its way while the engine loads bucket k. An engine that synchronises the device inside each
call still loads them one at a time with its own fixed work between the copies (taking the call, matching the
names, committing, replying: ~0.45 ms a call on an H100 beside a 0.43-ms copy of a 512 MiB bucket). Here a call on
one GPU rank (inside a session or not) launches its copy, records an event and returns; the next call already queued
is taken and its copy queued behind, and each reply goes out, in order, once its event completed (a call refused or
failed meanwhile replies behind them). The reply still means what it meant: the bytes are in the weights and the
caller may reuse its buffers. Until then the call's matched tensors (the trainer's mapped memory among them) are held here.

Steps of generation launched meanwhile run after the copies on the same stream, under the version the call set;
any other control request waits for every copy first (`settle_all`)."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

from hotswap import protocol as p


class CopyDone(Protocol):
    """What `torch.cuda.Event` offers here (tests stand in for the device with their own)."""

    def query(self) -> bool: ...
    def synchronize(self) -> None: ...


def recorded_event() -> CopyDone:
    """An event recorded on the current stream, after the copies just launched."""
    done = torch.cuda.Event()
    done.record()
    return done


@dataclass(slots=True)
class PendingCopy:
    done: CopyDone  # recorded on the copying stream after the call's last copy
    reply: Future  # resolved with `out` once `done` completed
    out: p.WeightUpdateOutput
    started: float  # perf_counter when the call started: its elapsed_s is taken when the copy completes
    keep_alive: object  # what the copies read (sources, mapped trainer storages): freed only after them


class CopyReplies:
    """Replies of calls whose copies may still run, oldest first."""

    def __init__(self, mark_done: Callable[[], CopyDone] = recorded_event) -> None:
        self.mark_done = mark_done
        self.pending: deque[PendingCopy] = deque()

    def defer(self, out: p.WeightUpdateOutput, started: float, keep_alive: object) -> Future:
        """The reply of a call whose copies were just launched on the current stream, resolved when they ran."""
        reply: Future = Future()
        self.pending.append(PendingCopy(done=self.mark_done(), reply=reply, out=out, started=started, keep_alive=keep_alive))
        return reply

    def settle(self) -> None:
        """Send the replies whose copies ran, in order (the first still running stops it)."""
        while self.pending and self.pending[0].done.query():
            self._resolve(self.pending.popleft())

    def wait_oldest(self, interrupted: Callable[[], bool]) -> None:
        """Wait for the oldest call's copy, or until `interrupted()` (a request arrived: take it first, its copy can
        queue behind), then settle. Bounded by the copy: the scheduler's watchdog covers a device that hangs."""
        done = self.pending[0].done
        while not done.query() and not interrupted():
            time.sleep(0)  # let the threads that bring the next call run
        self.settle()

    def settle_all(self) -> None:
        """Wait for every copy and send every reply: before anything but another such call or a generate request."""
        for pending in self.pending:  # on one stream the first wait covers the rest
            pending.done.synchronize()
        self.settle()

    def fail_all(self, message: str) -> None:
        """The loop stopped: each caller learns its copy's outcome is unknown."""
        while self.pending:
            pending = self.pending.popleft()
            pending.reply.set_result(p.WeightUpdateOutput(success=False, message=f"outcome unknown: {message}",
                                                          weight_version=pending.out.weight_version))

    @staticmethod
    def _resolve(pending: PendingCopy) -> None:
        if pending.out.success:  # a refusal held only to keep the replies' order took no time of its own
            pending.out.elapsed_s = time.perf_counter() - pending.started
        pending.reply.set_result(pending.out)
