"""Helpers for tests that run `hotswap serve` in a process of its own: a free port, the command's environment,
and a bounded wait for /health that reports the server's own output when it dies first."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import httpx

SRC = str(Path(__file__).resolve().parents[1] / "src")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_env(**extra: str) -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""), **extra)


def wait_healthy(proc: subprocess.Popen, url: str, timeout: float = 120.0, output: Callable[[], str] | None = None) -> None:
    """Until `url`/health answers 200; fails at once, with the server's output, if the process exits first."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, output() if output is not None else proc.communicate()[1]
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up" + ("\n" + output() if output is not None else "")
        time.sleep(0.1)
