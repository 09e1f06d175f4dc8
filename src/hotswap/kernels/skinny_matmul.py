"""Batch-1 decode matmuls: y = prologue(x) @ W^T (+ bias) for one row, one streaming pass over W.

At one row a decoder layer's matmuls are pure weight reads, and cuBLAS's 64x8-tile kernels reach about
40 % of HBM bandwidth on a 0.6B model's shapes. Here each program owns a few output columns and streams
its rows of W once, and the cheap step before the matmul runs on the one activation row inside the same
kernel: add-the-residual + RMSNorm before q/k/v and gate/up, SiLU-and-mul before down; after q/k/v, the
heads' norm, rotary and KV-cache store, done by the last program of each head to finish. So those steps
cost no launch of their own, and a layer's decode is four matmul launches and attention. (A tensor-core
variant for 2-16 rows was slower than cuBLAS there; those use cuBLAS.)
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from hotswap.kernels import arrival, pdl
from hotswap.kernels.sm_count import sm_count

try:
    import triton
    import triton.language as tl

    from hotswap.kernels.fused import norm_rope_head
    from hotswap.kernels.pdl import wait_previous
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None

PLAIN, NORM, ADD_NORM, SILU_MUL = 0, 1, 2, 3

#: The q/k/v matmul finishes its heads (`HeadsEpilogue`); `HOTSWAP_QKV_HEADS=0` launches fused.qk_norm_rope after
#: it instead (the A/B switch of bench/attention_ab.py).
HEADS_EPILOGUE = os.environ.get("HOTSWAP_QKV_HEADS", "1") != "0"

#: Longest row the SiLU-and-mul prologue is fused for. Measured on the H100 (bench/skinny_matmul.py),
#: down_proj at one row: K=3072 (0.6B) 6.3 us fused vs 8.7 us cuBLAS + kernel; K=12288 (8B) 61 vs 41 us.
SILU_MUL_MAX_K = 4096


def enabled(rows: int, dtype: torch.dtype, device: torch.device, on: bool) -> bool:
    """For one-row half-precision CUDA batches; float32 keeps cuBLAS, so the float32 GPU path stays the
    one compared with the CPU."""
    return on and rows == 1 and triton is not None and device.type == "cuda" and dtype in (torch.bfloat16, torch.float16)


if triton is not None:

    @triton.jit
    def _skinny_kernel(X, R, R_OUT, NW, W, BIAS, Y, N, K, stride_wn, eps,
                       QW, KW, COS_SIN, POS, K_CACHE, V_CACHE, SLOTS, COUNTERS, n_q_heads, n_kv_heads, stride_cs,
                       head_eps, PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                       HEADS: tl.constexpr, HAS_QK_NORM: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PDL: tl.constexpr):
        pid = tl.program_id(0)
        offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = offs_n < N
        w_rows = W + offs_n[:, None] * stride_wn
        # The first weight tile is read before waiting for the previous kernel (PDL): no kernel of the
        # step writes W, and at the model's shapes it is most of this program's reads.
        offs_k = tl.arange(0, BLOCK_K)
        w_next = tl.load(w_rows + offs_k[None, :], mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0)
        if HEADS:  # the token's slot and rotary row: staged inputs, read before the wait too (else two round trips late)
            slot = tl.load(SLOTS)
            cos_sin_row = COS_SIN + tl.load(POS) * stride_cs
        else:
            slot, cos_sin_row = 0, COS_SIN
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
        y = acc.to(Y.dtype.element_ty)
        tl.store(Y + offs_n, y, mask=n_mask)
        if HEADS:
            _finish_heads(y, pid, offs_n, Y, QW, KW, cos_sin_row, K_CACHE, V_CACHE, slot, COUNTERS, n_q_heads,
                          n_kv_heads, head_eps, HAS_QK_NORM, BLOCK_N, HEAD_DIM)

    @triton.jit
    def _finish_heads(y, pid, offs_n, Y, QW, KW, cos_sin_row, K_CACHE, V_CACHE, slot, COUNTERS, n_q_heads, n_kv_heads,
                      eps, HAS_QK_NORM: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr):
        """The qkv row's heads, as fused.qk_norm_rope finishes them: a v program writes its columns to the V
        cache at the token's `slot`; a q or k head's columns come from HEAD_DIM // BLOCK_N programs, and the last of
        them to finish (kernels/arrival.py: a counter per head) normalises and rotates the head in place (by the
        rotary table's row at `cos_sin_row`) and writes k's to the K cache."""
        head = (pid * BLOCK_N) // HEAD_DIM
        if head >= n_q_heads + n_kv_heads:
            hv = head - n_q_heads - n_kv_heads
            tl.store(V_CACHE + (slot * n_kv_heads + hv) * HEAD_DIM + offs_n - head * HEAD_DIM, y)
        else:
            counter = COUNTERS + head
            tl.debug_barrier()  # every thread's stores before the one thread's release
            if tl.atomic_add(counter, 1, sem="acq_rel") == HEAD_DIM // BLOCK_N - 1:
                tl.store(counter, 0)
                offs = tl.arange(0, HEAD_DIM // 2)
                base = Y + head * HEAD_DIM
                x1 = tl.load(base + offs, cache_modifier=".cg")
                x2 = tl.load(base + HEAD_DIM // 2 + offs, cache_modifier=".cg")
                if head < n_q_heads:
                    wp = QW
                else:
                    wp = KW
                y1, y2 = norm_rope_head(x1, x2, wp, cos_sin_row, eps, HAS_QK_NORM, HEAD_DIM // 2, HEAD_DIM)
                tl.store(base + offs, y1)
                tl.store(base + HEAD_DIM // 2 + offs, y2)
                if head >= n_q_heads:
                    dst = K_CACHE + (slot * n_kv_heads + head - n_q_heads) * HEAD_DIM
                    tl.store(dst + offs, y1)
                    tl.store(dst + HEAD_DIM // 2 + offs, y2)


@dataclass(frozen=True)
class HeadsEpilogue:
    """What the q/k/v projection's heads need after the matmul, as fused.qk_norm_rope does it in a kernel of its
    own: per-head RMSNorm weights (Qwen3; None without), the rotary table [positions, head_dim] (cos | sin) and
    the token's position, and the KV cache (contiguous [..., kv heads, head_dim]) with the token's slot."""

    num_q_heads: int
    num_kv_heads: int
    head_dim: int
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    eps: float
    cos_sin: torch.Tensor
    positions: torch.Tensor
    k_cache: torch.Tensor
    v_cache: torch.Tensor
    slots: torch.Tensor

    def check(self, n: int, rows: int) -> None:
        """What any kernel finishing these heads needs: a projection of `n` columns that are the q/k/v heads, a
        power-of-two head_dim, [cos | sin] rotary rows, a position and a slot a row, contiguous KV caches."""
        d = self.head_dim
        if n != (self.num_q_heads + 2 * self.num_kv_heads) * d:
            raise ValueError(f"heads epilogue: {n} output columns are not q/k/v heads of {self.num_q_heads} + 2 x "
                             f"{self.num_kv_heads} x {d}")
        if d & (d - 1) or d < 4:
            raise ValueError(f"heads epilogue: head_dim {d} must be a power of two of at least 4")
        if self.cos_sin.shape[-1] != d or self.cos_sin.stride(-1) != 1:
            raise ValueError(f"heads epilogue: the rotary table's rows must be [cos | sin] of {d}, got {tuple(self.cos_sin.shape)}")
        if self.positions.numel() != rows or self.slots.numel() != rows:
            raise ValueError(f"heads epilogue: one position and one KV slot for each of the {rows} rows")
        for cache in (self.k_cache, self.v_cache):
            if not cache.is_contiguous() or cache.shape[-2:] != (self.num_kv_heads, d):
                raise ValueError(f"KV cache must be contiguous with rows of [{self.num_kv_heads}, {d}], got {tuple(cache.shape)}")


def _blocks(n: int, k: int, device: torch.device) -> tuple[int, int]:
    """Enough programs to cover every SM twice; at most 8K weights a tile."""
    wanted = 2 * sm_count(device)
    block_n = 2
    while block_n < 32 and n // (block_n * 2) >= wanted:
        block_n *= 2
    return block_n, min(triton.next_power_of_2(k), max(64, 8192 // block_n))


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *, prologue: int = PLAIN,
                  residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 0.0,
                  blocks: tuple[int, int, int] | None = None,
                  heads: HeadsEpilogue | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """prologue(x) @ weight.T + bias for x [1, K] (SILU_MUL: x is [1, 2K], gate | up).

    NORM: rmsnorm(x) * norm_weight; ADD_NORM: the same of x + residual, also returned as the new
    residual (a fresh tensor: the input residual is left as it was). Returns (y, new residual or None).
    The normalised activation stays in float32 (the unfused layers round it to the model dtype twice),
    so results differ from them by bf16 rounding, not more. `blocks` = (BLOCK_N, BLOCK_K, warps) overrides
    the shape heuristic (bench/skinny_matmul.py --sweep).

    `heads` (the q/k/v projection of a decode step) also finishes the heads in this launch, bit for bit as
    fused.qk_norm_rope(..., kv_store=...) would on y: q and k normalised and rotated in y, k and v written to
    the KV cache.
    """
    n, k = weight.shape
    if x.shape[0] != 1 or not x.is_contiguous() or weight.stride(-1) != 1 or (residual is not None and not residual.is_contiguous()):
        raise ValueError("skinny_linear takes one contiguous row (and residual) and a row-major weight")
    y = torch.empty((1, n), dtype=x.dtype, device=x.device)
    r_out = torch.empty_like(x) if prologue == ADD_NORM else None
    block_n, block_k, warps = blocks or (*_blocks(n, k, x.device), 4)
    if heads is not None:
        _check_heads(heads, n, block_n)
        h = heads
        head_args = (h.q_norm if h.q_norm is not None else weight, h.k_norm if h.k_norm is not None else weight,
                     h.cos_sin, h.positions, h.k_cache, h.v_cache, h.slots, arrival.counters(x.device), h.num_q_heads,
                     h.num_kv_heads, h.cos_sin.stride(0), h.eps)
    else:
        head_args = (weight, weight, weight, weight, weight, weight, weight, weight, 0, 0, 0, 0.0)
    use_pdl = pdl.enabled(x.device, 1)
    _skinny_kernel[(triton.cdiv(n, block_n),)](
        x, residual if prologue == ADD_NORM else x, r_out if r_out is not None else x,
        norm_weight if norm_weight is not None else weight, weight, bias if bias is not None else weight, y, n, k,
        weight.stride(0), eps, *head_args, PROLOGUE=prologue, HAS_BIAS=bias is not None, BLOCK_N=block_n,
        BLOCK_K=block_k, HEADS=heads is not None, HAS_QK_NORM=heads is not None and heads.q_norm is not None,
        HEAD_DIM=heads.head_dim if heads is not None else 2, USE_PDL=use_pdl, num_warps=warps, launch_pdl=use_pdl,
    )
    return y, r_out


def _check_heads(heads: HeadsEpilogue, n: int, block_n: int) -> None:
    heads.check(n, rows=1)
    if heads.head_dim % block_n:
        raise ValueError(f"heads epilogue: {block_n}-column blocks do not divide head_dim {heads.head_dim}")
    if heads.num_q_heads + heads.num_kv_heads > arrival.SIZE:
        raise ValueError(f"heads epilogue: {heads.num_q_heads + heads.num_kv_heads} heads, more than the {arrival.SIZE} arrival counters")
