"""Mixture-of-experts layer math: the router's top-k, a PyTorch reference (CPU, tests) and the fused
Triton path (CUDA).

Every path computes, for tokens x [T, H], stacked experts w_gate_up [E, 2I, H] ([gate | up] rows) and
w_down [E, H, I], and each token's top-k experts `ids` [T, k] with weights `weights` [T, k]:
    out[t] = sum_j weights[t, j] * w_down[ids[t, j]] @ (silu(g) * u),  [g | u] = w_gate_up[ids[t, j]] @ x[t]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


def route(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the hidden dtype, expert ids [T, k] int64) as HF's Qwen3MoeTopKRouter computes
    them: logits in the model dtype, softmax in float32, top-k, optional renormalisation over the k. On
    CUDA the steps after the logits are one kernel (`topk_softmax`): at decode sizes each of torch's five
    launches (softmax, top-k, sum, divide, cast) costs more than its work, 48 layers a step."""
    logits = F.linear(hidden, gate_weight)
    after_logits = topk_softmax if available(logits) else topk_softmax_reference
    return after_logits(logits, top_k, renormalize)


def topk_softmax_reference(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its logits in PyTorch (the CPU path, and the reference of `topk_softmax`)."""
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), ids


def moe_reference(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
                  ids: torch.Tensor) -> torch.Tensor:
    """Group the (token, slot) pairs by expert, one pair of matmuls per expert hit, weighted sum back
    into the tokens' rows (experts in ascending order, as HF's eager loop adds them)."""
    out = torch.zeros_like(x)
    top_k = ids.shape[1]
    flat = ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=w_gate_up.shape[0]).tolist()
    flat_weights = weights.reshape(-1)
    start = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        pairs = order[start : start + n]
        start += n
        tokens = pairs // top_k
        gate, up = F.linear(x[tokens], w_gate_up[expert]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, w_down[expert]) * flat_weights[pairs, None]
        out.index_add_(0, tokens, y.to(out.dtype))
    return out


# ---- the fused path (Triton, CUDA; the interpreter runs it on the CPU in tests) ----------------------

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None

# Up to this many tokens a step runs the per-pair path (decode): each (token, slot) pair reads only its
# expert's rows, and the down kernel sums the top-k in registers. Above it, pairs are grouped by expert so
# each touched expert's weights are read once per block of tokens.
SMALL_BATCH_MAX_TOKENS = 8


@dataclass(frozen=True)
class PairsBlocks:
    """Tile shapes of the per-pair (decode) kernels: output columns and reduction width per program, warps.
    Chosen as the batch-1 matmuls' (kernels/skinny_matmul.py) rule: about 8K weights a tile and a few
    programs an SM at one token (Qwen3-30B-A3B: 384 gate/up and 512 down programs). bench/moe_kernels.py
    sweeps them on the device."""

    gate_up_n: int = 16
    gate_up_k: int = 256
    gate_up_warps: int = 4
    down_n: int = 32
    down_k: int = 256
    down_warps: int = 4


PAIRS_BLOCKS = PairsBlocks()


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, weights: torch.Tensor,
              ids: torch.Tensor) -> torch.Tensor:
    """The MoE layer: gate/up and down kernels, then the top-k sum (a small kernel on the decode path, a torch
    reduction on the large path, where a few torch ops also align the pairs by expert). No host
    synchronisation: it runs under CUDA graphs, whose shapes fix T."""
    if x.shape[0] <= SMALL_BATCH_MAX_TOKENS:
        return moe_pairs(x, w_gate_up, w_down, weights, ids)
    return _moe_grouped(x, w_gate_up, w_down, weights, ids)


def block_m_for(num_pairs: int, num_experts: int) -> int:
    """Rows per grouped block: small when each expert gets few pairs (padding is wasted work)."""
    per_expert = num_pairs / num_experts
    return 16 if per_expert <= 16 else 32 if per_expert <= 64 else 64


def align_by_expert(ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort the (token, slot) pairs by expert, each expert's run padded to a multiple of `block_m`.

    Returns (sorted_pairs [R] int32: pair index t * k + j, or P = T * k for padding; block_expert
    [R / block_m] int32: the expert of each block, -1 past the last). R = P + E * (block_m - 1) rounded up
    to block_m is the most any routing needs, so the shapes depend on T only (CUDA graphs)."""
    flat = ids.reshape(-1)
    p = flat.numel()
    rows = -(-(p + num_experts * (block_m - 1)) // block_m) * block_m
    counts = torch.zeros(num_experts, dtype=torch.int64, device=ids.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    order = torch.argsort(flat, stable=True)
    expert = flat[order]
    first_of_expert = torch.cumsum(counts, 0) - counts
    dest = (padded_end - padded)[expert] + torch.arange(p, device=ids.device) - first_of_expert[expert]
    sorted_pairs = torch.full((rows,), p, dtype=torch.int32, device=ids.device)
    sorted_pairs[dest] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=ids.device)
    block_expert = torch.searchsorted(padded_end, block_start, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert


def _moe_grouped(x, w_gate_up, w_down, weights, ids):
    t, h = x.shape
    e, two_i, _ = w_gate_up.shape
    i, top_k = two_i // 2, ids.shape[1]
    p = t * top_k
    bm = block_m_for(p, e)
    sorted_pairs, block_expert = align_by_expert(ids, e, bm)
    inter = torch.empty(sorted_pairs.numel(), i, dtype=x.dtype, device=x.device)
    bn, bk = 64, 64
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # float32 models get float32 products, not TF32
    _gate_up_grouped_kernel[(block_expert.numel(), triton.cdiv(i, bn))](
        x, w_gate_up, inter, sorted_pairs, block_expert, p, top_k, h, i,
        x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0), BM=bm, BN=bn, BK=bk, PREC=prec)
    per_pair = torch.empty(p, h, dtype=x.dtype, device=x.device)
    _down_grouped_kernel[(block_expert.numel(), triton.cdiv(h, bn))](
        inter, w_down, per_pair, sorted_pairs, block_expert, weights.reshape(-1), p, h, i,
        inter.stride(0), w_down.stride(0), w_down.stride(1), per_pair.stride(0), BM=bm, BN=bn, BK=bk, PREC=prec)
    # the top-k sum: a separate reduction in a fixed order (atomics would make the result depend on timing)
    return per_pair.view(t, top_k, h).sum(dim=1)


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its logits [T, E], one program per token: float32 softmax over the experts, the k
    most probable (largest first; equal probabilities by lower expert id), renormalised over the k when
    asked. Returns (weights [T, k] in the logits' dtype, ids [T, k] int64), as `route`'s torch path."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        _topk_softmax_kernel[(t,)](logits, weights, ids, e, logits.stride(0), TOP_K=top_k, RENORM=renormalize,
                                   BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k))
    return weights, ids


