"""Small-batch decode matmuls: y = prologue(x) @ W^T (+ bias) for 1 to 64 rows, one streaming pass over W.

At small batch a decoder layer's matmuls are weight reads, and the cheap step before each matmul costs
a launch of its own: add-the-residual + RMSNorm before q/k/v and gate/up, SiLU-and-mul before down.
Here that step runs on the activation rows inside the matmul kernel, so a layer's decode is four
matmul launches, the rotary/KV-store kernel and attention, every one of them launched with PDL
(`kernels/pdl.py`), which cuBLAS kernels take no part in.

- One row (`_skinny_kernel`): each program owns a few output columns and streams its rows of W once,
  on CUDA cores (cuBLAS's 64x8-tile kernels reach about 40 % of HBM bandwidth on a 0.6B model's shapes).
- 2 to 64 rows (`_rows_kernel`): tensor-core tiles of [rows, BLOCK_N] over a slice of K. Shapes with few
  output tiles (o_proj and down_proj have N = hidden) split K over several programs to fill the GPU;
  the last program of a tile to finish sums the partials (counted with an atomic), so the split costs no
  second launch.
"""

from __future__ import annotations

import os

import torch

from hotswap.kernels import pdl

try:
    import triton
    import triton.language as tl

    from hotswap.kernels.pdl import wait_previous
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3

#: Longest row the SiLU-and-mul prologue is fused for. Measured on the H100 (bench/skinny_matmul.py),
#: down_proj at one row: K=3072 (0.6B) 6.3 us fused vs 8.7 us cuBLAS + kernel; K=12288 (8B) 61 vs 41 us.
SILU_MUL_MAX_K = 4096


ROWS_PDL = os.environ.get("HOTSWAP_ROWS_PDL", "0") == "1"
#: Most rows the fused kernels take; larger batches are compute-shaped and stay on cuBLAS.
MAX_ROWS = 64


def enabled(rows: int, dtype: torch.dtype, device: torch.device, on: bool) -> bool:
    """For half-precision CUDA batches of 1 to MAX_ROWS rows; float32 keeps cuBLAS, so the float32 GPU
    path stays the one compared with the CPU."""
    return (on and 1 <= rows <= MAX_ROWS and triton is not None and device.type == "cuda"
            and dtype in (torch.bfloat16, torch.float16))


