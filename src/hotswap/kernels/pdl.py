"""Programmatic dependent launch (PDL, Hopper and later) for the decode-path kernels.

A decode step is a chain of a few hundred short kernels; between two of them the GPU drains one grid
and ramps the next, a few microseconds each time. Launched with PDL, a kernel's programs start while
the previous kernel still runs: they read what no earlier kernel writes (the weight tiles of a matmul,
the keys decode attention's splits find cached by earlier steps) and then wait (`gdc_wait`) until the
previous grid has finished and its writes are visible. Each kernel here signals `gdc_launch_dependents`
first and then waits, so a chain of short kernels runs several deep: each one's weight prefetch overlaps
the kernels before it (batch-1 decode 1,137 tokens/s when the signal came after the wait, 1,182 with it
first).

Every kernel launched with PDL waits in every program that does work before it exits, and in at least one
program of its grid, which keeps the ordering transitive: when a kernel's wait returns, every kernel before it
in the stream has finished. (Decode attention's unused KV splits exit without waiting; a grid ends only when
all its programs have, so one that waited is enough.) Kernels not
launched with PDL (cuBLAS, PyTorch) keep plain stream order. CUDA graphs keep the dependency as a
programmatic edge.

Only launches of at most `MAX_ROWS` tokens use it: a prefill's many-wave grids were slower with it on the
H100 (a 64x128-token prefill went from 240k to 161k tokens/s), and it is the short kernels of decode
steps whose gaps it closes (batch-1 decode 904 -> 1,104 tokens/s, Qwen3-0.6B shape).

`HOTSWAP_PDL=0` turns it off, `HOTSWAP_PDL_MAX_ROWS` moves the bound, `HOTSWAP_PDL_EARLY=0` signals after
the wait (the A/B switches of the benches).
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: no kernel is launched there
    triton = None

_ENABLED = os.environ.get("HOTSWAP_PDL", "1") != "0" and os.environ.get("TRITON_INTERPRET", "0") != "1"
MAX_ROWS = int(os.environ.get("HOTSWAP_PDL_MAX_ROWS", "64"))
#: Signal the next kernel before this one's wait rather than after it (each still waits before reading
#: what the previous one wrote).
EARLY_TRIGGER = tl.constexpr(os.environ.get("HOTSWAP_PDL_EARLY", "1") == "1") if triton is not None else False
_CAPABLE: dict[int, bool] = {}


def enabled(device: torch.device, rows: int) -> bool:
    """Whether a kernel over `rows` tokens on `device` is launched with PDL (a CUDA device of compute
    capability 9.0+)."""
    if not _ENABLED or rows > MAX_ROWS or device.type != "cuda":
        return False
    idx = device.index if device.index is not None else torch.cuda.current_device()
    ok = _CAPABLE.get(idx)
    if ok is None:
        ok = _CAPABLE[idx] = torch.cuda.get_device_capability(idx)[0] >= 9
    return ok


if triton is not None:

    @triton.jit
    def wait_previous(USE_PDL: tl.constexpr):
        """Wait until the previous kernel of the stream has finished (its writes visible) and let the next
        one start; a no-op for kernels launched without PDL. Every program calls it before reading what an earlier
        kernel wrote (decode attention's unused splits, which read nothing of it, exit without: the module notes)."""
        if USE_PDL:
            if EARLY_TRIGGER:
                tl.extra.cuda.gdc_launch_dependents()
                tl.extra.cuda.gdc_wait()
            else:
                tl.extra.cuda.gdc_wait()
                tl.extra.cuda.gdc_launch_dependents()