# Columns a program of the top-k sum covers.
SUM_BLOCK = 512


def moe_pairs(x, w_gate_up, w_down, weights, ids, blocks: PairsBlocks = PAIRS_BLOCKS):
    """The decode path: each (token, slot) pair's programs read only its expert's rows, every pair's down
    projection in programs of its own (at one token a program per token and column block left most SMs
    idle); their float32 partials are then summed in slot order, so the result does not depend on timing."""
    t, h = x.shape
    i, top_k = w_gate_up.shape[1] // 2, ids.shape[1]
    p = t * top_k
    flat_ids = ids.reshape(-1)
    inter = torch.empty(p, i, dtype=x.dtype, device=x.device)
    b = blocks
    _gate_up_pairs_kernel[(p, triton.cdiv(i, b.gate_up_n))](
        x, w_gate_up, inter, flat_ids, top_k, h, i, x.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0),
        BN=b.gate_up_n, BK=b.gate_up_k, num_warps=b.gate_up_warps)
    partial = torch.empty(p, h, dtype=torch.float32, device=x.device)
    _down_pairs_kernel[(p, triton.cdiv(h, b.down_n))](
        inter, w_down, partial, flat_ids, weights.reshape(-1), h, i, inter.stride(0), w_down.stride(0), w_down.stride(1),
        BN=b.down_n, BK=b.down_k, num_warps=b.down_warps)
    out = torch.empty_like(x)
    _sum_slots_kernel[(t, triton.cdiv(h, SUM_BLOCK))](partial, out, top_k, h, out.stride(0), BLOCK=SUM_BLOCK)
    return out


