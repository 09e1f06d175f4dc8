"""Fused sampling over model-dtype logits [B, V] in two passes: temperature, counter-based Gumbel noise,
top-k / top-p / min-p without sorting, greedy rows, and each chosen token's logprob.

The eager PyTorch sampler it replaces read the [B, V] logits a dozen times (a float32 copy, int64 hash
lanes, a sort for top-p): at batch 512 on a 152K vocabulary that cost more than half a decode step.
Here pass 1 reads each row once, cut into chunks reduced in parallel (so one row still spreads over many
SMs at batch 1): per chunk the raw max and its index (greedy), the sum of exp for the log-sum-exp, and the
best Gumbel-perturbed score with its index. Pass 2, one program per row, combines the chunks. Rows with a
filter then search their threshold over the row (L2-resident), as sorting-free samplers do: a bisection
over the order-preserving integer keys of the float32 logits, counting for top-k and summing
probability mass for top-p, about 31 passes each, paid only by filtered rows. The Gumbel winner is kept
when it lies inside the kept set (Gumbel-max over a subset is the max over the subset), else one more
pass takes the best score inside it.

Semantics (the PyTorch reference in runner/sampler.py is the same function):
- noise: the hash of (seed, output step, token id) of `gumbel_noise`, computed here in uint32 registers,
  so a seeded request draws the same tokens in any batch, eager or inside a CUDA graph;
- top-k keeps every token whose logit is at least the k-th largest (ties at the boundary all kept);
  top-p keeps every token whose strictly-more-likely tokens hold at most `top_p` of the mass (ties kept
  together); min-p keeps (x - max) / T >= log(min_p); all three are measured on the unfiltered
  temperature-scaled distribution and the kept set is their intersection (the most likely token always
  survives);
- logprobs are those of the temperature-scaled distribution before filtering, SGLang's default; with
  `original` (SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB) those of the raw logits. Greedy rows use T = 1.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines use the PyTorch reference
    triton = None

_CHUNK = 4096  # pass 1: elements per program
_BLOCK = 2048  # pass 2: elements per loop iteration of a filtered row's searches


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


if triton is not None:

    @triton.jit
    def _hash32(x):
        """The 32-bit mix of runner/sampler.py `_hash32`, on uint32 lanes (products wrap mod 2**32)."""
        x = x ^ (x >> 16)
        x = x * 0x7FEB352D
        x = x ^ (x >> 15)
        x = x * 0x2C1B3C6D
        return x ^ (x >> 16)

    @triton.jit
    def _row_keys(SEED, STEP, row):
        seed = tl.load(SEED + row).to(tl.int64)
        step = tl.load(STEP + row).to(tl.int64)
        lo = (seed & 0xFFFFFFFF).to(tl.uint32)
        hi = ((seed >> 32) & 0xFFFFFFFF).to(tl.uint32)
        key = _hash32(lo ^ _hash32((step & 0xFFFFFFFF).to(tl.uint32) ^ _hash32(hi)))
        return key, _hash32(key ^ 0x5BD1E995)

    @triton.jit
    def _gumbel(offs, key, key2):
        h = _hash32(_hash32(offs.to(tl.uint32) ^ key) ^ key2)
        u = ((h >> 8).to(tl.float32) + 0.5) * (1.0 / 16777216.0)
        return -tl.log(-tl.log(u))

    @triton.jit
    def _order_key(x):
        """float32 -> int32 whose integer order is the float order (for bisection over values)."""
        b = x.to(tl.int32, bitcast=True)
        return tl.where(b >= 0, b, b ^ 0x7FFFFFFF)

    @triton.jit
    def _partials_kernel(X, stride_x, V, TEMP, SEED, STEP, CMAX, CIDX, CSUM, GVAL, GIDX, n_chunks,
                         CHUNK: tl.constexpr, SAMPLED: tl.constexpr, ORIGINAL: tl.constexpr):
        row = tl.program_id(0)
        c = tl.program_id(1)
        offs = c * CHUNK + tl.arange(0, CHUNK)
        mask = offs < V
        x = tl.load(X + row.to(tl.int64) * stride_x + offs, mask=mask, other=float("-inf")).to(tl.float32)
        m, at = tl.max(x, axis=0, return_indices=True, return_indices_tie_break_left=True)
        out = row * n_chunks + c
        tl.store(CMAX + out, m)
        tl.store(CIDX + out, c * CHUNK + at)
        if SAMPLED:
            t = tl.load(TEMP + row)
            ts = tl.maximum(t, 1e-5)
            te = 1.0 if ORIGINAL else tl.where(t > 0, ts, 1.0)
            tl.store(CSUM + out, tl.sum(tl.exp((x - m) / te), axis=0))
            if t > 0:
                key, key2 = _row_keys(SEED, STEP, row)
                y = tl.where(mask, x / ts + _gumbel(offs, key, key2), float("-inf"))
                gv, gi = tl.max(y, axis=0, return_indices=True, return_indices_tie_break_left=True)
                tl.store(GVAL + out, gv)
                tl.store(GIDX + out, c * CHUNK + gi)
            else:
                tl.store(GVAL + out, float("-inf"))
                tl.store(GIDX + out, c * CHUNK + at)
        else:
            tl.store(CSUM + out, tl.sum(tl.exp(x - m), axis=0))

    @triton.jit
    def _mass_above(X, base, V, bound, m, ts, BLOCK: tl.constexpr):
        """(mass of the tokens whose key is above `bound`, total mass), unnormalized, at temperature ts."""
        above = 0.0
        total = 0.0
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(X + base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            e = tl.exp((x - m) / ts)
            total += tl.sum(e, axis=0)
            above += tl.sum(tl.where(_order_key(x).to(tl.int64) > bound, e, 0.0), axis=0)
        return above, total

    @triton.jit
    def _finish_kernel(X, stride_x, V, TEMP, TOPK, TOPP, MINP, SEED, STEP, CMAX, CIDX, CSUM, GVAL, GIDX, n_chunks,
                       OUT_ID, OUT_LP, OUT_LSE, NC: tl.constexpr, BLOCK: tl.constexpr, SAMPLED: tl.constexpr,
                       ORIGINAL: tl.constexpr):
        row = tl.program_id(0)
        base = row.to(tl.int64) * stride_x
        cs = tl.arange(0, NC)
        cmask = cs < n_chunks
        cmax = tl.load(CMAX + row * n_chunks + cs, mask=cmask, other=float("-inf"))
        m, mc = tl.max(cmax, axis=0, return_indices=True, return_indices_tie_break_left=True)
        tok = tl.load(CIDX + row * n_chunks + mc)
        csum = tl.load(CSUM + row * n_chunks + cs, mask=cmask, other=0.0)
        if SAMPLED:
            t = tl.load(TEMP + row)
            ts = tl.maximum(t, 1e-5)
            te = 1.0 if ORIGINAL else tl.where(t > 0, ts, 1.0)
        else:
            t = 0.0
            ts = 1.0
            te = 1.0
        lse = m / te + tl.log(tl.sum(csum * tl.exp((cmax - m) / te), axis=0))
        if SAMPLED:
            if t > 0:
                gval = tl.load(GVAL + row * n_chunks + cs, mask=cmask, other=float("-inf"))
                _, gc = tl.max(gval, axis=0, return_indices=True, return_indices_tie_break_left=True)
                tok = tl.load(GIDX + row * n_chunks + gc)
                k = tl.load(TOPK + row).to(tl.int64)
                p = tl.load(TOPP + row)
                log_min_p = tl.log(tl.load(MINP + row))  # -inf when min_p is 0: keeps everything
                if (k < V) | (p < 1.0) | (log_min_p > float("-inf")):
                    key_m = _order_key(m).to(tl.int64)
                    # top-k: the largest key with at least k tokens at or above it
                    lo = key_m - key_m - 2139095041  # _order_key(-inf): every token is at or above it
                    hi = tl.where(k < V, key_m + 1, lo + 1)
                    while hi - lo > 1:
                        mid = lo + (hi - lo) // 2
                        cnt = 0
                        for start in range(0, V, BLOCK):
                            offs = start + tl.arange(0, BLOCK)
                            x = tl.load(X + base + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
                            cnt += tl.sum((_order_key(x).to(tl.int64) >= mid).to(tl.int32), axis=0)
                        lo = tl.where(cnt >= k, mid, lo)
                        hi = tl.where(cnt >= k, hi, mid)
                    thr = lo
                    # top-p: the smallest key whose strictly-higher tokens hold at most p of the mass
                    plo = thr
                    phi = thr
                    if p < 1.0:
                        above, total = _mass_above(X, base, V, thr, m, ts, BLOCK)
                        phi = tl.where(above > p * total, key_m, thr)
                    while phi - plo > 1:
                        mid = plo + (phi - plo) // 2
                        above, total = _mass_above(X, base, V, mid, m, ts, BLOCK)
                        ok = above <= p * total
                        phi = tl.where(ok, mid, phi)
                        plo = tl.where(ok, plo, mid)
                    thr = phi
                    x_tok = tl.load(X + base + tok).to(tl.float32)
                    outside = (_order_key(x_tok).to(tl.int64) < thr) | ((x_tok - m) / ts < log_min_p)
                    if outside:
                        key, key2 = _row_keys(SEED, STEP, row)
                        best = float("-inf")
                        best_i = tok
                        for start in range(0, V, BLOCK):
                            offs = start + tl.arange(0, BLOCK)
                            mask = offs < V
                            x = tl.load(X + base + offs, mask=mask, other=float("-inf")).to(tl.float32)
                            keep = mask & (_order_key(x).to(tl.int64) >= thr) & ((x - m) / ts >= log_min_p)
                            y = tl.where(keep, x / ts + _gumbel(offs, key, key2), float("-inf"))
                            bv, bi = tl.max(y, axis=0, return_indices=True, return_indices_tie_break_left=True)
                            better = bv > best
                            best_i = tl.where(better, start + bi, best_i)
                            best = tl.where(better, bv, best)
                        tok = best_i
        x_tok = tl.load(X + base + tok).to(tl.float32)
        tl.store(OUT_ID + row, tok.to(tl.int64))
        tl.store(OUT_LP + row, x_tok / te - lse)
        tl.store(OUT_LSE + row, lse)


def sample_rows(logits: torch.Tensor, temperatures: torch.Tensor | None, top_ks: torch.Tensor | None, top_ps: torch.Tensor | None,
                min_ps: torch.Tensor | None, seeds: torch.Tensor | None, steps: torch.Tensor | None, *, original: bool,
                out_ids: torch.Tensor | None = None, out_logprobs: torch.Tensor | None = None,
                out_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(token ids int64 [B], their logprobs float32 [B], each row's log-sum-exp float32 [B]) of `logits`.

    `temperatures` None: every row greedy (the filters, seeds and steps are then not read). Otherwise
    float32 [B] (0 = greedy), top_ks int [B] (>= V = off), top_ps / min_ps float32 [B], seeds / steps
    int64 [B]. Writes into the `out_*` buffers when given (CUDA graphs keep static outputs)."""
    b, v = logits.shape
    if logits.stride(1) != 1:
        raise ValueError("sample_rows needs rows with a unit stride")
    dev = logits.device
    n_chunks = triton.cdiv(v, _CHUNK)
    cmax = torch.empty((b, n_chunks), dtype=torch.float32, device=dev)
    csum = torch.empty_like(cmax)
    gval = torch.empty_like(cmax)
    cidx = torch.empty((b, n_chunks), dtype=torch.int32, device=dev)
    gidx = torch.empty_like(cidx)
    out_ids = torch.empty(b, dtype=torch.int64, device=dev) if out_ids is None else out_ids
    out_logprobs = torch.empty(b, dtype=torch.float32, device=dev) if out_logprobs is None else out_logprobs
    out_lse = torch.empty(b, dtype=torch.float32, device=dev) if out_lse is None else out_lse
    sampled = temperatures is not None
    if not sampled:  # placeholders the kernels never read
        temperatures = top_ks = top_ps = min_ps = seeds = steps = cmax
    _partials_kernel[(b, n_chunks)](logits, logits.stride(0), v, temperatures, seeds, steps, cmax, cidx, csum, gval, gidx,
                                    n_chunks, CHUNK=_CHUNK, SAMPLED=sampled, ORIGINAL=original, num_warps=8)
    _finish_kernel[(b,)](logits, logits.stride(0), v, temperatures, top_ks, top_ps, min_ps, seeds, steps, cmax, cidx, csum,
                         gval, gidx, n_chunks, out_ids, out_logprobs, out_lse, NC=max(2, triton.next_power_of_2(n_chunks)),
                         BLOCK=_BLOCK, SAMPLED=sampled, ORIGINAL=original, num_warps=8)
    return out_ids, out_logprobs, out_lse
