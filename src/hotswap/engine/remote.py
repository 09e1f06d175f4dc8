"""`RemoteEngine`: the EngineAPI in a process other than the engine's, over a pipe to its EngineService
(engine/service.py). Tokenization, request preparation, output assembly and streamed detokenization run
here; the scheduler and the model stay in the engine's process. `hotswap serve` runs the
HTTP server on one."""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from multiprocessing.reduction import ForkingPickler

import torch

from hotswap import protocol as p
from hotswap.cache.page_allocator import PoolCapacity
from hotswap.engine.api import EngineAPI
from hotswap.engine.service import EngineInfo, close_pipe, outputs_from_rows
from hotswap.engine.tokenizer import load_tokenizer
from hotswap.errors import EngineUnavailableError, HotswapError
from hotswap.scheduler.detokenizer import detokenizer_for

log = logging.getLogger("hotswap.engine")


class RemoteScheduler:
    """The SchedulerPort of a RemoteEngine: requests go down the pipe; replies resolve their Futures and each
    step's outputs reach their requests' sinks, then each consumer's flush once, as the Scheduler does."""

    def __init__(self, conn: Connection, capacity: PoolCapacity, on_close: Callable[[], None] | None = None,
                 on_model_path: Callable[[str], None] | None = None):
        self._conn = conn
        self._capacity = capacity
        self._on_close = on_close
        self._on_model_path = on_model_path  # another front end's disk update changed the served folder
        self._lock = threading.Lock()  # guards what follows
        self._send_lock = threading.Lock()  # one message at a time down the pipe
        self._ids = itertools.count()
        self._calls: dict[int, Future] = {}
        # rid -> the (sink, flush) of each request of that rid not finished yet, oldest first: a client may re-send a rid as soon
        # as its cancelled call sent the abort, before the aborted request's last output is back; the engine ends the old
        # one first (the abort goes down the pipe ahead of the new request), so outputs go to the oldest route
        self._routes: dict[str, deque[tuple[Callable, Callable | None]]] = {}
        self.dead: str | None = None
        self._reader = threading.Thread(target=self._read, name="hotswap-remote-in", daemon=True)
        self._reader.start()

    def capacity(self) -> PoolCapacity:
        return self._capacity  # fixed for the engine's life

    def submit(self, request) -> Future:
        """As Scheduler.submit. A request that cannot be sent fails its Future; its generate requests, if any,
        end aborted (503, naming why) as the Scheduler ends those it can no longer take."""
        fut: Future = Future()
        if isinstance(request, p.GenerateBatch):
            routes = [(r.rid, (r.sink, r.flush)) for r in request.requests]
            request = p.GenerateBatch(requests=[dataclasses.replace(r, sink=None, flush=None) for r in request.requests])
        else:
            routes = []
        with self._lock:
            reason = self.dead
            if reason is None:
                for rid, route in routes:
                    self._routes.setdefault(rid, deque()).append(route)
                call_id = next(self._ids)
                self._calls[call_id] = fut
        if reason is None:
            error: HotswapError | None = None
            try:
                blob = ForkingPickler.dumps((call_id, request))
            except Exception as exc:  # noqa: BLE001 - the request does not pickle (whatever it raises: a ValueError too)
                error = HotswapError(f"cannot send {type(request).__name__} to the engine process: {type(exc).__name__}: {exc}")
            else:
                try:
                    with self._send_lock:
                        self._conn.send_bytes(blob)
                    return fut
                except (OSError, ValueError) as exc:  # the pipe is gone
                    error = EngineUnavailableError(f"the engine process is unreachable: {exc}")
            with self._lock:
                self._calls.pop(call_id, None)
                # never sent: no output of the engine will come for them (those _fail_all ended already are left out)
                routes = [(rid, route) for rid, route in routes if self._drop_route(rid, route)]
        else:
            error = EngineUnavailableError(reason)
        fut.set_exception(error)
        self._hand_over([(p.aborted_output(rid, str(error), 503), route) for rid, route in routes])
        return fut

    def _drop_route(self, rid: str, route: tuple[Callable, Callable | None]) -> bool:
        """Under the lock: forget `route` of `rid` (a request that was never sent); False if it was gone already."""
        held = self._routes.get(rid)
        if held is None or route not in held:
            return False
        held.remove(route)
        if not held:
            del self._routes[rid]
        return True

    def close(self, timeout: float = 10.0) -> None:
        close_pipe(self._conn, (self._reader,), timeout)

    def _read(self) -> None:
        reason = "the engine process closed the connection"
        try:
            while True:
                try:
                    msg = self._conn.recv()
                except (EOFError, OSError):
                    return
                if msg[0] == "outputs":
                    self._deliver(outputs_from_rows(msg[1], msg[2]))
                elif msg[0] == "model_path":
                    if self._on_model_path is not None:
                        self._on_model_path(msg[1])
                else:
                    _, call_id, output, error = msg
                    with self._lock:
                        fut = self._calls.pop(call_id, None)
                    if fut is not None:
                        if error is not None:
                            fut.set_exception(error)
                        else:
                            fut.set_result(output)
        except Exception as exc:  # noqa: BLE001 - a message that does not unpickle: the stream is no longer in order
            log.exception("the front end's reader stopped")
            reason = f"the front end's reader stopped: {type(exc).__name__}: {exc}"
        finally:
            self._fail_all(reason)

    def _deliver(self, outs: list[p.GenerateOutput]) -> None:
        """As the Scheduler's OutputStreamer: each output to the oldest unfinished request of its rid (its last
        output retires that route)."""
        with self._lock:  # once per step, not per output
            routed = [(out, self._route(out)) for out in outs]
        self._hand_over(routed)

    def _route(self, out: p.GenerateOutput) -> tuple[Callable, Callable | None] | None:
        """Under the lock: where `out` goes (None: its request was ended here already)."""
        held = self._routes.get(out.rid)
        if not held:
            return None
        if not out.finished:
            return held[0]
        route = held.popleft()
        if not held:
            del self._routes[out.rid]
        return route

    def _hand_over(self, routed: list[tuple[p.GenerateOutput, tuple[Callable, Callable | None] | None]]) -> None:
        """Each output to its sink, then each consumer's flush once; a failing consumer costs only itself."""
        flushes: dict = {}
        for out, route in routed:
            if route is None:
                continue
            sink, flush = route
            try:
                sink(out)
            except Exception:  # noqa: BLE001
                log.exception("delivering an output of %s failed", out.rid)
            if flush is not None:
                flushes[flush] = None
        for flush in flushes:
            try:
                flush()
            except Exception:  # noqa: BLE001
                log.exception("a consumer's flush failed")

    def _fail_all(self, reason: str) -> None:
        """The pipe is gone: every call waiting fails and every request still running ends aborted, naming why."""
        with self._lock:
            self.dead = reason
            calls, self._calls = self._calls, {}
            routes, self._routes = self._routes, {}
        for fut in calls.values():
            if not fut.done():
                fut.set_exception(EngineUnavailableError(reason))
        self._hand_over([(p.aborted_output(rid, reason, 503), route) for rid, held in routes.items() for route in held])
        if self._on_close is not None:
            self._on_close()


class RemoteEngine(EngineAPI):
    """The EngineAPI of an engine in another process (`info` is what its EngineService sent). `on_close` runs
    once if the engine's side of the pipe closes (the front end should then exit)."""

    def __init__(self, conn: Connection, info: EngineInfo, on_close: Callable[[], None] | None = None):
        tokenizer = load_tokenizer(info.config)
        scheduler = RemoteScheduler(conn, info.capacity, on_close, on_model_path=self._follow_model_path)
        super().__init__(info.config, info.model_config, torch.device(info.device), tokenizer, scheduler,
                         functools.partial(detokenizer_for, tokenizer))
        self.model_path = info.model_path
        self.accelerator = info.accelerator

    def _follow_model_path(self, path: str) -> None:
        self.model_path = path

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.close()