if triton is not None:

    @triton.jit
    def _block_pairs(SORTED, num_pairs, BM: tl.constexpr):
        """Block m of a grouped kernel: its BM sorted rows, the (token, slot) pair at each, and which rows
        hold a pair (not padding)."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        pair = tl.load(SORTED + rows)
        return rows, pair, pair < num_pairs

    @triton.jit
    def _gate_up_grouped_kernel(X, W, Y, SORTED, BLOCK_EXPERT, num_pairs, top_k, H, I, stride_xt, stride_we, stride_wn,
                                stride_yt, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """Block (m, n): the BM pairs of sorted rows m*BM.. (one expert) times columns n*BN.. of that
        expert's gate and up rows; writes silu(gate) * up at the pairs' sorted rows."""
        pid_n = tl.program_id(1)
        e = tl.load(BLOCK_EXPERT + tl.program_id(0))
        if e < 0:  # past the last expert's blocks
            return
        rows, pair, valid = _block_pairs(SORTED, num_pairs, BM)
        tok = (pair // top_k).to(tl.int64)
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < I
        kk = tl.arange(0, BK)
        a_ptr = X + tok[:, None] * stride_xt + kk[None, :]
        g_ptr = W + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
        u_ptr = g_ptr + I * stride_wn
        acc_g = tl.zeros((BM, BN), dtype=tl.float32)
        acc_u = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, H, BK):
            k_ok = kk + k0 < H
            a = tl.load(a_ptr + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            w_mask = k_ok[:, None] & n_ok[None, :]
            acc_g = tl.dot(a, tl.load(g_ptr + k0, mask=w_mask, other=0.0), acc_g, input_precision=PREC)
            acc_u = tl.dot(a, tl.load(u_ptr + k0, mask=w_mask, other=0.0), acc_u, input_precision=PREC)
        y = acc_g * tl.sigmoid(acc_g) * acc_u
        out = Y + rows[:, None].to(tl.int64) * stride_yt + n[None, :]
        tl.store(out, y.to(Y.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _down_grouped_kernel(Y, W, OUT, SORTED, BLOCK_EXPERT, TOPK_W, num_pairs, H, I, stride_yt, stride_we, stride_wn,
                             stride_ot, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PREC: tl.constexpr):
        """Block (m, n): the expert's down projection of BM sorted rows, columns n*BN.. of H, scaled by
        each pair's routing weight; written at the pair's own row (token * k + slot)."""
        pid_n = tl.program_id(1)
        e = tl.load(BLOCK_EXPERT + tl.program_id(0))
        if e < 0:  # past the last expert's blocks
            return
        rows, pair, valid = _block_pairs(SORTED, num_pairs, BM)
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < H
        kk = tl.arange(0, BK)
        a_ptr = Y + rows[:, None].to(tl.int64) * stride_yt + kk[None, :]
        b_ptr = W + e.to(tl.int64) * stride_we + n[None, :].to(tl.int64) * stride_wn + kk[:, None]
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(0, I, BK):
            k_ok = kk + k0 < I
            a = tl.load(a_ptr + k0, mask=valid[:, None] & k_ok[None, :], other=0.0)
            acc = tl.dot(a, tl.load(b_ptr + k0, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc, input_precision=PREC)
        w = tl.load(TOPK_W + pair, mask=valid, other=0.0).to(tl.float32)
        acc = acc * w[:, None]
        out = OUT + pair[:, None].to(tl.int64) * stride_ot + n[None, :]
        tl.store(out, acc.to(OUT.dtype.element_ty), mask=valid[:, None] & n_ok[None, :])

    @triton.jit
    def _topk_softmax_kernel(LOGITS, W_OUT, IDS_OUT, E, stride_l, TOP_K: tl.constexpr, RENORM: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program t: token t's routing, the k picks by repeated maximum over its probabilities."""
        t = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK_E)
        in_row = offs < E
        logit = tl.load(LOGITS + t * stride_l + offs, mask=in_row, other=-float("inf")).to(tl.float32)
        num = tl.exp(logit - tl.max(logit, axis=0))
        prob = num / tl.sum(num, axis=0)
        # probabilities not yet picked; -1 past the experts and once picked. A NaN (a NaN or infinite logit makes
        # the whole row NaN) ranks 2, above every probability, as torch's top-k ranks NaN first: a comparison with
        # NaN matches nothing, which picked ids past the experts (the expert kernels then read outside the weights)
        left = tl.where(in_row, tl.where(prob == prob, prob, 2.0), -1.0)
        slots = tl.arange(0, BLOCK_K)
        picked_w = tl.zeros((BLOCK_K,), dtype=tl.float32)
        picked_id = tl.zeros((BLOCK_K,), dtype=tl.int64)
        for j in tl.static_range(TOP_K):
            best = tl.max(left, axis=0)
            pick = tl.min(tl.where(left == best, offs, BLOCK_E), axis=0)
            picked_w = tl.where(slots == j, tl.where(best > 1.5, float("nan"), best), picked_w)
            picked_id = tl.where(slots == j, pick.to(tl.int64), picked_id)
            left = tl.where(offs == pick, -1.0, left)
        if RENORM:
            picked_w = picked_w / tl.sum(picked_w, axis=0)  # slots past k hold 0
        out = t * TOP_K + slots
        tl.store(W_OUT + out, picked_w.to(W_OUT.dtype.element_ty), mask=slots < TOP_K)
        tl.store(IDS_OUT + out, picked_id, mask=slots < TOP_K)

    @triton.jit
    def _gate_up_pairs_kernel(X, W, Y, IDS, top_k, H, I, stride_xt, stride_we, stride_wn, stride_yt,
                              BN: tl.constexpr, BK: tl.constexpr):
        """Program (pair, n): silu(gate) * up for one (token, slot) pair, columns n*BN.., reading only
        its expert's rows; the next tiles are loaded before the current ones are used (as the batch-1
        matmuls do), so each program keeps two tiles of reads in flight."""
        p = tl.program_id(0)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < I
        e = tl.load(IDS + p).to(tl.int64)
        t = (p // top_k).to(tl.int64)
        kk = tl.arange(0, BK)
        g_ptr = W + e * stride_we + n[:, None].to(tl.int64) * stride_wn
        u_ptr = g_ptr + I * stride_wn
        w_mask = n_ok[:, None] & (kk < H)[None, :]
        g_next = tl.load(g_ptr + kk[None, :], mask=w_mask, other=0.0)
        u_next = tl.load(u_ptr + kk[None, :], mask=w_mask, other=0.0)
        acc_g = tl.zeros((BN,), dtype=tl.float32)
        acc_u = tl.zeros((BN,), dtype=tl.float32)
        for k0 in tl.range(0, H, BK):
            k = k0 + kk
            g, u = g_next, u_next
            nk = k + BK
            w_mask = n_ok[:, None] & (nk < H)[None, :]
            g_next = tl.load(g_ptr + nk[None, :], mask=w_mask, other=0.0)
            u_next = tl.load(u_ptr + nk[None, :], mask=w_mask, other=0.0)
            xv = tl.load(X + t * stride_xt + k, mask=k < H, other=0.0).to(tl.float32)
            acc_g += tl.sum(g.to(tl.float32) * xv[None, :], axis=1)
            acc_u += tl.sum(u.to(tl.float32) * xv[None, :], axis=1)
        y = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(Y + p.to(tl.int64) * stride_yt + n, y.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _down_pairs_kernel(Y, W, PART, IDS, TOPK_W, H, I, stride_yt, stride_we, stride_wn,
                           BN: tl.constexpr, BK: tl.constexpr):
        """Program (pair, n): routing weight * down projection of one pair's row, columns n*BN.. of H,
        in float32 at the pair's row of PART [P, H]; next tile loaded ahead as in the gate/up kernel."""
        p = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BN + tl.arange(0, BN)
        n_ok = n < H
        e = tl.load(IDS + p).to(tl.int64)
        kk = tl.arange(0, BK)
        rows = W + e * stride_we + n[:, None].to(tl.int64) * stride_wn
        w_next = tl.load(rows + kk[None, :], mask=n_ok[:, None] & (kk < I)[None, :], other=0.0)
        acc = tl.zeros((BN,), dtype=tl.float32)
        for k0 in tl.range(0, I, BK):
            k = k0 + kk
            wd = w_next
            nk = k + BK
            w_next = tl.load(rows + nk[None, :], mask=n_ok[:, None] & (nk < I)[None, :], other=0.0)
            yv = tl.load(Y + p * stride_yt + k, mask=k < I, other=0.0).to(tl.float32)
            acc += tl.sum(wd.to(tl.float32) * yv[None, :], axis=1)
        acc = acc * tl.load(TOPK_W + p).to(tl.float32)
        tl.store(PART + p * H + n, acc, mask=n_ok)

    @triton.jit
    def _sum_slots_kernel(PART, OUT, top_k, H, stride_ot, BLOCK: tl.constexpr):
        """Program (token, n): the token's k partials added in slot order, cast to the model dtype."""
        t = tl.program_id(0).to(tl.int64)
        n = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        ok = n < H
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for j in range(0, top_k):
            acc += tl.load(PART + (t * top_k + j) * H + n, mask=ok, other=0.0)
        tl.store(OUT + t * stride_ot + n, acc.to(OUT.dtype.element_ty), mask=ok)
