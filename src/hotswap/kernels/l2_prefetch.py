"""A small batch's MLP weights asked of L2 while its decode attention leaves HBM idle.

At batch 1 a 0.6B layer's decode attention and o_proj hold the decode graph's critical path for ~8 us (H100, fortieth
session: 6.37 + 1.86 us a layer) over under 1 MB of KV: latency, with the memory bus nearly idle. The MLP after them
reads 19 MB of weights and takes 5.82 + 4.61 us on that path against 4.2 + 2.1 us of bytes. Forked off the step's
stream once the q/k/v matmul has run, a kernel on a side stream asks L2 for the MLP's weights (TMA bulk prefetches:
fire and forget, nothing waits for them), so the gate/up and down matmuls find them there. The side stream joins the
step's stream at the end of the forward, so a CUDA graph captures the branch whole.

Only a layer whose two weights fit in half the L2 asks (the 0.6B's 19 MB of 50 MB; the 1.7B's 75 MB and larger do not),
and only steps of at most `MAX_ROWS` tokens fork it: at batch 64 attention streams its KV near the bandwidth, and the same
prefetch (the layer's o_proj, gate/up and down weights) lost 1.3 % there (thirty-fifth session). Off by default until
measured at small batches: `HOTSWAP_L2_PREFETCH=1` turns it on, `HOTSWAP_L2_PREFETCH_MAX_ROWS` moves the bound.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hotswap.kernels.sm_count import device_properties

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: no kernel is launched there
    triton = None

ENABLED = os.environ.get("HOTSWAP_L2_PREFETCH", "0") == "1"
MAX_ROWS = int(os.environ.get("HOTSWAP_L2_PREFETCH_MAX_ROWS", "4"))
#: Bytes one bulk prefetch asks for; a program's 32 lanes ask for 32 such chunks (512 KiB).
CHUNK = 16384
_LANES = 32


def _budget(device: torch.device) -> int:
    """Bytes a layer may ask for: half the device's L2 where it has TMA bulk prefetches (compute capability 9.0+),
    else 0."""
    props = device_properties(device)
    return props.L2_cache_size // 2 if props.major >= 9 else 0


def wanted(x: torch.Tensor) -> bool:
    """Whether a forward over `x` (its tokens in dim 0) forks the prefetches: on, at most MAX_ROWS tokens, and a
    device with TMA bulk prefetches."""
    if not ENABLED or triton is None or x.device.type != "cuda" or x.shape[0] > MAX_ROWS:
        return False
    return _budget(x.device) > 0


if triton is not None:

    @triton.jit
    def _ask_l2(ptrs, nbytes):
        """One TMA bulk prefetch into L2 of `nbytes` at each of `ptrs` (16-byte aligned, a multiple of 16 bytes); a
        lane with `nbytes` 0 asks nothing."""
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.u32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
            "=r,l,r", [ptrs, nbytes], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _spans(nbytes, program, CHUNK_BYTES: tl.constexpr, LANES: tl.constexpr):
        """(byte offset, bytes) lane i of `program` asks for: chunk program * LANES + i of `nbytes`, 0 bytes past them."""
        offs = (program * LANES + tl.arange(0, LANES)).to(tl.int64) * CHUNK_BYTES
        size = tl.minimum(nbytes - offs, CHUNK_BYTES)
        return offs, tl.where(size > 0, size, 0).to(tl.int32)

    @triton.jit
    def _chunks(BASE, nbytes, program, CHUNK_BYTES: tl.constexpr, LANES: tl.constexpr):
        """`program`'s lanes ask L2 for their `_spans` of the `nbytes` at BASE."""
        offs, size = _spans(nbytes, program, CHUNK_BYTES, LANES)
        _ask_l2(BASE.to(tl.pointer_type(tl.uint8)) + offs, size)

    @triton.jit
    def _prefetch_kernel(A, a_bytes, a_programs, B, b_bytes, CHUNK_BYTES: tl.constexpr, LANES: tl.constexpr):
        """Programs [0, a_programs) ask L2 for A's bytes, the rest for B's."""
        pid = tl.program_id(0)
        if pid < a_programs:
            _chunks(A, a_bytes, pid, CHUNK_BYTES, LANES)
        else:
            _chunks(B, b_bytes, pid - a_programs, CHUNK_BYTES, LANES)


def _programs(nbytes: int) -> int:
    return -(-nbytes // (CHUNK * _LANES))


def _asked_bytes(t: torch.Tensor) -> int:
    """The bytes of `t` a prefetch asks for: all of a contiguous, 16-byte aligned tensor (rounded down to 16), else
    none (a bulk prefetch's address and size are multiples of 16)."""
    if not t.is_contiguous() or t.data_ptr() % 16:
        return 0
    return t.numel() * t.element_size() // 16 * 16


def fits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the bytes asked of `a` and `b` fit the L2 budget (past it they would evict each other)."""
    return _asked_bytes(a) + _asked_bytes(b) <= _budget(a.device)


def prefetch(a: torch.Tensor, b: torch.Tensor) -> None:
    """Ask L2 for the bytes of `a` and `b` on the current stream; the kernel ends once the prefetches are issued."""
    a_bytes, b_bytes = _asked_bytes(a), _asked_bytes(b)
    a_programs = _programs(a_bytes)
    grid = (a_programs + _programs(b_bytes),)
    if grid[0]:
        _prefetch_kernel[grid](a, a_bytes, a_programs, b, b_bytes, CHUNK_BYTES=CHUNK, LANES=_LANES, num_warps=1)


class SideStream:
    """The prefetches' stream: `ask` forks it off the current stream (it waits for what that stream has queued),
    `join` makes the current stream wait for it, so a captured graph holds the branch between the two."""

    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}
        self._pending: list[torch.cuda.Stream] = []

    def ask(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Fork a prefetch of `a` and `b` where they `fit`."""
        if not fits(a, b):
            return
        side = self._streams.get(a.device)
        if side is None:
            side = self._streams[a.device] = torch.cuda.Stream(a.device)
        side.wait_stream(torch.cuda.current_stream(a.device))
        with torch.cuda.stream(side):
            prefetch(a, b)
        if side not in self._pending:
            self._pending.append(side)

    def join(self) -> None:
        for side in self._pending:
            torch.cuda.current_stream(side.device).wait_stream(side)
        self._pending.clear()


@dataclass(frozen=True)
class Ahead:
    """Two weights asked of L2 on `side` once the q/k/v matmul before them is queued (the MLP's gate/up and down)."""

    side: SideStream
    first: torch.Tensor
    second: torch.Tensor

    def ask(self) -> None:
        self.side.ask(self.first, self.second)
