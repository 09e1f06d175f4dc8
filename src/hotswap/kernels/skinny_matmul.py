"""Skinny matmuls for small-batch decode: y = prologue(x) @ W^T (+ bias), one streaming pass over W.

At M <= 8 rows a decoder layer's matmuls are pure weight reads, and cuBLAS's 64x8-tile kernels reach
about half of HBM bandwidth on these shapes. Here each program owns a few output columns, streams its
rows of W once, and recomputes the cheap step before the matmul on the small activation itself:
add-the-residual + RMSNorm before q/k/v and gate/up, SiLU-and-mul before down. So those steps cost no
launch of their own, and a layer's decode is four matmul launches, the rotary/KV-store kernel and
attention.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None

#: Largest number of rows served here; larger batches go to cuBLAS.
MAX_ROWS = 16

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3


def enabled(rows: int, dtype: torch.dtype, device: torch.device, max_rows: int) -> bool:
    """For half-precision CUDA batches of at most `max_rows` (<= MAX_ROWS) rows; float32 keeps cuBLAS,
    so the float32 GPU path stays the one compared with the CPU."""
    return (triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)
            and rows <= min(max_rows, MAX_ROWS))


if triton is not None:

    @triton.jit
    def _skinny_kernel(X, R, R_OUT, NW, W, BIAS, Y, M, N, K, stride_xm, stride_rm, stride_wn, stride_ym, eps,
                       PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        pid = tl.program_id(0)
        offs_m = tl.arange(0, BLOCK_M)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        # One pass: RMSNorm scales a row by a constant, so (x * nw) @ W^T is accumulated beside the row's
        # sum of squares and scaled at the end; W's loads never wait for the norm.
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        ss = tl.zeros([BLOCK_M], dtype=tl.float32)
        for k0 in tl.range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            mk = m_mask[:, None] & k_mask[None, :]
            w = tl.load(W + offs_n[:, None] * stride_wn + offs_k[None, :], mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if PROLOGUE == 3:
                g = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mk, other=0.0)
                u = tl.load(X + offs_m[:, None] * stride_xm + K + offs_k[None, :], mask=mk, other=0.0)
                gf = g.to(tl.float32)
                xf = (gf / (1.0 + tl.exp(-gf))).to(g.dtype).to(tl.float32) * u.to(tl.float32)
            else:
                x = tl.load(X + offs_m[:, None] * stride_xm + offs_k[None, :], mask=mk, other=0.0)
                if PROLOGUE == 2:
                    # the residual sum is rounded to the model dtype, as the unfused layers do
                    x = x + tl.load(R + offs_m[:, None] * stride_rm + offs_k[None, :], mask=mk, other=0.0)
                    if pid == 0:  # the new residual, written once into its own buffer (others still read R)
                        tl.store(R_OUT + offs_m[:, None] * stride_rm + offs_k[None, :], x, mask=mk)
                xf = x.to(tl.float32)
                if PROLOGUE == 1 or PROLOGUE == 2:
                    ss += tl.sum(xf * xf, axis=1)
                    xf = xf * tl.load(NW + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if BLOCK_M == 1:
                acc += tl.sum(xf * w.to(tl.float32), axis=1)[None, :]  # [1, BLOCK_K] * [BLOCK_N, BLOCK_K]
            else:  # rows padded to the tensor-core tile
                acc = tl.dot(xf.to(w.dtype), tl.trans(w), acc)
        if PROLOGUE == 1 or PROLOGUE == 2:
            acc = acc * tl.rsqrt(ss / K + eps)[:, None]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(Y + offs_m[:, None] * stride_ym + offs_n[None, :], acc.to(Y.dtype.element_ty),
                 mask=m_mask[:, None] & n_mask[None, :])


_SM_COUNT: dict[int, int] = {}


def _programs_wanted(device: torch.device) -> int:
    if device.type != "cuda":  # Triton's interpreter (tests on the CPU)
        return 264
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return 2 * _SM_COUNT[idx]


def _blocks(m: int, n: int, k: int, device: torch.device) -> tuple[int, int, int]:
    """One row: enough programs to cover every SM twice, at most 8K weights a tile. More rows: a
    16 x 16 tensor-core tile (the rows padded), widened while the SMs stay covered."""
    wanted = _programs_wanted(device)
    if m == 1:
        block_m, block_n = 1, 2
        while block_n < 32 and n // (block_n * 2) >= wanted:
            block_n *= 2
        return block_m, block_n, min(triton.next_power_of_2(k), max(64, 8192 // block_n))
    block_n = 16
    while block_n < 64 and n // (block_n * 2) >= wanted:
        block_n *= 2
    return 16, block_n, min(triton.next_power_of_2(k), 128)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: int = PLAIN,
                  residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
                  eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """prologue(x) @ weight.T + bias for x [M, K] (SILU_MUL: x is [M, 2K], gate | up).

    NORM: rmsnorm(x) * norm_weight; ADD_NORM: the same of x + residual, also returned as the new
    residual (a fresh tensor: the input residual is left as it was). Returns (y, new residual or None).
    The normalised activation is kept in float32 (the unfused layers round it to the model dtype twice),
    so results differ from them by bf16 rounding, not more.
    """
    m = x.shape[0]
    n, k = weight.shape
    if not x.is_contiguous() or weight.stride(-1) != 1 or (residual is not None and not residual.is_contiguous()):
        raise ValueError("skinny_linear needs contiguous x and residual and a row-major weight")
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(x) if prologue == ADD_NORM else None
    r_in = residual if prologue == ADD_NORM else x
    block_m, block_n, block_k = _blocks(m, n, k, x.device)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, r_in, r_out if r_out is not None else x, norm_weight if norm_weight is not None else weight,
        weight, bias if bias is not None else weight, y, m, n, k,
        x.stride(0), r_in.stride(0), weight.stride(0), y.stride(0), eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=4,
    )
    return y, r_out
