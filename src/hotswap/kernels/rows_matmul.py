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

Two epilogues replace kernels of their own: gate_up's SiLU-and-mul (a tile pairs gate rows with the matching
up rows) and q/k/v's heads (a tile is one head: q/k norm, rotary, the KV-cache store). The residual add and
RMSNorm stay a kernel: begun in o_proj's / down_proj's epilogue and finished by the next matmul from per-tile
sums of squares, they cost the matmuls more than the norm kernels held (twenty-third session: batch-64 graph
1.634 against 1.610 ms on the H100). Instead that kernel sums o_proj's and down_proj's split-K partials
(`split_sum`, kernels/split_sum.py), in the same order, so the bits are the same and those matmuls end without
their tiles' last programs (thirty-fifth session, H100: a batch-64 step's matmuls 771 -> 669 us on the critical
path, its norms 92 -> 131 us, the graph 1.509 -> 1.468 ms).
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

from hotswap.kernels import arrival, fused, pdl
from hotswap.kernels.skinny_matmul import HeadsEpilogue
from hotswap.kernels.sm_count import sm_count
from hotswap.kernels.split_sum import SplitSum

try:
    import triton
    import triton.language as tl

    from hotswap.kernels.fused import norm_rotate
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
#: Whether a split-K matmul whose caller takes a `SplitSum` leaves its partials to the next kernel
#: (`HOTSWAP_ROWS_SUM_IN_NORM=0`: its tiles' last programs sum them; the A/B switch of the benches).
SUM_IN_NORM = os.environ.get("HOTSWAP_ROWS_SUM_IN_NORM", "1") != "0"
#: Whether the SiLU-and-mul and q/k/v-heads epilogues run in the matmul (`HOTSWAP_ROWS_EPILOGUES=0`: in kernels of
#: their own after it, the A/B switch of the benches).
EPILOGUES = os.environ.get("HOTSWAP_ROWS_EPILOGUES", "1") != "0"
_PLAIN, _SILU_MUL, _HEADS = 0, 1, 2
#: Weight bytes a line of the L2 prefetch covers.
_LINE = 128
#: `HOTSWAP_ROWS_STAGES=LONG,SHORT` sets the steps in flight of K ranges of six steps or more and of shorter ones,
#: whatever the rows (the A/B switch of the benches; unset: `stages_for`).
_STAGES_SET = os.environ.get("HOTSWAP_ROWS_STAGES")


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
    def _silu_mul_tile(acc, dtype: tl.constexpr, HALF_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """silu(gate) * up of a SILU_MUL tile ([gate rows | up rows] x rows), rounded as fused.silu_and_mul rounds."""
        gate, up = tl.split(tl.permute(tl.reshape(acc, [2, HALF_N, BLOCK_M]), (1, 2, 0)))
        g = gate.to(dtype)
        gf = g.to(tl.float32)
        return (gf / (1.0 + tl.exp(-gf))).to(dtype) * up.to(dtype)

    @triton.jit
    def _head_inputs(head, offs_m, m_mask, COS_SIN, POS, SLOTS, n_q_heads, n_kv_heads, stride_cs, dtype: tl.constexpr,
                     HEAD_DIM: tl.constexpr):
        """What a head's epilogue reads besides the matmul's sum: the rows' KV-cache slots and, for a q or k head, the
        rotary table's cos and sin at their positions ([HEAD_DIM / 2, rows], `dtype`). Staged inputs and a table that no
        kernel of a step writes: the kernel loads them before its PDL wait, so the epilogue after the loop waits on
        none of them (it loaded positions, then cos / sin, two dependent round trips after the sum)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        offs = tl.arange(0, HALF)
        slots = tl.load(SLOTS + offs_m, mask=m_mask, other=0)
        # v heads load none (the head test broadcast to the rows: a mask must be a tensor, in the interpreter too)
        rotated = m_mask & (offs_m * 0 + head < n_q_heads + n_kv_heads)
        cs = COS_SIN + tl.load(POS + offs_m, mask=rotated, other=0)[None, :] * stride_cs + offs[:, None]
        cos = tl.load(cs, mask=rotated[None, :], other=0.0).to(dtype)
        sin = tl.load(cs + HALF, mask=rotated[None, :], other=0.0).to(dtype)
        return slots, cos, sin

    @triton.jit
    def _finish_heads(y, head, offs_m, m_mask, Y, stride_y, QW, KW, K_CACHE, V_CACHE, slots, cos, sin, n_q_heads,
                      n_kv_heads, eps, HAS_QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr):
        """One head of every row ([HEAD_DIM, rows], model dtype), as fused.qk_norm_rope finishes it: q normalised and
        rotated into Y (q only), k normalised, rotated and stored in the K cache at the row's slot, v stored in the V
        cache (`slots`, `cos`, `sin`: `_head_inputs`)."""
        HALF: tl.constexpr = HEAD_DIM // 2
        offs = tl.arange(0, HALF)
        m = m_mask[None, :]
        if head >= n_q_heads + n_kv_heads:
            v_rows = V_CACHE + (slots[None, :] * n_kv_heads + head - n_q_heads - n_kv_heads) * HEAD_DIM
            tl.store(v_rows + tl.arange(0, HEAD_DIM)[:, None], y, mask=m)
        else:
            x1, x2 = tl.split(tl.permute(tl.reshape(y, [2, HALF, BLOCK_M]), (1, 2, 0)))
            if head < n_q_heads:
                wp = QW
            else:
                wp = KW
            y1, y2 = norm_rotate(x1, x2, (wp + offs)[:, None], cos, sin, eps, HAS_QK_NORM, HALF, HEAD_DIM, 0)
            if head < n_q_heads:
                dst = Y + offs_m[None, :] * stride_y + head * HEAD_DIM + offs[:, None]
            else:
                dst = K_CACHE + (slots[None, :] * n_kv_heads + head - n_q_heads) * HEAD_DIM + offs[:, None]
            tl.store(dst, y1, mask=m)
            tl.store(dst + HALF, y2, mask=m)

    @triton.jit
    def _finish(acc, pid_n, offs_n, offs_m, m_mask, BIAS, Y, stride_y, QW, KW, K_CACHE, V_CACHE, slots, cos, sin,
                n_q_heads, n_kv_heads, eps, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr,
                HAS_QK_NORM: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr):
        """A tile's whole sum [BLOCK_N, rows] in float32: bias, then the epilogue, then the stores."""
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n).to(tl.float32)[:, None]
        if EPILOGUE == 1:
            cols = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
            tl.store(Y + offs_m[None, :] * stride_y + cols[:, None], _silu_mul_tile(acc, Y.dtype.element_ty, BLOCK_N // 2,
                                                                                    BLOCK_M), mask=m_mask[None, :])
        elif EPILOGUE == 2:
            _finish_heads(acc.to(Y.dtype.element_ty), pid_n, offs_m, m_mask, Y, stride_y, QW, KW, K_CACHE, V_CACHE, slots,
                          cos, sin, n_q_heads, n_kv_heads, eps, HAS_QK_NORM, BLOCK_N, BLOCK_M)
        else:
            tl.store(Y + offs_m[None, :] * stride_y + offs_n[:, None], acc.to(Y.dtype.element_ty), mask=m_mask[None, :])

    @triton.jit
    def _rows_kernel(X, W, BIAS, Y, PARTIALS, COUNTERS, QW, KW, COS_SIN, POS, K_CACHE, V_CACHE, SLOTS, M, N, stride_x,
                     stride_w, stride_y, n_q_heads, n_kv_heads, stride_cs, eps,
                     K_SPLIT: tl.constexpr, HAS_BIAS: tl.constexpr, EPILOGUE: tl.constexpr, HAS_QK_NORM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
                     STAGES: tl.constexpr, PREFETCH_K: tl.constexpr, LINE_ELEMS: tl.constexpr, USE_PDL: tl.constexpr,
                     DEFER: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        j = tl.arange(0, BLOCK_N)
        if EPILOGUE == 1:  # SILU_MUL: the tile's first half are gate rows, its second the matching up rows
            half: tl.constexpr = BLOCK_N // 2
            offs_n = tl.where(j < half, pid_n * half + j, N // 2 + pid_n * half + j - half)
        else:
            offs_n = pid_n * BLOCK_N + j
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        k_lo = pid_k * K_SPLIT
        w_rows = W + offs_n[:, None] * stride_w + k_lo
        if PREFETCH_K > 0:  # W's first lines, before the previous kernel has finished (no kernel of the step writes W)
            _prefetch_l2(w_rows + (tl.arange(0, PREFETCH_K // LINE_ELEMS) * LINE_ELEMS)[None, :])
        if EPILOGUE == 2:
            slots, cos, sin = _head_inputs(pid_n, offs_m, m_mask, COS_SIN, POS, SLOTS, n_q_heads, n_kv_heads, stride_cs,
                                           Y.dtype.element_ty, BLOCK_N)
        else:  # unused by the other epilogues
            slots, cos, sin = 0, 0.0, 0.0
        wait_previous(USE_PDL)
        offs_k = tl.arange(0, BLOCK_K)
        x_cols = X + offs_m[None, :] * stride_x + k_lo + offs_k[:, None]
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        for k0 in tl.range(0, K_SPLIT, BLOCK_K, num_stages=STAGES):
            w = tl.load(w_rows + k0 + offs_k[None, :])
            x = tl.load(x_cols + k0, mask=m_mask[None, :], other=0.0)
            acc = tl.dot(w, x, acc)
        if DEFER:  # partials [SPLIT_K, M, N], summed by the kernel that reads them (SplitSum)
            tl.store(PARTIALS + (pid_k * M + offs_m[None, :]) * N + offs_n[:, None], acc, mask=m_mask[None, :])
        elif SPLIT_K == 1:
            _finish(acc, pid_n, offs_n, offs_m, m_mask, BIAS, Y, stride_y, QW, KW, K_CACHE, V_CACHE, slots, cos, sin,
                    n_q_heads, n_kv_heads, eps, HAS_BIAS, EPILOGUE, HAS_QK_NORM, BLOCK_N, BLOCK_M)
        else:
            # partials [SPLIT_K, N, BLOCK_M] in float32 (by tile position); the tile's last program to finish sums them
            # in split order
            part = PARTIALS + (pid_n * BLOCK_N + j)[:, None] * BLOCK_M + offs_m[None, :]
            tl.store(part + pid_k * N * BLOCK_M, acc)
            tl.debug_barrier()  # every thread's partial is stored before the one thread's release
            counter = COUNTERS + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == SPLIT_K - 1:
                tl.store(counter, 0)
                total = tl.load(part, cache_modifier=".cg")
                for s in tl.static_range(1, SPLIT_K):
                    total += tl.load(part + s * N * BLOCK_M, cache_modifier=".cg")
                _finish(total, pid_n, offs_n, offs_m, m_mask, BIAS, Y, stride_y, QW, KW, K_CACHE, V_CACHE, slots, cos, sin,
                        n_q_heads, n_kv_heads, eps, HAS_BIAS, EPILOGUE, HAS_QK_NORM, BLOCK_N, BLOCK_M)


@functools.lru_cache(maxsize=None)  # a few shapes a model; called per matmul on the eager path
def tiles_for(n: int, k: int, device: torch.device, block_n: int = 64, rows: int = 64) -> Tiles | None:
    """`block_n`-column tiles (64; a head's width for the heads epilogue), K split (by powers of two that keep a split's
    range whole in 128-wide steps) until the grid covers about half the SMs, steps in flight by `stages_for`; None where
    the shape does not tile evenly (cuBLAS then). Fewer, longer programs won on the H100 at 64 rows (bench/rows_matmul.py
    --sweep: a 0.6B layer's four matmuls 24.2 us against 26.1 with one program an SM, cuBLAS 26.5). Measured in whole
    0.6B decode on the H100 and not kept (thirty-eighth session, `rows-split`): every split grown to cover all the SMs,
    batch 32 / 64 -1.1 to -3.3 % in tokens/s; the q/k/v matmul split four ways instead of two, its critical path 8.99
    us a call (8.96 at split 2, the thirty-seventh's profile), batch 64 +0.7 / +2.9 % but batch 32 -1 / -2.6 % against one run of the default."""
    block_k = 128
    if n % block_n or k % block_k:
        return None
    sms, tiles, split = sm_count(device), n // block_n, 1
    while 2 * tiles * split <= sms // 2 and k % (2 * split * block_k) == 0:
        split *= 2
    return Tiles(block_n, block_k, split, stages=stages_for(k // split // block_k, rows), prefetch_k=prefetch_k(k // split))


def stages_for(steps: int, rows: int) -> int:
    """Steps in flight for a program's `steps` K steps at `rows` rows. Measured in whole 0.6B decode graphs on the H100
    (twenty-sixth session, `bash scripts/gpu_runs.sh knobs`): long ranges (six steps or more: gate_up, down) want five
    at 16-32 rows and four at 33-64 (batch 64 47.3 -> 48.2 % of the roofline; four at 32 rows 44.9 -> 44.0 %); short
    ones (q/k/v and o_proj, four steps) four at 16-32 rows (42.8 -> 43.4 % at 16) and three at 33-64 (four: 47.8 %)."""
    if _STAGES_SET:
        long, short = (int(x) for x in _STAGES_SET.split(","))
    else:
        long, short = (5, 4) if rows <= 32 else (4, 3)
    return long if steps >= 6 else short


def prefetch_k(k_split: int) -> int:
    """How much of a program's K range to ask of L2 before the PDL wait: up to 512 weights a row, dividing the range."""
    pf = 512
    while k_split % pf:
        pf //= 2
    return pf


def rows_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, tiles: Tiles | None = None, *,
                silu_mul: bool = False, heads: HeadsEpilogue | None = None,
                split_sum: bool = False) -> torch.Tensor | SplitSum:
    """x [M, K] @ weight [N, K].T (+ bias) for 2 <= M <= MAX_ROWS; cuBLAS where the shape does not tile or the
    weight is over MAX_WEIGHT_BYTES. `tiles` overrides the heuristic (bench/rows_matmul.py --sweep).

    Epilogues, each in place of a kernel of its own: `silu_mul` (gate_up, weight rows [gate | up]) returns
    silu(gate) * up [M, N / 2], the bits of fused.silu_and_mul; `heads` (q/k/v, HEAD_DIM-column tiles) returns q
    [M, Hq * D] normalised and rotated and writes k and v to the KV cache, as fused.qk_norm_rope(..., kv_store=...)
    does up to the order of the per-head sum of squares.
    Where the kernel does not take the shape (or `HOTSWAP_ROWS_EPILOGUES=0`) those kernels run after the matmul.
    `split_sum` (no bias, no epilogue; the caller's next kernel is fused.rmsnorm) returns a `SplitSum` where K is split:
    the partials' sum is then the norm kernel's first step, not a last program's here.

    No prologue runs inside the loop: SiLU-and-mul there (down_proj) took 15.6 us against 7.9 for the separate
    kernel and this one, at 64 rows on the H100 (the computed operand leaves the loop's async copies)."""
    m, k = x.shape
    n = weight.shape[0]
    tiles = tiles or tiles_for(n, k, x.device, heads.head_dim if heads is not None else 64, m)
    too_large = m > MAX_ROWS or weight.numel() * weight.element_size() > MAX_WEIGHT_BYTES
    fits = not (tiles is None or too_large or x.stride(-1) != 1 or weight.stride(-1) != 1)
    if (silu_mul or heads is not None) and not (fits and EPILOGUES):
        return _unfused_epilogue(x, weight, bias, tiles if fits else None, silu_mul, heads)
    if not fits:
        return torch.nn.functional.linear(x, weight, bias)
    if n % tiles.block_n or k % (tiles.split_k * tiles.block_k) or (k // tiles.split_k) % max(tiles.prefetch_k, 1):
        raise ValueError(f"tiles {tiles} do not divide the {n}x{k} weight")
    block_m = max(16, triton.next_power_of_2(m))
    defer = split_sum and SUM_IN_NORM and tiles.split_k > 1 and bias is None and not silu_mul and heads is None
    head_args, head_sizes = (weight,) * 7, (0, 0, 0, 0.0)
    if heads is not None:
        heads.check(n, m)
        if tiles.block_n != heads.head_dim:
            raise ValueError(f"heads epilogue: the tile's width {tiles.block_n} is not head_dim {heads.head_dim}")
        h = heads
        y = torch.empty((m, h.num_q_heads * h.head_dim), dtype=x.dtype, device=x.device)
        head_args = (h.q_norm if h.q_norm is not None else weight, h.k_norm if h.k_norm is not None else weight,
                     h.cos_sin, h.positions, h.k_cache, h.v_cache, h.slots)
        head_sizes = (h.num_q_heads, h.num_kv_heads, h.cos_sin.stride(0), h.eps)
    elif defer:  # the output is the partials [splits, M, N]
        y = torch.empty((tiles.split_k, m, n), dtype=torch.float32, device=x.device)
    else:
        y = torch.empty((m, n // 2 if silu_mul else n), dtype=x.dtype, device=x.device)
    if tiles.split_k > 1 and not defer:  # by tile position, for the tiles' last programs
        partials = torch.empty((tiles.split_k, n, block_m), dtype=torch.float32, device=x.device)
    else:
        partials = y
    counters = arrival.counters(x.device)  # a weight under MAX_WEIGHT_BYTES has far fewer column tiles than counters
    use_pdl = pdl.enabled(x.device, m)
    line_elems = _LINE // weight.element_size()
    epilogue = _HEADS if heads is not None else _SILU_MUL if silu_mul else _PLAIN
    _rows_kernel[(n // tiles.block_n, tiles.split_k)](
        x, weight, bias if bias is not None else weight, y, partials, counters, *head_args, m, n, x.stride(0),
        weight.stride(0), y.stride(0), *head_sizes, K_SPLIT=k // tiles.split_k, HAS_BIAS=bias is not None,
        EPILOGUE=epilogue, HAS_QK_NORM=heads is not None and heads.q_norm is not None, BLOCK_M=block_m,
        BLOCK_N=tiles.block_n, BLOCK_K=tiles.block_k, SPLIT_K=tiles.split_k, STAGES=tiles.stages,
        PREFETCH_K=tiles.prefetch_k if use_pdl else 0, LINE_ELEMS=line_elems, USE_PDL=use_pdl,
        DEFER=defer, num_warps=4, launch_pdl=use_pdl,
    )
    return SplitSum(y, x.dtype) if defer else y


def _unfused_epilogue(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, tiles: Tiles | None,
                      silu_mul: bool, heads: HeadsEpilogue | None) -> torch.Tensor:
    """The epilogue as its own kernel after the plain matmul (ours where `tiles`, else cuBLAS)."""
    y = rows_linear(x, weight, bias, tiles) if tiles is not None else torch.nn.functional.linear(x, weight, bias)
    if silu_mul:
        return fused.silu_and_mul(y)
    h = heads
    q_cols, kv_cols = h.num_q_heads * h.head_dim, h.num_kv_heads * h.head_dim
    q, k, v = y.split([q_cols, kv_cols, kv_cols], dim=-1)
    fused.qk_norm_rope(q.view(-1, h.num_q_heads, h.head_dim), k.view(-1, h.num_kv_heads, h.head_dim), h.q_norm, h.k_norm,
                       h.cos_sin, h.positions, h.eps,
                       kv_store=(v.view(-1, h.num_kv_heads, h.head_dim), h.k_cache, h.v_cache, h.slots))
    return q
