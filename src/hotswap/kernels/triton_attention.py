"""Triton paged-attention kernels for the GPU backend.

KV cache contract (per layer): ``k_cache``, ``v_cache`` of shape
``[num_pages, page_size, num_kv_heads, head_dim]`` (bf16 / fp16 / fp32, last dim contiguous),
``page_size`` a power of two (1..256). Position ``p`` of sequence ``b`` lives at page
``page_table[b, p // page_size]``, slot ``p % page_size``.

Two entry points:

* :func:`paged_decode_attention` -- one query token per sequence. Split-KV ("flash decoding"):
  grid ``(num_kv_heads, B, num_splits)`` (optionally with the sequences in a given order, longest first);
  each program handles all ``Hq // Hkv`` query heads
  of one KV head (GQA group packed into one tile, so every KV element is read once) over one
  contiguous chunk of the context, writes a partial output + log-sum-exp into fp32 scratch,
  and the last of a sequence's splits to finish merges them (kernels/arrival.py; with
  ``HOTSWAP_DECODE_MERGE=0`` a second small kernel does). With ``num_splits == 1`` the kernel
  writes the final output directly (no scratch). ``num_splits`` and the fewest keys a split takes
  are chosen from *shapes only* (batch, kv heads, page-table width, SM count), so the call is
  CUDA-graph capturable: no host syncs, no data-dependent allocation. Inside the kernel, short sequences
  use fewer of the splits (the idle ones write nothing the merge reads), and a sequence left with one
  split writes its final output itself (the merge skips it: no scratch round trip).

* :func:`paged_prefill_attention` -- ragged batch of causal "extend" chunks (prefix already in
  the cache + new tokens whose KV is also already written), flash-attention online softmax
  with K/V tiles gathered through the page table. Grid ``(Hq, B, q_blocks)``; the q blocks with
  the longest causal range are launched first. Fully visible KV blocks run without masks, only
  the blocks crossing the diagonal are masked. Rows with ``q_len == 1`` may be mixed in (they
  waste most of a 128-row tile: batches of pure decode rows belong to the decode kernel).
  A variant that packs the GQA group into one tile exists (``pack_gqa``) but measured slower
  on H100 for Hq/Hkv = 2, so it is off by default.

Both accumulate in fp32 and return the dtype of ``q``. Sequences with ``seq_len == 0``
(e.g. padding rows of a CUDA-graph batch) produce zeros in decode, never NaN.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from hotswap.kernels import arrival, pdl
from hotswap.kernels.sm_count import sm_count

try:  # Triton is optional: the module must import on CPU-only machines without it.
    import triton
    import triton.language as tl

    from hotswap.kernels.pdl import wait_previous

    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised only where triton is absent
    triton = None
    tl = None
    HAS_TRITON = False

__all__ = [
    "HAS_TRITON",
    "paged_decode_attention",
    "paged_prefill_attention",
    "DecodePlan",
    "decode_plan",
    "prefill_tile_tokens",
    "MAX_DECODE_SPLITS",
]

#: Upper bound on the number of KV splits of the decode kernel. Scratch for a decode call is
#: ``B * Hq * num_splits * (head_dim + 1) * 4`` bytes, so at most
#: ``B * Hq * MAX_DECODE_SPLITS * (head_dim + 1) * 4``.
MAX_DECODE_SPLITS = 64

#: Splits merged by the last of them to finish (kernels/arrival.py: a counter per sequence and KV head) instead
#: of by a second kernel; `HOTSWAP_DECODE_MERGE=0` launches the merge kernel (the A/B switch of the benches).
_MERGE_IN_PLACE = os.environ.get("HOTSWAP_DECODE_MERGE", "1") != "0"
# Decode splits load their first block of cached keys before the PDL wait (`HOTSWAP_DECODE_PRELOAD=0`: after it, the
# benches' A/B switch), where the (sequence, KV head) pairs are at most one an SM. H100, 0.6B shape, one call: batch 1
# graph 0.835 -> 0.788 ms (the attention's share of its critical path 7.6 -> 6.5 us a layer), batch 16 41.1 -> 42.3 % of
# the roofline; at batch 32 / 64 (two and four pairs an SM) the early loads compete with the q/k/v matmul still running,
# 45.1 -> 42.5 % and 46.8 -> 42.9 %.
_PRELOAD = os.environ.get("HOTSWAP_DECODE_PRELOAD", "1") != "0"
# Decode loads the cached keys and values evict-first (`HOTSWAP_EVICT_FIRST=0`: as any other data, the benches' A/B
# switch). At batch 64 x 192 keys a 0.6B layer's KV is 50 MB, an H100's whole L2, streamed once a step, while under PDL
# the matmul after attention asks L2 for its first weight lines; the hint leaves those in place. H100, 0.6B shape: the
# batch-64 decode graph 1.558 -> 1.523 ms (attention's share of its critical path 20.4 -> 18.3 us a layer); in another
# call batch 64 34,309 / 34,517 -> 34,944 / 35,125 tokens/s, the sampled rollout 10.58 -> 10.36 s. The same hint on the
# matmuls' weight loads measured nothing (1.556 ms).
_KV_EVICT = "evict_first" if os.environ.get("HOTSWAP_EVICT_FIRST", "1") != "0" else ""
# Measured and dropped (thirty-seventh session, H100): later blocks loading keys and values together with the next
# block's pages looked up meanwhile: batch-64 attention 545 against 536 us a step, the values held through the dot.
# Measured and dropped (thirty-eighth session, H100, 31353b0): small batches' splits of 32 keys in the same 64-key tiles
# (a short context over twice the programs): batch 1 1,177 / 1,182 against 1,226-1,236 tokens/s, attention 7.39 against
# 6.51 us a layer on the batch-1 graph's critical path; alone, 28 layers at 1 x 192 keys 7.0 against 5.6 us a call.
# Measured and dropped (fortieth session, H100, eb4cf32): at long contexts, the splits that the chunks' rounding up to
# whole key blocks leaves without keys (2,300 keys over 33 splits: 15) exiting at once and left out of the merge's count:
# batch 1 at 2,048 + 512 tokens 995 / 997 against 1,014 / 1,014 tokens/s without it.

# Tunables (defaults; measured on H100, see bench/attention_kernels.py).
_DECODE_TARGET_CTAS_PER_SM = 2  # aim for about this many split-programs per SM
_DECODE_MIN_CHUNK = 64  # a split never gets fewer tokens than this (inside the kernel)
# Mid-size batches (one program per sequence and KV head already fills the GPU, but fewer than this many such
# programs an SM): split only the long sequences, in up to _LONG_SPLITS chunks of at least _LONG_MIN_CHUNK keys.
# A rollout's mixed contexts at batch 64 (0.6B heads, H100, `attention_kernels.py --sweep mix`): one split 100.3 us
# (48 % of the copy floor; the step ends on the long sequences' programs), 4 splits 63.6-67.4 us (71-75 %).
# Uniform contexts up to the minimum chunk keep one split a sequence (85-97 % there).
_LONG_SPLIT_MAX_PAIRS_PER_SM = 8
_LONG_SPLITS = 4
_LONG_MIN_CHUNK = 256

_LOG2E = 1.4426950408889634


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _require_triton(*tensors: torch.Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError(
            "hotswap.kernels.triton_attention needs Triton (pip install triton) and a CUDA GPU; "
            "Triton could not be imported on this machine."
        )
    if not _interpret():
        for t in tensors:
            if not t.is_cuda:
                raise RuntimeError(
                    "hotswap.kernels.triton_attention: all tensors must be CUDA tensors "
                    f"(got a tensor on {t.device})."
                )


def _next_pow2(x: int) -> int:
    return 1 << max(0, (int(x) - 1).bit_length())


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor):
    if k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError("k_cache / v_cache must be [num_pages, page_size, num_kv_heads, head_dim]")
    if k_cache.shape != v_cache.shape:
        raise ValueError(f"k_cache {tuple(k_cache.shape)} and v_cache {tuple(v_cache.shape)} differ")
    if k_cache.dtype != v_cache.dtype:
        raise ValueError("k_cache and v_cache dtypes differ")
    _, page_size, hkv, d = k_cache.shape
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        # pages may be strided (e.g. a slice of a bigger buffer); each page must be a dense
        # [page_size, Hkv, D] block.
        if c.stride()[1:] != (hkv * d, d, 1):
            raise ValueError(
                f"{name}: each page must be a contiguous [page_size, Hkv, D] block, got strides {c.stride()}"
            )
    if page_size & (page_size - 1):
        raise ValueError(f"page_size must be a power of two, got {page_size}")
    return page_size, hkv, d


def _precision(q: torch.Tensor) -> str:
    """tl.dot's input precision: float32 models get float32 products (Triton's default for float32 is TF32, whose
    10-bit mantissa moved logprobs by ~1e-3 against the CPU engine); bf16/fp16 inputs ignore it."""
    return "ieee" if q.dtype == torch.float32 else "tf32"


def _last_dim_contig(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------
if HAS_TRITON:
    # a sequence that used at most this many splits merges them in a tile of this many rows (`_merge_splits`)
    _SMALL_SPLITS = tl.constexpr(8)

    @triton.jit
    def _softmax_step(qk, v, m_i, l_i, acc, PREC: tl.constexpr):
        """One key/value block of the online softmax: `qk` is scaled (base 2) and masked; returns the
        running max, denominator and unnormalised output."""
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(qk - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        return m_new, l_i, acc

    @triton.jit
    def _kv_offsets(pt_row, pos, n_mask, offs_d, d_mask, stride_kp, stride_vp,
                    STRIDE_T: tl.constexpr, PAGE_SIZE: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Offsets of the K and V rows of keys at positions `pos` ([BLOCK_N]) in one sequence's pages, and
        the load mask. Inside a page a key's heads are dense: row `slot` of a KV head is at slot * STRIDE_T."""
        page = tl.load(pt_row + pos // PAGE_SIZE, mask=n_mask, other=0).to(tl.int64)
        row = (pos % PAGE_SIZE).to(tl.int64) * STRIDE_T
        if BLOCK_D == HEAD_DIM:
            kv_mask = n_mask[:, None]
        else:
            kv_mask = n_mask[:, None] & d_mask[None, :]
        return (page * stride_kp + row)[:, None] + offs_d[None, :], (page * stride_vp + row)[:, None] + offs_d[None, :], kv_mask

    @triton.jit
    def _active_splits(seq_len, num_splits, MIN_CHUNK: tl.constexpr):
        """Splits a sequence of `seq_len` keys uses: at least MIN_CHUNK keys each, at most `num_splits`."""
        return tl.maximum(tl.minimum(tl.cdiv(seq_len, MIN_CHUNK), num_splits), 1)

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, PT, SEQ, ORDER, MID_O, MID_LSE, OUT, COUNTERS,
        qk_scale,  # scale * log2(e)
        stride_qb, stride_qh,
        stride_kp, stride_vp,  # page strides (inside a page: [PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM] dense)
        stride_ptb,
        stride_ob, stride_oh,
        num_splits,  # splits of this launch (grid dim 2); scratch MID_* is [B, Hq, num_splits, (D)]
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        BLOCK_H: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        BLOCK_N: tl.constexpr,
        DIRECT: tl.constexpr,
        MIN_CHUNK: tl.constexpr,
        HAS_ORDER: tl.constexpr,
        MERGE: tl.constexpr,
        BLOCK_S: tl.constexpr,
        USE_PDL: tl.constexpr,
        PRELOAD: tl.constexpr,
        KV_EVICT: tl.constexpr,
        PREC: tl.constexpr,
    ):
        # Neighbouring programs are one sequence's KV heads (they read the same pages), and with ORDER the
        # sequences start longest first, so the last wave of a step with mixed lengths is a short one
        hk = tl.program_id(0)
        b = tl.program_id(1)
        # ORDER and SEQ are the step's staged inputs, which no kernel of the step writes: read before the wait
        if HAS_ORDER:
            b = tl.load(ORDER + b)
        split = tl.program_id(2)

        seq_len = tl.load(SEQ + b).to(tl.int32)
        # Splits actually used by this sequence (the shape-fixed num_splits is an upper bound); the others
        # write nothing, and the merge reads only these (`_active_splits` in the merge kernel too). An unused split
        # exits without waiting for the previous kernel (pdl.py), so it holds no SM slot through that kernel's
        # tail; split 0 of every (sequence, KV head) waits, so the launch still ends after the previous one.
        n_split = _active_splits(seq_len, num_splits, MIN_CHUNK)
        if split < n_split:
            chunk = tl.cdiv(tl.cdiv(seq_len, n_split), BLOCK_N) * BLOCK_N
            start = split * chunk
            end = tl.minimum(start + chunk, seq_len)

            offs_h = tl.arange(0, BLOCK_H)
            h_mask = offs_h < GROUP
            heads = hk * GROUP + offs_h
            offs_d = tl.arange(0, BLOCK_D)
            d_mask = offs_d < HEAD_DIM
            offs_n = tl.arange(0, BLOCK_N)
            pt_row = PT + b * stride_ptb
            k_base = K + hk * HEAD_DIM
            v_base = V + hk * HEAD_DIM
            stride_t: tl.constexpr = NUM_KV_HEADS * HEAD_DIM

            # The split's first block of keys. Every key but the step's own (position seq_len - 1, which the q/k/v
            # kernel before this one writes) was cached by earlier steps, and the page table is a staged input: with
            # PRELOAD those keys load before the wait, while the previous kernel still runs, and only the step's own
            # key after it.
            pos = start + offs_n
            n_mask = pos < end
            k_off, v_off, kv_mask = _kv_offsets(pt_row, pos, n_mask, offs_d, d_mask, stride_kp, stride_vp,
                                                stride_t, PAGE_SIZE, HEAD_DIM, BLOCK_D)
            if PRELOAD:
                cached = kv_mask & (pos < seq_len - 1)[:, None]
                k = tl.load(k_base + k_off, mask=cached, other=0.0, eviction_policy=KV_EVICT)
                v = tl.load(v_base + v_off, mask=cached, other=0.0, eviction_policy=KV_EVICT)
                wait_previous(USE_PDL)
                own = kv_mask & (pos == seq_len - 1)[:, None]
                k = tl.where(own, tl.load(k_base + k_off, mask=own, other=0.0), k)
                v = tl.where(own, tl.load(v_base + v_off, mask=own, other=0.0), v)
            else:
                wait_previous(USE_PDL)
                k = tl.load(k_base + k_off, mask=kv_mask, other=0.0, eviction_policy=KV_EVICT)
                v = tl.load(v_base + v_off, mask=kv_mask, other=0.0, eviction_policy=KV_EVICT)

            q = tl.load(
                Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=h_mask[:, None] & d_mask[None, :],
                other=0.0,
            )
            q = q.to(K.dtype.element_ty)

            m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_H], tl.float32)
            acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
            if start < end:  # an empty sequence (a graph's padding row) keeps its zero output
                qk = tl.dot(q, tl.trans(k), input_precision=PREC)
                qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
                m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PREC)

            for s in range(start + BLOCK_N, end, BLOCK_N):
                pos = s + offs_n
                n_mask = pos < end
                k_off, v_off, kv_mask = _kv_offsets(pt_row, pos, n_mask, offs_d, d_mask, stride_kp, stride_vp,
                                                    stride_t, PAGE_SIZE, HEAD_DIM, BLOCK_D)
                k = tl.load(k_base + k_off, mask=kv_mask, other=0.0, eviction_policy=KV_EVICT)
                qk = tl.dot(q, tl.trans(k), input_precision=PREC)
                qk = tl.where(n_mask[None, :], qk * qk_scale, float("-inf"))
                v = tl.load(v_base + v_off, mask=kv_mask, other=0.0, eviction_policy=KV_EVICT)
                m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PREC)

            l_safe = tl.where(l_i > 0.0, l_i, 1.0)
            o = acc / l_safe[:, None]
            o_mask = h_mask[:, None] & d_mask[None, :]
            out_ptrs = OUT + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :]
            if DIRECT:
                tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=o_mask)
            elif n_split == 1:  # this sequence used one split: its output is final (the merge skips it), bit for bit
                tl.store(out_ptrs, o.to(OUT.dtype.element_ty), mask=o_mask)
            else:
                lse = tl.where(l_i > 0.0, m_i + tl.log2(l_safe), float("-inf"))
                row0 = (b * (NUM_KV_HEADS * GROUP) + heads) * num_splits  # [BLOCK_H]
                tl.store(MID_O + (row0 + split)[:, None] * HEAD_DIM + offs_d[None, :], o, mask=o_mask)
                tl.store(MID_LSE + row0 + split, lse, mask=h_mask)
                if MERGE:
                    # The last of the sequence's splits to finish (for this KV head) merges them, so no second
                    # kernel is launched: the counter's atomic orders each split's stores before it (release) and
                    # the last one's loads after it (acquire); the loads skip L1, which is not coherent
                    counter = COUNTERS + b * NUM_KV_HEADS + hk
                    tl.debug_barrier()  # every thread's stores before the one thread's release
                    if tl.atomic_add(counter, 1, sem="acq_rel") == n_split - 1:
                        tl.store(counter, 0)  # zero again for the next launch
                        _merge_splits(MID_O, MID_LSE, OUT, b, hk, stride_ob, stride_oh, num_splits, n_split,
                                      NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_D, BLOCK_S)

    @triton.jit
    def _merge_splits(MID_O, MID_LSE, OUT, b, hk, stride_ob, stride_oh, num_splits, n_split, NUM_KV_HEADS: tl.constexpr,
                      GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """The GROUP query heads of sequence b's KV head hk (MID_* [B, Hq, num_splits, (D)]): each head's n_split partial
        outputs weighted by exp2(lse - max lse), into OUT. A split that saw no key (lse = -inf) weighs 0. Each head's
        partials load as one [splits, D] tile, every head's loads issued together, so the merge waits on L2 about once
        whatever the splits. H100, 0.6B shape, against the loop over splits it replaced (0fdb108): batch 1 at 2,048 +
        512 tokens 812 -> 987-989 tokens/s; at 128 + 128 1,195 / 1,214 -> 1,175 / 1,179, a tile of the launch's 64 rows
        (33 splits launched, 2-4 used). Masked rows still issue their instructions and widen the reductions (sm_90 PTX at
        33 splits: 20 more barriers and 28 more L2 load instructions than the loop; at 8 rows, 4 more and 12 fewer), so
        a sequence of at most _SMALL_SPLITS splits merges a tile of that many rows: batch 1 at 128 + 128 1,178 / 1,181 ->
        1,250 / 1,210 tokens/s (H100, fortieth session; the loop's 1,195 / 1,214 in the thirty-ninth). The loads skip L1,
        which is not coherent with the other splits' stores."""
        if BLOCK_S > _SMALL_SPLITS:
            if n_split <= _SMALL_SPLITS:
                _merge_tile(MID_O, MID_LSE, OUT, b, hk, stride_ob, stride_oh, num_splits, n_split, NUM_KV_HEADS, GROUP,
                            HEAD_DIM, BLOCK_D, _SMALL_SPLITS)
                return
        _merge_tile(MID_O, MID_LSE, OUT, b, hk, stride_ob, stride_oh, num_splits, n_split, NUM_KV_HEADS, GROUP,
                    HEAD_DIM, BLOCK_D, BLOCK_S)

    @triton.jit
    def _merge_tile(MID_O, MID_LSE, OUT, b, hk, stride_ob, stride_oh, num_splits, n_split, NUM_KV_HEADS: tl.constexpr,
                    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr):
        """`_merge_splits` over a [BLOCK_S, D] tile a head (n_split <= BLOCK_S)."""
        offs_s = tl.arange(0, BLOCK_S)
        s_mask = offs_s < n_split
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        first_head = (b * NUM_KV_HEADS + hk) * GROUP
        out_row = OUT + b * stride_ob + hk * GROUP * stride_oh
        for g in tl.static_range(GROUP):
            row0 = (first_head + g) * num_splits
            lse = tl.load(MID_LSE + row0 + offs_s, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
            m = tl.max(lse, 0)
            m = tl.where(m == float("-inf"), 0.0, m)
            w = tl.exp2(lse - m)
            denom = tl.sum(w, 0)
            denom = tl.where(denom > 0.0, denom, 1.0)
            o = tl.load(MID_O + (row0 + offs_s)[:, None] * HEAD_DIM + offs_d[None, :],
                        mask=(s_mask & (lse > float("-inf")))[:, None] & d_mask[None, :], other=0.0, cache_modifier=".cg")
            merged = tl.sum(o * w[:, None], 0) / denom
            tl.store(out_row + g * stride_oh + offs_d, merged.to(out_row.dtype.element_ty), mask=d_mask)

    @triton.jit
    def _decode_reduce_kernel(
        MID_O, MID_LSE, SEQ, OUT,
        stride_ob, stride_oh,
        num_splits,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        BLOCK_S: tl.constexpr,
        MIN_CHUNK: tl.constexpr,
        USE_PDL: tl.constexpr,
    ):
        """The merge as a kernel of its own (`HOTSWAP_DECODE_MERGE=0`, or more groups than arrival counters):
        program (KV head, sequence) runs the in-place merge's `_merge_splits`, so both give the same bits."""
        wait_previous(USE_PDL)
        hk = tl.program_id(0)
        b = tl.program_id(1)
        n_split = _active_splits(tl.load(SEQ + b).to(tl.int32), num_splits, MIN_CHUNK)
        if n_split > 1:  # a sequence of one split wrote its output itself
            _merge_splits(MID_O, MID_LSE, OUT, b, hk, stride_ob, stride_oh, num_splits, n_split,
                          NUM_KV_HEADS, GROUP, HEAD_DIM, BLOCK_D, BLOCK_S)

    @triton.jit
    def _prefill_kernel(
        Q, K, V, PT, CUQ, SEQ, O, TILES, n_tiles,
        qk_scale,  # scale * log2(e)
        stride_qt, stride_qh,
        stride_kp, stride_vp,  # page strides (inside a page: [PAGE_SIZE, NUM_KV_HEADS, HEAD_DIM] dense)
        stride_ptb,
        stride_ot, stride_oh,
        NUM_KV_HEADS: tl.constexpr,
        GROUP: tl.constexpr,
        HEAD_DIM: tl.constexpr,
        BLOCK_D: tl.constexpr,
        PAGE_SIZE: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        PACK_GQA: tl.constexpr,
        USE_TILES: tl.constexpr,
        USE_PDL: tl.constexpr,
        PREC: tl.constexpr,
    ):
        wait_previous(USE_PDL)
        # Tile = BLOCK_M rows. With PACK_GQA the rows are (token, query head) pairs of all GROUP
        # query heads sharing one KV head (token-major), so each K/V tile loaded serves them all;
        # otherwise one query head per program.
        if PACK_GQA:
            HPT: tl.constexpr = GROUP  # query heads per tile
            hk = tl.program_id(0)
            head0 = hk * GROUP
        else:
            HPT: tl.constexpr = 1
            head0 = tl.program_id(0)
            hk = head0 // GROUP
        TOK: tl.constexpr = BLOCK_M // HPT  # query tokens per tile
        if USE_TILES:
            # a host-built list of (sequence, token block), heaviest first, padded with b = -1: the grid
            # is fixed by the token count alone (CUDA graphs), not by the longest sequence
            b = tl.load(TILES + tl.program_id(1))
            if b < 0:
                return
            tblk = tl.load(TILES + n_tiles + tl.program_id(1))
        else:
            b = tl.program_id(1)
            # Heaviest (last, longest causal range) token blocks are launched first.
            tblk = tl.num_programs(2) - 1 - tl.program_id(2)

        q_start = tl.load(CUQ + b).to(tl.int32)
        q_len = tl.load(CUQ + b + 1).to(tl.int32) - q_start
        m_start = tblk * TOK
        if m_start >= q_len:
            return
        kv_len = tl.load(SEQ + b).to(tl.int32)
        prefix = kv_len - q_len

        r = tl.arange(0, BLOCK_M)
        offs_m = m_start + r // HPT  # query token index within the sequence
        heads = head0 + r % HPT
        m_mask = (r < TOK * HPT) & (offs_m < q_len)
        offs_d = tl.arange(0, BLOCK_D)
        d_mask = offs_d < HEAD_DIM
        offs_n = tl.arange(0, BLOCK_N)
        rows = (q_start + offs_m).to(tl.int64)

        q = tl.load(
            Q + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
            mask=m_mask[:, None] & d_mask[None, :],
            other=0.0,
        )
        q = q.to(K.dtype.element_ty)
        q_pos = prefix + offs_m

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        pt_row = PT + b * stride_ptb
        k_base = K + hk * HEAD_DIM
        v_base = V + hk * HEAD_DIM
        stride_t: tl.constexpr = NUM_KV_HEADS * HEAD_DIM

        # Phase 1: KV positions every row of this tile attends (strictly before the tile's
        # first query position), whole blocks only: no masks at all.
        full_end = ((prefix + m_start) // BLOCK_N) * BLOCK_N
        for s in range(0, full_end, BLOCK_N):
            pos = s + offs_n
            page = tl.load(pt_row + pos // PAGE_SIZE).to(tl.int64)
            slot = (pos % PAGE_SIZE).to(tl.int64)
            if BLOCK_D == HEAD_DIM:
                k = tl.load(k_base + page[:, None] * stride_kp + slot[:, None] * stride_t + offs_d[None, :])
            else:
                k = tl.load(
                    k_base + page[:, None] * stride_kp + slot[:, None] * stride_t + offs_d[None, :],
                    mask=d_mask[None, :],
                    other=0.0,
                )
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            if BLOCK_D == HEAD_DIM:
                v = tl.load(v_base + page[:, None] * stride_vp + slot[:, None] * stride_t + offs_d[None, :])
            else:
                v = tl.load(
                    v_base + page[:, None] * stride_vp + slot[:, None] * stride_t + offs_d[None, :],
                    mask=d_mask[None, :],
                    other=0.0,
                )
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PREC)

        # Phase 2: blocks crossing the causal diagonal of this tile.
        causal_end = prefix + tl.minimum(m_start + TOK, q_len)  # exclusive, <= kv_len
        for s in range(full_end, causal_end, BLOCK_N):
            pos = s + offs_n
            n_mask = pos < causal_end
            k_off, v_off, kv_mask = _kv_offsets(pt_row, pos, n_mask, offs_d, d_mask, stride_kp, stride_vp,
                                                stride_t, PAGE_SIZE, HEAD_DIM, BLOCK_D)
            k = tl.load(k_base + k_off, mask=kv_mask, other=0.0)
            qk = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            keep = (pos[None, :] <= q_pos[:, None]) & n_mask[None, :]
            qk = tl.where(keep, qk, float("-inf"))
            v = tl.load(v_base + v_off, mask=kv_mask, other=0.0)
            m_i, l_i, acc = _softmax_step(qk, v, m_i, l_i, acc, PREC)

        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        o = acc / l_safe[:, None]
        tl.store(
            O + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
            o.to(O.dtype.element_ty),
            mask=m_mask[:, None] & d_mask[None, :],
        )


# ----------------------------------------------------------------------------------------
# Launch helpers
# ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DecodePlan:
    """How the decode kernel covers a batch: KV splits (the grid's third dim), the fewest keys a split takes
    (a sequence uses ``min(ceil(len / min_chunk), num_splits)`` of them) and pipeline stages."""

    num_splits: int
    min_chunk: int = _DECODE_MIN_CHUNK
    num_stages: int = 2


def decode_plan(batch: int, num_kv_heads: int, max_kv_len: int, device=None) -> DecodePlan:
    """The decode launch for these *shapes* (never data values).

    ``max_kv_len`` is the KV capacity of the page table (``page_table.shape[1] * page_size``).
    Deterministic for a given (batch, kv heads, capacity, GPU), so a CUDA graph captured for
    a batch size keeps using the same scratch layout on replay.

    Pipeline stages, measured on the H100 (`bench/attention_kernels.py --sweep decode|mix`): two where
    sequences split (one was faster alone at batch 1 but slower inside the decode graph, 1,205 -> 1,179
    tokens/s) and from 8 programs an SM up (a rollout's 512 x 0.6B heads 384.5 -> 379.9 us, 256 x 8B heads
    209.9 -> 205.8; uniform 256 x 384 keys 137.2 / 137.8); one between (more programs fit an SM: uniform
    64 x 192 keys 20.0 against 21.3 us, 128 x 256 48.5 against 49.6).
    """
    if device is None:
        device = torch.device("cuda") if (torch.cuda.is_available() and not _interpret()) else torch.device("cpu")
    sms = sm_count(torch.device(device))
    pairs = max(1, batch * num_kv_heads)
    want = -(-_DECODE_TARGET_CTAS_PER_SM * sms // pairs)
    min_chunk, stages = _DECODE_MIN_CHUNK, 2
    if want == 1 and pairs <= _LONG_SPLIT_MAX_PAIRS_PER_SM * sms:
        want, min_chunk, stages = _LONG_SPLITS, _LONG_MIN_CHUNK, 1
    cap = max(1, -(-max_kv_len // min_chunk))
    return DecodePlan(int(max(1, min(want, cap, MAX_DECODE_SPLITS))), min_chunk, stages)


def _decode_config(head_dim: int, dtype: torch.dtype, plan: DecodePlan):
    """Launch parameters of a plan: 64-key tiles (32 for float32 or heads over 128)."""
    block_d = max(16, _next_pow2(head_dim))
    block_n = 64 if block_d <= 128 else 32
    if dtype == torch.float32:
        block_n = min(block_n, 32)
    return dict(num_splits=plan.num_splits, block_n=block_n, num_warps=4, num_stages=plan.num_stages,
                min_chunk=plan.min_chunk)


def _decode_launch(
    q, k_cache, v_cache, page_table, seq_lens, scale, out,
    *, num_splits: int, block_n: int, num_warps: int, num_stages: int,
    min_chunk: int = _DECODE_MIN_CHUNK, order: Optional[torch.Tensor] = None,
):
    B, Hq, D = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    group = Hq // Hkv
    block_d = max(16, _next_pow2(D))
    num_splits = int(max(1, min(num_splits, MAX_DECODE_SPLITS)))
    min_chunk = max(int(min_chunk), block_n)
    counters = None
    if num_splits > 1:
        mid_o = torch.empty((B, Hq, num_splits, D), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((B, Hq, num_splits), dtype=torch.float32, device=q.device)
        if _MERGE_IN_PLACE and B * Hkv <= arrival.SIZE:
            counters = arrival.counters(q.device)
    else:  # unused: with one split the kernel writes the output directly (DIRECT)
        mid_o = mid_lse = out
    use_pdl = pdl.enabled(q.device, B)
    _decode_split_kernel[(Hkv, B, num_splits)](
        q, k_cache, v_cache, page_table, seq_lens, seq_lens if order is None else order, mid_o, mid_lse, out,
        seq_lens if counters is None else counters,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), v_cache.stride(0),
        page_table.stride(0),
        out.stride(0), out.stride(1),
        num_splits,
        NUM_KV_HEADS=Hkv,
        GROUP=group,
        BLOCK_H=max(16, _next_pow2(group)),
        HEAD_DIM=D,
        BLOCK_D=block_d,
        PAGE_SIZE=page_size,
        BLOCK_N=block_n,
        DIRECT=num_splits == 1,
        MIN_CHUNK=min_chunk,
        HAS_ORDER=order is not None,
        MERGE=counters is not None,
        BLOCK_S=_next_pow2(num_splits),
        USE_PDL=use_pdl,
        PRELOAD=_PRELOAD and B * Hkv <= sm_count(q.device),
        KV_EVICT=_KV_EVICT,
        PREC=_precision(q),
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=use_pdl,
    )
    if num_splits > 1 and counters is None:
        _decode_reduce_kernel[(Hkv, B)](
            mid_o, mid_lse, seq_lens, out,
            out.stride(0), out.stride(1),
            num_splits,
            NUM_KV_HEADS=Hkv,
            GROUP=group,
            HEAD_DIM=D,
            BLOCK_D=block_d,
            BLOCK_S=_next_pow2(num_splits),
            MIN_CHUNK=min_chunk,
            USE_PDL=use_pdl,
            num_warps=4,
            launch_pdl=use_pdl,
        )
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    out: Optional[torch.Tensor] = None,
    *,
    num_splits: Optional[int] = None,
    order: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Paged decode attention (one query token per sequence), split-KV.

    Args:
        q: ``[B, Hq, D]`` (last dim contiguous; other strides free, e.g. a view of a fused qkv).
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]``; ``Hq % Hkv == 0``.
        page_table: int32 (or int64) ``[B, max_pages]``; entries past a sequence's last page
            are never read.
        seq_lens: int32 (or int64) ``[B]``, KV length including the current token (whose KV is
            already in the cache). 0 is allowed (output row is zeros).
        scale: softmax scale (usually ``1/sqrt(D)``).
        out: optional ``[B, Hq, D]`` output (dtype of q); allocated if None.
        num_splits: override the shape-derived number of KV splits (1..MAX_DECODE_SPLITS; splits of at least 64 keys).
        order: optional int32 ``[B]``, a permutation of the rows: the order their programs start in. Longest
            KV first (``HostBatch.longest_first``) keeps a batch of mixed lengths from ending on a wave of long
            sequences (a rollout's 512 rows: 85 -> 99 % of the copy ceiling on an H100). Results do not depend on it.

    CUDA graphs: capturable. The only allocations are the output (if ``out`` is None) and, when
    ``num_splits > 1``, fp32 scratch ``[B, Hq, num_splits, D]`` + ``[B, Hq, num_splits]`` whose
    sizes depend on shapes only (and, once per device, the merge's arrival counters). Run once eagerly
    before capture so the kernels are compiled and the counters allocated.
    """
    _require_triton(q, k_cache, v_cache, page_table, seq_lens)
    if q.dim() != 3:
        raise ValueError(f"q must be [B, Hq, D], got {tuple(q.shape)}")
    page_size, Hkv, D = _check_cache(k_cache, v_cache)
    B, Hq, Dq = q.shape
    if Dq != D:
        raise ValueError(f"q head_dim {Dq} != cache head_dim {D}")
    if Hq % Hkv:
        raise ValueError(f"num query heads {Hq} not a multiple of num kv heads {Hkv}")
    if page_table.dim() != 2 or page_table.shape[0] < B or seq_lens.shape[0] < B:
        raise ValueError("page_table must be [B, max_pages] and seq_lens [B]")
    if order is not None and (order.shape != (B,) or order.dtype != torch.int32):
        raise ValueError(f"order must be int32 [B={B}], got {order.dtype} {tuple(order.shape)}")
    q = _last_dim_contig(q)
    page_table = _last_dim_contig(page_table)
    seq_lens = _last_dim_contig(seq_lens)
    if out is None:
        out = torch.empty((B, Hq, D), dtype=q.dtype, device=q.device)
    elif out.shape != (B, Hq, D) or out.stride(-1) != 1:
        raise ValueError(f"out must be [B, Hq, D] with contiguous last dim, got {tuple(out.shape)}")
    if B == 0:
        return out
    if num_splits is None:
        plan = decode_plan(B, Hkv, page_table.shape[1] * page_size, q.device)
    else:
        plan = DecodePlan(num_splits, num_stages=1 if num_splits == 1 else 2)
    return _decode_launch(q, k_cache, v_cache, page_table, seq_lens, scale, out, order=order,
                          **_decode_config(D, k_cache.dtype, plan))


def _prefill_config(head_dim: int, dtype: torch.dtype):
    block_d = max(16, _next_pow2(head_dim))
    if dtype == torch.float32:
        if block_d <= 64:
            return dict(block_m=64, block_n=32, num_warps=4, num_stages=2, pack_gqa=False)
        return dict(block_m=32, block_n=32, num_warps=4, num_stages=2, pack_gqa=False)
    if block_d <= 64:
        return dict(block_m=64, block_n=64, num_warps=4, num_stages=2, pack_gqa=False)
    if block_d <= 128:
        # GQA-packed tiles: each K/V block serves every query head of its group. Through the engine's tile
        # list on the H100 (Hq 16, Hkv 8) against unpacked 2-stage tiles: 64 x 128 new tokens 92 -> 57 us,
        # 8 x 1024 221 -> 128 us, 1 x 8192 1,174 -> 714 us
        return dict(block_m=128, block_n=32, num_warps=8, num_stages=3, pack_gqa=True)
    return dict(block_m=64, block_n=32, num_warps=8, num_stages=2, pack_gqa=False)


def prefill_tile_tokens(head_dim: int, num_heads: int, num_kv_heads: int, dtype: torch.dtype) -> int:
    """Query tokens per prefill program; a tile list for `tiles=` is built with this."""
    cfg = _prefill_config(head_dim, dtype)
    if cfg["pack_gqa"]:
        group = num_heads // num_kv_heads
        return max(cfg["block_m"], _next_pow2(group)) // group
    return cfg["block_m"]


def _prefill_launch(
    q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, max_q_len, scale, out, tiles,
    *, block_m: int, block_n: int, num_warps: int, num_stages: int, pack_gqa: bool = False,
):
    T, Hq, D = q.shape
    page_size, Hkv = k_cache.shape[1], k_cache.shape[2]
    B = seq_lens.shape[0]
    group = Hq // Hkv
    if pack_gqa:
        block_m = max(block_m, _next_pow2(group))
    heads = Hkv if pack_gqa else Hq
    if tiles is not None:
        grid = (heads, tiles.shape[1], 1)
    else:
        grid = (heads, B, triton.cdiv(int(max_q_len), block_m // group if pack_gqa else block_m))
    use_pdl = pdl.enabled(q.device, T)
    _prefill_kernel[grid](
        q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, out,
        tiles if tiles is not None else seq_lens, tiles.shape[1] if tiles is not None else 0,
        float(scale) * _LOG2E,
        q.stride(0), q.stride(1),
        k_cache.stride(0), v_cache.stride(0),
        page_table.stride(0),
        out.stride(0), out.stride(1),
        NUM_KV_HEADS=Hkv,
        GROUP=Hq // Hkv,
        HEAD_DIM=D,
        BLOCK_D=max(16, _next_pow2(D)),
        PAGE_SIZE=page_size,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        PACK_GQA=bool(pack_gqa),
        USE_TILES=tiles is not None,
        USE_PDL=use_pdl,
        PREC=_precision(q),
        num_warps=num_warps,
        num_stages=num_stages,
        launch_pdl=use_pdl,
    )
    return out


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    page_table: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    max_q_len: int,
    scale: float,
    out: Optional[torch.Tensor] = None,
    tiles: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Causal paged attention for a ragged batch of extend chunks.

    Args:
        q: ``[T, Hq, D]``; sequence ``b``'s queries are rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]``.
        k_cache, v_cache: ``[num_pages, page_size, Hkv, D]`` holding the prefix *and* the new
            tokens' KV.
        page_table: int32 ``[B, max_pages]``.
        cu_seqlens_q: int32 ``[B + 1]`` (B = ``seq_lens.shape[0]``).
        seq_lens: int32 ``[B]``: total KV length after this chunk. Query ``j`` of sequence ``b``
            sits at position ``seq_lens[b] - q_len_b + j`` and attends KV ``0..`` that position.
        max_q_len: Python int >= every q_len_b (sizes the grid; no device sync is done).
        scale: softmax scale.
        out: optional ``[T, Hq, D]`` output; allocated if None.
        tiles: optional int32 ``[2, n]``: program i handles token block ``tiles[1, i]`` (of
            ``prefill_tile_tokens`` queries) of sequence ``tiles[0, i]``, or nothing where that is -1.
            The grid then depends on n alone, so a CUDA graph can be replayed for any batch it covers.
    """
    _require_triton(q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens)
    if q.dim() != 3:
        raise ValueError(f"q must be [T, Hq, D], got {tuple(q.shape)}")
    page_size, Hkv, D = _check_cache(k_cache, v_cache)
    T, Hq, Dq = q.shape
    if Dq != D:
        raise ValueError(f"q head_dim {Dq} != cache head_dim {D}")
    if Hq % Hkv:
        raise ValueError(f"num query heads {Hq} not a multiple of num kv heads {Hkv}")
    B = seq_lens.shape[0]
    if cu_seqlens_q.shape[0] != B + 1:
        raise ValueError("cu_seqlens_q must have B + 1 entries")
    q = _last_dim_contig(q)
    page_table = _last_dim_contig(page_table)
    if out is None:
        out = torch.empty((T, Hq, D), dtype=q.dtype, device=q.device)
    elif out.shape != (T, Hq, D) or out.stride(-1) != 1:
        raise ValueError(f"out must be [T, Hq, D] with contiguous last dim, got {tuple(out.shape)}")
    if T == 0 or B == 0 or int(max_q_len) <= 0:
        return out
    cfg = _prefill_config(D, k_cache.dtype)
    return _prefill_launch(
        q, k_cache, v_cache, page_table, cu_seqlens_q, seq_lens, max_q_len, scale, out, tiles, **cfg
    )
