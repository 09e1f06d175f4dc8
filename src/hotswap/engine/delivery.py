"""Hand-off of outputs from the scheduler thread to their consumers.

The scheduler calls a request's `sink` for each output and, once per step, its `flush`. For asyncio
consumers the outputs of every request on one event loop wait in that loop's `LoopMailbox` and cross the
thread boundary in one `call_soon_threadsafe` per step, not one per token per request. A loop that has
closed (a consumer that stopped early inside `asyncio.run()`) is never called into: its requests are
aborted, and nothing else is touched."""

from __future__ import annotations

import asyncio
import threading
import weakref
from collections import deque
from collections.abc import Callable

from hotswap import protocol as p


class CallInbox:
    """One generate call's outputs on the consumer's loop: appended by the mailbox, awaited by the call."""

    __slots__ = ("items", "event")

    def __init__(self) -> None:
        self.items: deque[p.GenerateOutput] = deque()
        self.event = asyncio.Event()

    def put(self, out: p.GenerateOutput) -> None:
        self.items.append(out)
        self.event.set()

    async def take(self) -> list[p.GenerateOutput]:
        """Everything delivered so far (waits for at least one output)."""
        while not self.items:
            self.event.clear()
            await self.event.wait()
        items = list(self.items)
        self.items.clear()
        return items


class LoopMailbox:
    """Outputs bound for one event loop, handed over once per scheduler step."""

    def __init__(self, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]):
        self._loop = weakref.ref(loop)
        self._abort = abort  # rid -> abort that request (the scheduler's inbox; never blocks)
        self._lock = threading.Lock()
        self._items: list[tuple[CallInbox, p.GenerateOutput]] = []
        self._scheduled = False
        self._closed = False

    def sink(self, inbox: CallInbox) -> Callable[[p.GenerateOutput], None]:
        def put(out: p.GenerateOutput) -> None:  # scheduler thread
            if self._closed:
                if not out.finished:
                    self._abort(out.rid)
                return
            with self._lock:
                self._items.append((inbox, out))
        return put

    def flush(self) -> None:
        """Scheduler thread, once per step: wake the loop if anything is waiting and no wake-up is due."""
        loop = self._loop()
        with self._lock:
            if self._closed or not self._items or (self._scheduled and loop is not None and not loop.is_closed()):
                return
            self._scheduled = True
        try:
            if loop is None or loop.is_closed():
                raise RuntimeError("the event loop is closed")
            loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # the loop is closed: its consumers are gone; abort only their requests
            self.discard()

    def discard(self) -> None:
        """The loop closed: drop what waits for it (which holds the loop through its consumers' events) and abort
        the requests still running for it. Nothing is delivered here any more."""
        self._closed = True
        with self._lock:
            items, self._items = self._items, []
        for rid in {out.rid for _, out in items if not out.finished}:
            self._abort(rid)

    def _drain(self) -> None:
        """On the loop: deliver everything gathered since the last drain."""
        with self._lock:
            items, self._items = self._items, []
            self._scheduled = False
        for inbox, out in items:
            inbox.put(out)


class Mailboxes:
    """One LoopMailbox per live event loop."""

    def __init__(self, abort: Callable[[str], None]):
        self._abort = abort
        self._lock = threading.Lock()
        self._boxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, LoopMailbox] = weakref.WeakKeyDictionary()

    def for_running_loop(self) -> LoopMailbox:
        """This loop's mailbox. A new loop's first call also drops the mailboxes of loops that closed: one whose wake-up
        was scheduled just before its loop closed (`run_until_complete` then `close`, or `asyncio.run`, right after a
        cancelled call) still holds that step's outputs, whose consumers' events hold the closed loop, so its weak key
        never dies and each such loop stayed for good."""
        loop = asyncio.get_running_loop()
        with self._lock:
            box = self._boxes.get(loop)
            if box is not None:
                return box
            closed = [old for old in self._boxes if old.is_closed()]
            stale = [self._boxes.pop(old) for old in closed]
            box = self._boxes[loop] = LoopMailbox(loop, self._abort)
        for old_box in stale:
            old_box.discard()
        return box
