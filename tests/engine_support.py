"""Helpers for tests that drive an Engine on the CPU: the engine they build, and faults injected into its
disk reads."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from hotswap import Engine
from hotswap.weights import fast_reader


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
