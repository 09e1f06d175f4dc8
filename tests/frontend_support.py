"""Helpers for tests that drive an engine behind front end processes the way `hotswap serve` launches it (a
FrontendGroup on one bound socket, over a pipe to the engine in this process): starting the group, steering a
connection to one worker, one request on a fresh connection; and the two ends of one pipe in this process."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import signal
from collections.abc import Iterator

import httpx

from hotswap.engine.remote import RemoteEngine
from hotswap.engine.service import EngineService
from hotswap.server.frontend_process import FrontendGroup, FrontendOptions
from hotswap.server.launch import bind_socket


@contextlib.contextmanager
def launched(engine, workers: int = 2, **options) -> Iterator[FrontendGroup]:
    """`engine` served by `workers` front end processes on a fresh loopback socket, as serve starts them; `options`
    are FrontendOptions fields. Every worker answers /health before the block runs."""
    sock = bind_socket("127.0.0.1", 0)
    group = FrontendGroup(engine, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1], **options), workers=workers)
    try:
        group.start()
        for front in group.fronts:
            front.wait_healthy()
        yield group
    finally:
        group.stop(timeout=10)


@contextlib.contextmanager
def only_worker(group: FrontendGroup, index: int):
    """Every connection made meanwhile is accepted by worker `index`: the others are stopped (SIGSTOP) until the block ends."""
    others = [f.process.pid for i, f in enumerate(group.fronts) if i != index and f.process.is_alive()]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)


def send(url: str, method: str, path: str, headers: dict | None = None, timeout: float = 30, **kw) -> httpx.Response:
    """One request on a fresh connection (`headers` as given: callers add their keys)."""
    with httpx.Client(base_url=url, timeout=timeout) as c:
        return c.request(method, path, headers=headers or {}, **kw)


@contextlib.contextmanager
def linked_pipe(engine) -> Iterator[tuple[EngineService, RemoteEngine]]:
    """`engine`'s EngineService and a RemoteEngine on the two ends of a fresh pipe, both in this process."""
    ours, theirs = mp.Pipe(duplex=True)
    service = EngineService(engine, ours).start()
    remote = RemoteEngine(theirs, service.info)
    try:
        yield service, remote
    finally:
        remote.shutdown()
        service.close()
