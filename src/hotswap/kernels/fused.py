"""Fused elementwise kernels for the decoder (Triton, CUDA only): add + RMSNorm, per-head RMSNorm +
rotary for q and k, SiLU-and-mul, and the embedding lookup of inputs that are still on the device.
Each replaces a chain of small PyTorch kernels whose launches dominate a decode step at small batch. The PyTorch layers in hotswap.models.layers remain the
reference (CPU) path and the tests compare the two.
"""

from __future__ import annotations

import torch

from hotswap.kernels import pdl
from hotswap.kernels.split_sum import SplitSum

# qk_norm_rope runs one program per token from this many tokens up, one per (token, head) below: on the
# H100 (Hq 16, Hkv 8, D 128) per call 1.3 against 2.2 us at 1 token, 3.1 against 2.5 at 64, 160 against
# 59 at 8192 (batch-64 decode 33.5k -> 33.7-34.1k tokens/s, batch 1 1,199 -> 1,138 with it)
TOKEN_GRID_MIN_TOKENS = 64

try:
    import triton
    import triton.language as tl

    from hotswap.kernels.pdl import wait_previous
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None


def available(x: torch.Tensor | SplitSum) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _rmsnorm_kernel(X, R, W, Y, stride_x, stride_r, stride_y, stride_split, n_cols, eps, HAS_RES: tl.constexpr,
                        SPLITS: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        cols = tl.arange(0, BLOCK)
        mask = cols < n_cols
        # the norm's weight before the wait (no kernel of a step writes weights), so after it only x and the residual
        # are a round trip away; loaded after the row's sum of squares it was a second one
        w = tl.load(W + cols, mask=mask, other=0.0)
        wait_previous(USE_PDL)
        row = tl.program_id(0)
        x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        if SPLITS > 1:  # X holds a split-K matmul's float32 partials (rows_matmul.SplitSum): summed in split order, rounded
            for s in tl.static_range(1, SPLITS):
                x += tl.load(X + s * stride_split + row * stride_x + cols, mask=mask, other=0.0)
            x = x.to(Y.dtype.element_ty)
        if HAS_RES:
            # the residual sum is rounded to the model dtype, as the PyTorch reference does
            x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
            tl.store(R + row * stride_r + cols, x, mask=mask)
        xf = x.to(tl.float32)
        var = tl.sum(xf * xf, axis=0) / n_cols
        y = (xf * tl.rsqrt(var + eps)).to(x.dtype)
        tl.store(Y + row * stride_y + cols, w * y, mask=mask)

    @triton.jit
    def norm_rotate(x1, x2, w_ptrs, cos, sin, eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr,
                    AXIS: tl.constexpr):
        """Heads' two halves, their dims along AXIS (other axes: heads or rows): optional RMSNorm by the weights at
        `w_ptrs` (the first half's, shaped to broadcast like x1), then rotary by cos and sin (model dtype, broadcast
        likewise); returns the rotated halves. Every per-head norm + rotary of the decoder goes through it
        (qk_norm_rope's two kernels, the one-row and few-rows q/k/v matmuls' heads epilogues), so they round alike."""
        if HAS_NORM:
            f1 = x1.to(tl.float32)
            f2 = x2.to(tl.float32)
            r = tl.expand_dims(tl.rsqrt((tl.sum(f1 * f1, axis=AXIS) + tl.sum(f2 * f2, axis=AXIS)) / HEAD_DIM + eps), AXIS)
            x1 = tl.load(w_ptrs) * (f1 * r).to(x1.dtype)
            x2 = tl.load(w_ptrs + HALF) * (f2 * r).to(x2.dtype)
        return x1 * cos - x2 * sin, x2 * cos + x1 * sin

    @triton.jit
    def norm_rope_head(x1, x2, W, COS_SIN_ROW, eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
        """One head's halves [HALF] each: optional RMSNorm with weight W, then rotary by the position's row of
        the cos | sin table; returns the two rotated halves in the input dtype."""
        offs = tl.arange(0, HALF)
        cos = tl.load(COS_SIN_ROW + offs).to(x1.dtype)
        sin = tl.load(COS_SIN_ROW + HALF + offs).to(x1.dtype)
        return norm_rotate(x1, x2, W + offs, cos, sin, eps, HAS_NORM, HALF, HEAD_DIM, 0)

    @triton.jit
    def _qk_norm_rope_kernel(Q, K, V, QW, KW, COS_SIN, POS, K_CACHE, V_CACHE, SLOTS,
                             stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                             n_q_heads, n_kv_heads, eps, HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr,
                             HALF: tl.constexpr, HEAD_DIM: tl.constexpr, USE_PDL: tl.constexpr):
        """One program per (token, head) over q heads, then k heads, then (STORE_KV) v heads: the least
        latency for a few tokens (`_qk_norm_rope_token_kernel` does many tokens).

        q and k are rotated in place; with STORE_KV, k (rotated) and v are also written to their cache
        slot (cache rows [slot, kv_head, HEAD_DIM]), which saves the two scatter kernels per layer."""
        wait_previous(USE_PDL)
        t = tl.program_id(0)
        h = tl.program_id(1)
        offs = tl.arange(0, HALF)
        if h >= n_q_heads + n_kv_heads:  # v: only a copy into the cache
            hv = h - n_q_heads - n_kv_heads
            slot = tl.load(SLOTS + t)
            src = V + t * stride_vt + hv * stride_vh
            dst = V_CACHE + (slot * n_kv_heads + hv) * HEAD_DIM
            tl.store(dst + offs, tl.load(src + offs))
            tl.store(dst + HALF + offs, tl.load(src + HALF + offs))
        else:
            is_q = h < n_q_heads
            if is_q:
                base = Q + t * stride_qt + h * stride_qh
                wp = QW
            else:
                base = K + t * stride_kt + (h - n_q_heads) * stride_kh
                wp = KW
            x1 = tl.load(base + offs)
            x2 = tl.load(base + HALF + offs)
            y1, y2 = norm_rope_head(x1, x2, wp, COS_SIN + tl.load(POS + t) * stride_cs, eps, HAS_NORM, HALF, HEAD_DIM)
            tl.store(base + offs, y1)
            tl.store(base + HALF + offs, y2)
            if STORE_KV and h >= n_q_heads:
                slot = tl.load(SLOTS + t)
                dst = K_CACHE + (slot * n_kv_heads + h - n_q_heads) * HEAD_DIM
                tl.store(dst + offs, y1)
                tl.store(dst + HALF + offs, y2)

    @triton.jit
    def _norm_rope_heads(base, heads_mask, W, cos, sin, eps, HAS_NORM: tl.constexpr, HALF: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
        """Rows of heads at `base` ([heads, HALF] pointers to each head's first half): optional per-head
        RMSNorm, then rotary; stored in place, and returned (y1, y2)."""
        offs = tl.arange(0, HALF)
        m = heads_mask[:, None]
        x1 = tl.load(base, mask=m, other=0.0)
        x2 = tl.load(base + HALF, mask=m, other=0.0)
        y1, y2 = norm_rotate(x1, x2, (W + offs)[None, :], cos[None, :], sin[None, :], eps, HAS_NORM, HALF, HEAD_DIM, 1)
        tl.store(base, y1, mask=m)
        tl.store(base + HALF, y2, mask=m)
        return y1, y2

    @triton.jit
    def _qk_norm_rope_token_kernel(Q, K, V, QW, KW, COS_SIN, POS, K_CACHE, V_CACHE, SLOTS,
                                   stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
                                   n_q_heads, n_kv_heads, eps, HAS_NORM: tl.constexpr, STORE_KV: tl.constexpr,
                                   HALF: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_HQ: tl.constexpr,
                                   BLOCK_HK: tl.constexpr, USE_PDL: tl.constexpr):
        """One program per token over all its heads (as `_qk_norm_rope_kernel` computes them): fewer, fuller
        programs for batches of many tokens."""
        wait_previous(USE_PDL)
        t = tl.program_id(0)
        offs = tl.arange(0, HALF)
        pos = tl.load(POS + t)
        cos = tl.load(COS_SIN + pos * stride_cs + offs).to(Q.dtype.element_ty)
        sin = tl.load(COS_SIN + pos * stride_cs + HALF + offs).to(Q.dtype.element_ty)
        hq = tl.arange(0, BLOCK_HQ)
        _norm_rope_heads(Q + t * stride_qt + hq[:, None] * stride_qh + offs[None, :], hq < n_q_heads, QW, cos, sin, eps,
                         HAS_NORM, HALF, HEAD_DIM)
        hk = tl.arange(0, BLOCK_HK)
        k_mask = hk < n_kv_heads
        y1, y2 = _norm_rope_heads(K + t * stride_kt + hk[:, None] * stride_kh + offs[None, :], k_mask, KW, cos, sin, eps,
                                  HAS_NORM, HALF, HEAD_DIM)
        if STORE_KV:
            slot = tl.load(SLOTS + t)
            row = (slot * n_kv_heads + hk[:, None]) * HEAD_DIM + offs[None, :]
            m = k_mask[:, None]
            tl.store(K_CACHE + row, y1, mask=m)
            tl.store(K_CACHE + row + HALF, y2, mask=m)
            src = V + t * stride_vt + hk[:, None] * stride_vh + offs[None, :]
            tl.store(V_CACHE + row, tl.load(src, mask=m), mask=m)
            tl.store(V_CACHE + row + HALF, tl.load(src + HALF, mask=m), mask=m)

    @triton.jit
    def _silu_mul_kernel(X, Y, stride_x, stride_y, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
        wait_previous(USE_PDL)
        row = tl.program_id(0)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n
        g = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
        u = tl.load(X + row * stride_x + n + cols, mask=mask, other=0.0)
        gf = g.to(tl.float32)
        # torch computes silu in float32 and rounds before the product, in the input dtype
        s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)
        tl.store(Y + row * stride_y + cols, s * u, mask=mask)

    @triton.jit
    def _embed_kernel(IDS, SRC, PREV, W, Y, stride_w, stride_y, n_cols, BLOCK: tl.constexpr):
        """Row t's token is PREV[SRC[t]] when SRC[t] >= 0 (sampled by the previous step, not yet on the
        host), else IDS[t]; Y[t] = W[token]."""
        row = tl.program_id(0)
        src = tl.load(SRC + row)
        tok = tl.load(IDS + row)
        if src >= 0:
            tok = tl.load(PREV + src)
        cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = cols < n_cols
        tl.store(Y + row * stride_y + cols, tl.load(W + tok * stride_w + cols, mask=mask), mask=mask)


def rmsnorm(x: torch.Tensor | SplitSum, weight: torch.Tensor, eps: float,
            residual: torch.Tensor | None = None) -> torch.Tensor:
    """y = weight * norm(x [+ residual]); with a residual, it is updated in place to x + residual. `x` may be a split-K
    matmul's partials (rows_matmul.SplitSum), whose sum is this kernel's first step."""
    if isinstance(x, SplitSum):
        splits, x2 = x.partials.shape[0], x.partials
        y = torch.empty(x.shape, dtype=x.dtype, device=x2.device)
        stride_x, stride_split = x2.stride(1), x2.stride(0)
    else:
        splits, x2 = 1, x.reshape(-1, x.shape[-1])
        y = torch.empty_like(x2)
        stride_x, stride_split = x2.stride(0), 0
    rows, n = y.shape
    r2 = residual.view(-1, n) if residual is not None else y
    use_pdl = pdl.enabled(y.device, rows)
    _rmsnorm_kernel[(rows,)](x2, r2, weight, y, stride_x, r2.stride(0), y.stride(0), stride_split, n, eps,
                             HAS_RES=residual is not None, SPLITS=splits, BLOCK=triton.next_power_of_2(n),
                             num_warps=4 if n <= 4096 else 8, USE_PDL=use_pdl, launch_pdl=use_pdl)
    return y.view(x.shape)


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None,
                 cos_sin: torch.Tensor, positions: torch.Tensor, eps: float,
                 kv_store: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> None:
    """In place on q [T, Hq, D] and k [T, Hkv, D] (views of the fused qkv output are fine).

    kv_store = (v [T, Hkv, D], k_cache, v_cache, slot_mapping [T]) also writes this step's rotated k
    and v into the paged cache (contiguous [..., page_size, Hkv, D] storage) at their slots."""
    T, hq, d = q.shape
    hk = k.shape[1]
    has_norm = q_weight is not None
    if kv_store is not None:
        v, k_cache, v_cache, slots = kv_store
        if not (k_cache.is_contiguous() and v_cache.is_contiguous()) or k_cache.shape[-2:] != (hk, d):
            raise ValueError(f"KV cache must be contiguous with rows of [{hk}, {d}], got {tuple(k_cache.shape)}")
    else:
        v, k_cache, v_cache, slots = k, k, k, positions
    use_pdl = pdl.enabled(q.device, T)
    if T >= TOKEN_GRID_MIN_TOKENS:
        _qk_norm_rope_token_kernel[(T,)](
            q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, cos_sin, positions, k_cache, v_cache, slots,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0), hq, hk, eps,
            HAS_NORM=has_norm, STORE_KV=kv_store is not None, HALF=d // 2, HEAD_DIM=d, BLOCK_HQ=triton.next_power_of_2(hq),
            BLOCK_HK=triton.next_power_of_2(hk), num_warps=4, USE_PDL=use_pdl, launch_pdl=use_pdl,
        )
        return
    _qk_norm_rope_kernel[(T, hq + hk + (hk if kv_store is not None else 0))](
        q, k, v, q_weight if has_norm else q, k_weight if has_norm else k, cos_sin, positions, k_cache, v_cache, slots,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0), hq, hk, eps,
        HAS_NORM=has_norm, STORE_KV=kv_store is not None, HALF=d // 2, HEAD_DIM=d, num_warps=1 if d <= 128 else 2,
        USE_PDL=use_pdl, launch_pdl=use_pdl,
    )


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """x [T, 2I] (gate | up) -> silu(gate) * up [T, I]."""
    n = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * n)
    y = torch.empty((x2.shape[0], n), dtype=x.dtype, device=x.device)
    block = 1024
    use_pdl = pdl.enabled(x.device, x2.shape[0])
    _silu_mul_kernel[(x2.shape[0], triton.cdiv(n, block))](x2, y, x2.stride(0), y.stride(0), n, BLOCK=block, num_warps=4,
                                                           USE_PDL=use_pdl, launch_pdl=use_pdl)
    return y.view(*x.shape[:-1], n)


def embed_pending(ids: torch.Tensor, src: torch.Tensor, prev: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Embedding rows for ids [T], where src [T] >= 0 takes the token from prev[src] instead: the inputs a
    CUDA graph step takes from the step still in flight, resolved inside the graph."""
    T, n = ids.shape[0], weight.shape[1]
    y = torch.empty((T, n), dtype=weight.dtype, device=weight.device)
    block = min(triton.next_power_of_2(n), 4096)
    _embed_kernel[(T, triton.cdiv(n, block))](ids, src, prev, weight, y, weight.stride(0), y.stride(0), n, BLOCK=block,
                                               num_warps=4)
    return y
