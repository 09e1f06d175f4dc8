"""Decode matmuls of a few rows: y = x @ W^T (+ bias) for 2 to `MAX_ROWS` rows, launched with PDL.

At decode batches of a few dozen rows a layer's matmuls still only read their weights, and cuBLAS reaches
about 40 % of HBM bandwidth there on a 0.6B model's shapes (the fifth and twenty-second sessions'
profiles). Its kernels take no part in programmatic dependent launch (kernels/pdl.py), so each one starts
cold after the kernel before it has drained. Here each program owns a [BLOCK_N, K / SPLIT_K] slice of W:
it asks L2 for its first weight lines before waiting on the previous kernel (nothing in a decode step
writes W), then runs a pipelined tensor-core loop with W as the MMA's first operand and the few activation
rows as the second ("swap AB": the tensor cores want 64 rows, the batch has fewer). Shapes with few
column tiles (o_proj and down_proj have N = hidden) split K over several programs; the last program of a
tile to finish (kernels/arrival.py) sums the partials in a fixed order, so results do not depend on which
program finished first.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from hotswap.kernels import arrival, pdl

try:
    import triton
    import triton.language as tl

    from hotswap.kernels.pdl import wait_previous
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None

#: Most rows these kernels take; larger batches stay on cuBLAS. `HOTSWAP_ROWS_MATMUL=0` turns them off
#: (the A/B switch of the benches).
MAX_ROWS = 64
#: Largest weight these kernels take. Past it a program's slice is long enough that cuBLAS's grids over every SM
#: read it as fast or faster (H100, 8B shape: batch 16 at 83.7 % of the roofline with them, 85.2 % without; batch 64
#: 73.6 against 73.9), while at the 0.6B's 4-13 MB they win on fixed per-launch cost.
MAX_WEIGHT_BYTES = 16 << 20
ENABLED = os.environ.get("HOTSWAP_ROWS_MATMUL", "1") != "0"
#: Weight bytes a line of the L2 prefetch covers.
_LINE = 128


def enabled(rows: int, dtype: torch.dtype, device: torch.device) -> bool:
    """For half-precision CUDA batches of 2 to MAX_ROWS rows (one row has kernels/skinny_matmul.py)."""
    return (ENABLED and 2 <= rows <= MAX_ROWS and triton is not None and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16))


@dataclass(frozen=True)
class Tiles:
    """A launch's tiling (four warps a program): BLOCK_N output columns a program over K / split_k of the reduction,
    BLOCK_K a step, `stages` steps in flight, and the first `prefetch_k` of each program's K range asked of L2 before
    the wait."""

    block_n: int
    block_k: int
    split_k: int
    stages: int
    prefetch_k: int


if triton is not None:

    @triton.jit
    def _prefetch_l2(ptrs):
        """Ask L2 for the lines at `ptrs`; nothing waits for them."""
        tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def _rows_kernel(X, W, BIAS, Y, PARTIALS, COUNTERS, M, N, stride_x, stride_w, stride_y,
                     K_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, PREFETCH_K: tl.constexpr,
                     LINE_ELEMS: tl.constexpr, USE_PDL: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        k_lo = pid_k * K_SPLIT
        w_rows = W + offs_n[:, None] * stride_w + k_lo
        if PREFETCH_K > 0:  # W's first lines, before the previous kernel has finished (no kernel of the step writes W)
            _prefetch_l2(w_rows + (tl.arange(0, PREFETCH_K // LINE_ELEMS) * LINE_ELEMS)[None, :])
        wait_previous(USE_PDL)
        offs_k = tl.arange(0, BLOCK_K)
        x_cols = X + offs_m[None, :] * stride_x + k_lo + offs_k[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in tl.range(0, K_SPLIT, BLOCK_K, num_stages=STAGES):
            w = tl.load(w_rows + k0 + offs_k[None, :])
            x = tl.load(x_cols + k0, mask=m_mask[None, :], other=0.0)
            acc = tl.dot(w, x, acc)
        out = Y + offs_m[None, :] * stride_y + offs_n[:, None]
        if SPLIT_K == 1:
            if HAS_BIAS:
                acc += tl.load(BIAS + offs_n).to(tl.float32)[:, None]
            tl.store(out, acc.to(Y.dtype.element_ty), mask=m_mask[None, :])
        else:
            # partials [SPLIT_K, N, BLOCK_M] in float32; the tile's last program to finish sums them in split order
            part = PARTIALS + offs_n[:, None] * BLOCK_M + offs_m[None, :]
            tl.store(part + pid_k * N * BLOCK_M, acc)
            tl.debug_barrier()  # every thread's partial is stored before the one thread's release
            counter = COUNTERS + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
                tl.store(counter, 0)
                total = tl.load(part, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    total += tl.load(part + s * N * BLOCK_M, cache_modifier=".cg")
                if HAS_BIAS:
                    total += tl.load(BIAS + offs_n).to(tl.float32)[:, None]
                tl.store(out, total.to(Y.dtype.element_ty), mask=m_mask[None, :])


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on the CPU)
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@functools.lru_cache(maxsize=None)  # a few shapes a model; called per matmul on the eager path
def tiles_for(n: int, k: int, device: torch.device) -> Tiles | None:
    """64-column tiles, K split (by powers of two that keep a split's range whole in 128-wide steps) until the grid
    covers about half the SMs, five steps in flight where a program has six or more; None where the shape does not
    tile evenly (cuBLAS then). Fewer, longer programs won on the H100 at 64 rows (bench/rows_matmul.py --sweep: a
    0.6B layer's four matmuls 24.2 us against 26.1 with one program an SM, cuBLAS 26.5)."""
    block_n, block_k = 64, 128
    if n % block_n or k % block_k:
        return None
    sms, tiles, split = _sm_count(device), n // block_n, 1
    while 2 * tiles * split <= sms // 2 and k % (2 * split * block_k) == 0:
        split *= 2
    return Tiles(block_n, block_k, split, stages=5 if k // split >= 6 * block_k else 3, prefetch_k=prefetch_k(k // split))


def prefetch_k(k_split: int) -> int:
    """How much of a program's K range to ask of L2 before the PDL wait: up to 512 weights a row, dividing the range."""
    pf = 512
    while k_split % pf:
        pf //= 2
    return pf


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                tiles: Tiles | None = None) -> torch.Tensor:
    """x [M, K] @ weight [N, K].T (+ bias) for 2 <= M <= MAX_ROWS; cuBLAS where the shape does not tile or the
    weight is over MAX_WEIGHT_BYTES. `tiles` overrides the heuristic (bench/rows_matmul.py --sweep).

    No prologue runs inside the loop: SiLU-and-mul there (down_proj) took 15.6 us against 7.9 for the separate
    kernel and this one, at 64 rows on the H100 (the computed operand leaves the loop's async copies)."""
    m, k = x.shape
    n = weight.shape[0]
    tiles = tiles or tiles_for(n, k, x.device)
    too_large = m > MAX_ROWS or weight.numel() * weight.element_size() > MAX_WEIGHT_BYTES
    if tiles is None or too_large or x.stride(-1) != 1 or weight.stride(-1) != 1:
        return torch.nn.functional.linear(x, weight, bias)
    if n % tiles.block_n or k % (tiles.split_k * tiles.block_k) or (k // tiles.split_k) % max(tiles.prefetch_k, 1):
        raise ValueError(f"tiles {tiles} do not divide the {n}x{k} weight")
    block_m = max(16, triton.next_power_of_2(m))
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    partials = torch.empty((tiles.split_k, n, block_m), dtype=torch.float32, device=x.device) if tiles.split_k > 1 else y
    counters = arrival.counters(x.device)  # a weight under MAX_WEIGHT_BYTES has far fewer column tiles than counters
    use_pdl = pdl.enabled(x.device, m)
    line_elems = _LINE // weight.element_size()
    _rows_kernel[(n // tiles.block_n, tiles.split_k)](
        x, weight, bias if bias is not None else weight, y, partials, counters, m, n, x.stride(0), weight.stride(0),
        y.stride(0), K_SPLIT=k // tiles.split_k, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k, SPLIT_K=tiles.split_k, STAGES=tiles.stages,
        PREFETCH_K=tiles.prefetch_k if use_pdl else 0, LINE_ELEMS=line_elems, USE_PDL=use_pdl,
        num_warps=4, launch_pdl=use_pdl,
    )
    return y
