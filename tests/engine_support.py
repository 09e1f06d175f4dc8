"""Helpers for tests that drive an Engine on the CPU: the engine they build, and faults injected into its
disk reads."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable

import httpx
import pytest

from hotswap import Engine
from hotswap.weights import fast_reader


def sse_events(lines: Iterable[str]) -> list[dict]:
    """An SSE body's lines as JSON events; it must end with [DONE], carry nothing after it and no error event."""
    events, done = [], False
    for line in lines:
        if not line:
            continue
        assert line.startswith("data: ") and not done, line
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[len("data: "):])
        assert "error" not in event, event
        events.append(event)
    assert done, "the stream did not end with [DONE]"
    return events


def wait_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Wait until nothing runs or waits (a request just aborted or refused may take a step to go)."""
    deadline = time.monotonic() + timeout
    while (load := engine.get_load()).num_running or load.num_waiting:
        assert time.monotonic() < deadline, f"engine not idle: {load}"
        time.sleep(0.02)


def make_engine(path, **options) -> Engine:
    """A CPU engine on checkpoint `path` with 4-token pages (short prompts span several pages); `options`
    are Engine arguments."""
    options.setdefault("page_size", 4)
    return Engine(str(path), device="cpu", **options)


def fail_disk_read(monkeypatch: pytest.MonkeyPatch, at: int) -> Callable:
    """Make the `at`-th (from 0) window the fast reader reads raise OSError("injected I/O error"); the
    others read as usual. Returns the real read function, to put back mid-test."""
    real, calls = fast_reader._read_into, iter(range(10**6))

    def failing(fd, view, offset):
        if next(calls) == at:
            raise OSError("injected I/O error")
        real(fd, view, offset)

    monkeypatch.setattr(fast_reader, "_read_into", failing)
    return real


def generate_in_background(eng: Engine, client: httpx.Client, body: dict) -> tuple[threading.Thread, dict]:
    """POST /generate from a thread; returns once the engine runs the request (a bounded wait). The reply
    is in the dict's "r" once the thread ends."""
    results: dict = {}
    t = threading.Thread(target=lambda: results.setdefault("r", client.post("/generate", json=body)))
    t.start()
    wait_running(eng, 1)
    return t, results


def wait_running(engine: Engine, n: int, timeout: float = 20.0) -> None:
    """Wait until `n` requests run (a bounded wait)."""
    deadline = time.monotonic() + timeout
    while engine.get_load().num_running < n:
        assert time.monotonic() < deadline, f"{n} request(s) never ran: {engine.get_load()}"
        time.sleep(0.005)


# 2 prompts x n = 3, streamed over /v1/completions: six engine requests behind one connection
SIX_STREAMS_BODY = json.dumps({"prompt": ["Alice likes 12 apples", "Bob sees"], "n": 3, "max_tokens": 400, "temperature": 0.8,
                               "seed": 1, "ignore_eos": True, "stream": True}).encode()


def read_first_event(sock) -> bytes:
    """What a raw socket receives up to and with the first SSE event of the reply."""
    got = b""
    while b"data: " not in got:
        got += sock.recv(4096)
    return got


def close_with_reset(sock) -> None:
    """Close a raw socket with RST (linger 0), as a killed client's kernel does."""
    import socket
    import struct

    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()