if triton is not None:

    @triton.jit
    def _skinny_kernel(X, R, R_OUT, NW, W, BIAS, Y, N, K, stride_wn, eps,
                       PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       USE_PDL: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = W + offs_n[:, None] * stride_wn
        # The first weight tile is read before waiting for the previous kernel (PDL): no kernel of the
        # step writes W, and at the model's shapes it is most of this program's reads.
        offs_k = tl.arange(0, BLOCK_K)
        w_next = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        wait_previous(USE_PDL)
        # One pass: RMSNorm scales the row by a constant, so (x * nw) @ W^T is accumulated beside the
        # row's sum of squares and scaled at the end; W's loads never wait for the norm.
        acc = tl.zeros([BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([BLOCK_K], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            w = w_next
            next_k = offs_k + BLOCK_K
            w_next = tl.load(w_rows + next_k[None, :], mask=n_mask[:, None] & (next_k < K)[None, :], other=0.0)
            if PROLOGUE == 3:
                g = tl.load(X + offs_k, mask=k_mask, other=0.0)
                u = tl.load(X + K + offs_k, mask=k_mask, other=0.0)
                gf = g.to(tl.float32)
                xf = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)
            else:
                x = tl.load(X + offs_k, mask=k_mask, other=0.0)
                if PROLOGUE == 2:
                    # the residual sum is rounded to the model dtype, as the unfused layers do
                    x = x + tl.load(R + offs_k, mask=k_mask, other=0.0)
                    if pid == 0:  # the new residual, written once into its own buffer (others still read R)
                        tl.store(R_OUT + offs_k, x, mask=k_mask)
                xf = x.to(tl.float32)
                if PROLOGUE == 1 or PROLOGUE == 2:
                    ss += xf * xf
                    xf = xf * tl.load(NW + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            acc += tl.sum(xf[None, :] * w.to(tl.float32), axis=1)
        if PROLOGUE == 1 or PROLOGUE == 2:
            acc = acc * tl.rsqrt(tl.sum(ss, axis=0) / K + eps)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(Y + offs_n, acc.to(Y.dtype.element_ty), mask=n_mask)


    @triton.jit
    def _x_tile(X, R, R_OUT, NW, offs_m, m_mask, offs_k, k_mask, stride_x, stride_r, K, WRITE_R,
                PROLOGUE: tl.constexpr, BLOCK_M: tl.constexpr):
        """One [rows, BLOCK_K] tile of prologue(x) in the model dtype, and its rows' sums of squares
        (RMSNorm scales a row by a constant, applied to the accumulator at the end)."""
        mk = m_mask[:, None] & k_mask[None, :]
        x_ptrs = X + offs_m[:, None] * stride_x + offs_k[None, :]
        if PROLOGUE == 3:
            g = tl.load(x_ptrs, mask=mk, other=0.0)
            u = tl.load(x_ptrs + K, mask=mk, other=0.0)
            gf = g.to(tl.float32)
            x = (gf / (1.0 + tl.exp(-gf))).to(g.dtype) * u
            ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        else:
            x = tl.load(x_ptrs, mask=mk, other=0.0)
            if PROLOGUE == 2:
                # the residual sum is rounded to the model dtype, as the unfused layers do
                x = x + tl.load(R + offs_m[:, None] * stride_r + offs_k[None, :], mask=mk, other=0.0)
                if WRITE_R:  # the new residual, written by one column of programs into its own buffer
                    tl.store(R_OUT + offs_m[:, None] * K + offs_k[None, :], x, mask=mk)
            if PROLOGUE == 1 or PROLOGUE == 2:
                xf = x.to(tl.float32)
                ss = tl.sum(xf * xf, axis=1)
                x = (xf * tl.load(NW + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]).to(x.dtype)
            else:
                ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        return x, ss

    @triton.jit
    def _rows_epilogue(acc, ss, BIAS, Y, offs_m, m_mask, offs_n, n_mask, stride_y, K, eps,
                       PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr):
        if PROLOGUE == 1 or PROLOGUE == 2:
            acc = acc * tl.rsqrt(ss / K + eps)[:, None]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_y + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])

    @triton.jit
    def _rows_kernel(X, R, R_OUT, NW, W, BIAS, Y, WS, WS_SS, COUNTERS, M, N, K, k_per_split,
                     stride_x, stride_r, stride_w, stride_y, eps,
                     PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr, STAGES: tl.constexpr, USE_PDL: tl.constexpr):
        """W's tile is the MMA's first operand ([BLOCK_N, BLOCK_K], 64+ rows as the tensor cores want) and
        the few activation rows the second, so the accumulator is [BLOCK_N, BLOCK_M]."""
        wait_previous(USE_PDL)
        pid_n = tl.program_id(0)
        pid_k = tl.program_id(1)
        offs_m = tl.arange(0, BLOCK_M)
        m_mask = offs_m < M
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        k_lo = pid_k * k_per_split
        k_hi = tl.minimum(k_lo + k_per_split, K)
        w_rows = W + offs_n[:, None] * stride_w
        write_r = pid_n == 0
        acc = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in tl.range(k_lo, k_hi, BLOCK_K, num_stages=STAGES):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < k_hi
            w = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x, part = _x_tile(X, R, R_OUT, NW, offs_m, m_mask, offs_k, k_mask, stride_x, stride_r, K, write_r, PROLOGUE, BLOCK_M)
            ss += part
            acc = tl.dot(w, tl.trans(x), acc)
        acc = tl.trans(acc)
        if SPLIT_K == 1:
            _rows_epilogue(acc, ss, BIAS, Y, offs_m, m_mask, offs_n, n_mask, stride_y, K, eps, PROLOGUE, HAS_BIAS)
        else:
            # partials in WS [SPLIT_K, BLOCK_M, N] (float32); the tile's last program to finish sums them
            tl.store(WS + (pid_k * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], acc, mask=n_mask[None, :])
            tl.store(WS_SS + pid_k * BLOCK_M + offs_m, ss)
            tl.debug_barrier()  # every thread's partial is written before the count is released
            done = tl.atomic_add(COUNTERS + pid_n, 1, sem="acq_rel", scope="gpu")
            if done == SPLIT_K - 1:
                acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
                ss = tl.zeros([BLOCK_M], dtype=tl.float32)
                for s in tl.static_range(SPLIT_K):
                    acc += tl.load(WS + (s * BLOCK_M + offs_m[:, None]) * N + offs_n[None, :], mask=n_mask[None, :],
                                   other=0.0, cache_modifier=".cg")
                    ss += tl.load(WS_SS + s * BLOCK_M + offs_m, cache_modifier=".cg")
                _rows_epilogue(acc, ss, BIAS, Y, offs_m, m_mask, offs_n, n_mask, stride_y, K, eps, PROLOGUE, HAS_BIAS)
                tl.store(COUNTERS + pid_n, 0)  # zero again for the next launch (CUDA-graph replays reuse it)

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on the CPU)
        return 132
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def _blocks(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """Enough programs to cover every SM twice; at most 8K weights a tile."""
    wanted = 2 * _sm_count(device)
    block_n = 2
    while block_n < 32 and n // (block_n * 2) >= wanted:
        block_n *= 2
    return block_n, min(triton.next_power_of_2(k), max(64, 8192 // block_n))


def _rows_blocks(n: int, k: int, device: torch.device) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, warps, stages): 64-column tiles, K split until about one program per SM."""
    block_n, block_k = 64, 128
    tiles = triton.cdiv(n, block_n)
    split = max(1, min(round(_sm_count(device) / tiles), k // (2 * block_k)))
    return block_n, block_k, split, 4, 3


_COUNTERS: dict[torch.device, torch.Tensor] = {}
_MAX_TILES = 4096


def _counters(device: torch.device) -> torch.Tensor:
    """Per-device tile counters of the split-K kernels, zero between launches (each launch's last
    programs zero theirs again). Kernels on one stream use them in turn; allocated at the first
    (uncaptured, warm-up) call so that no CUDA graph's pool owns them."""
    c = _COUNTERS.get(device)
    if c is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("small-batch matmul counters must be allocated before CUDA-graph capture (run once first)")
        c = _COUNTERS[device] = torch.zeros(_MAX_TILES, dtype=torch.int32, device=device)
    return c


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: int = PLAIN,
                  residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  blocks: tuple[int, ...] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """prologue(x) @ weight.T + bias for x [M, K], 1 <= M <= MAX_ROWS (SILU_MUL: x is [M, 2K], gate | up).

    NORM: rmsnorm(x) * norm_weight; ADD_NORM: the same of x + residual, also returned as the new
    residual (a fresh tensor: the input residual is left as it was). Returns (y, new residual or None).
    The normalised activation is not rounded to the model dtype before the norm's scale (applied to the
    accumulator), so results differ from the unfused layers by bf16 rounding, not more. `blocks`
    overrides the shape heuristic (bench/skinny_matmul.py --sweep): (BLOCK_N, BLOCK_K, warps) for one
    row, (BLOCK_N, BLOCK_K, SPLIT_K, warps, stages) for more.
    """
    n, k = weight.shape
    m = x.shape[0]
    if not 1 <= m <= MAX_ROWS:
        raise ValueError(f"skinny_linear takes 1 to {MAX_ROWS} rows, got {m}")
    if not x.is_contiguous() or weight.stride(-1) != 1 or (residual is not None and not residual.is_contiguous()):
        raise ValueError("skinny_linear takes contiguous rows (and residual) and a row-major weight")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(x) if prologue == ADD_NORM else None
    args = (x, residual if prologue == ADD_NORM else x, r_out if r_out is not None else x,
            norm_weight if norm_weight is not None else weight, weight, bias if bias is not None else weight, y)
    use_pdl = pdl.enabled(x.device, m)
    if m == 1:
        block_n, block_k, warps = blocks or (*_blocks(n, k, x.device), 4)
        _skinny_kernel[(triton.cdiv(n, block_n),)](
            *args, n, k, weight.stride(0), eps, PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_N=block_n,
            BLOCK_K=block_k, USE_PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
        )
        return y, r_out
    block_n, block_k, split, warps, stages = blocks or _rows_blocks(n, k, x.device)
    block_m = max(16, triton.next_power_of_2(m))
    tiles = triton.cdiv(n, block_n)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    if split > 1:
        if tiles > _MAX_TILES:
            raise ValueError(f"{tiles} output tiles exceed the split-K counters ({_MAX_TILES})")
        ws = torch.empty((split, block_m, n), dtype=torch.float32, device=x.device)
        ws_ss = torch.empty((split, block_m), dtype=torch.float32, device=x.device)
        counters = _counters(x.device)
    else:
        ws = ws_ss = counters = y
    rows_pdl = use_pdl and ROWS_PDL
    _rows_kernel[(tiles, split)](
        *args, ws, ws_ss, counters, m, n, k, k_per_split, x.stride(0), residual.stride(0) if residual is not None else 0,
        weight.stride(0), y.stride(0), eps, PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_M=block_m,
        BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split, STAGES=stages, USE_PDL=rows_pdl, num_warps=warps,
        launch_pdl=rows_pdl,
    )
    return y, r_out
