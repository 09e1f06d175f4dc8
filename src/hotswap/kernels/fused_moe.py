"""Mixture-of-experts layer math after the router's logits: its top-k, a PyTorch reference (CPU, tests) and
the fused Triton path (CUDA).

Every path computes, for tokens x [T, H], stacked experts w_gate_up [E, 2I, H] ([gate | up] rows) and
w_down [E, H, I], and each token's top-k experts `ids` [T, k] with weights `weights` [T, k] (the router's
softmax over the logits, as HF's Qwen3MoeTopKRouter computes it):
    out[t] = sum_j weights[t, j] * w_down[ids[t, j]] @ (silu(g) * u),  [g | u] = w_gate_up[ids[t, j]] @ x[t]
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hotswap.kernels import arrival, pdl


@dataclass(frozen=True)
class RoutedWrite:
    """Where a layer records its tokens' expert ids for `return_routed_experts` (R3): token t's k ids go to
    table[slots[t], layer] (int32 [cache slots, layers, k]); the kernels that pick the experts write them."""

    table: torch.Tensor
    slots: torch.Tensor
    layer: int


@dataclass(frozen=True)
class InputNorm:
    """An RMSNorm the expert kernels apply to x themselves (batch 1: the router's matmul added the residual
    and normalised its own copy of the row, so no kernel writes the normalised row)."""

    weight: torch.Tensor
    eps: float


def moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, logits: torch.Tensor, top_k: int,
        renormalize: bool, norm: InputNorm | None = None, routed: RoutedWrite | None = None) -> torch.Tensor:
    """The layer from the router's logits [T, E] (model dtype): the fused kernels on CUDA, the PyTorch
    reference elsewhere (which takes no `norm`: only the batch-1 CUDA path fuses it)."""
    if available(x):
        return fused_moe(x, w_gate_up, w_down, logits, top_k, renormalize, norm, routed)
    if norm is not None:
        raise ValueError("the PyTorch MoE path takes an already normalised x")
    weights, ids = topk_softmax_reference(logits, top_k, renormalize)
    if routed is not None:
        routed.table[routed.slots, routed.layer] = ids.to(torch.int32)
    return moe_reference(x, w_gate_up, w_down, weights, ids)


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

    from hotswap.kernels.pdl import wait_previous
except ImportError:  # CPU-only machines: the layers never call these without CUDA
    triton = None

# Up to this many tokens a step runs the per-pair path (decode): each (token, slot) pair reads only its
# expert's rows, and the down kernel sums the top-k in registers. Above it, pairs are grouped by expert so
# each touched expert's weights are read once per block of tokens.
SMALL_BATCH_MAX_TOKENS = 8


@dataclass(frozen=True)
class PairsBlocks:
    """Tile shapes of the decode kernels: output columns and reduction width per program, warps. Chosen as
    the batch-1 matmuls' (kernels/skinny_matmul.py) rule: about 8K weights a tile and a few programs an SM at
    one token (Qwen3-30B-A3B: 384 gate/up and 512 down programs). bench/moe_kernels.py sweeps them on the
    device."""

    gate_up_n: int = 16
    gate_up_k: int = 256
    gate_up_warps: int = 4
    down_n: int = 32
    down_k: int = 256
    down_warps: int = 4


PAIRS_BLOCKS = PairsBlocks()


def available(x: torch.Tensor) -> bool:
    return triton is not None and x.is_cuda


def fused_moe(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, logits: torch.Tensor, top_k: int,
              renormalize: bool, norm: InputNorm | None = None, routed: RoutedWrite | None = None) -> torch.Tensor:
    """The MoE layer from the router's logits. Decode sizes: two kernels (`moe_pairs`), which pick the experts
    themselves. Larger: the routing kernel (`topk_softmax`), a few torch ops aligning the pairs by expert, the
    grouped gate/up and down kernels and a torch reduction over the k (`norm` is for the decode path only). No
    host synchronisation: it runs under CUDA graphs, whose shapes fix T."""
    if x.shape[0] <= SMALL_BATCH_MAX_TOKENS:
        return moe_pairs(x, w_gate_up, w_down, logits, top_k, renormalize, norm, routed)
    if norm is not None:
        raise ValueError(f"the grouped MoE path ({x.shape[0]} tokens) takes an already normalised x")
    weights, ids = topk_softmax(logits, top_k, renormalize, routed)
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


def topk_softmax(logits: torch.Tensor, top_k: int, renormalize: bool,
                 routed: RoutedWrite | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The router after its logits [T, E], one program per token: float32 softmax over the experts, the k
    most probable (largest first; equal probabilities by lower expert id), renormalised over the k when
    asked. Returns (weights [T, k] in the logits' dtype, ids [T, k] int64), as `topk_softmax_reference`;
    with `routed`, also writes the ids into its table (no separate cast and scatter a layer)."""
    t, e = logits.shape
    weights = torch.empty(t, top_k, dtype=logits.dtype, device=logits.device)
    ids = torch.empty(t, top_k, dtype=torch.int64, device=logits.device)
    if t:
        table, slots, layer, stride_ts, stride_tl = _routed_args(routed, ids)
        _topk_softmax_kernel[(t,)](logits, weights, ids, table, slots, e, logits.stride(0), layer, stride_ts, stride_tl,
                                   TOP_K=top_k, RENORM=renormalize, HAS_TABLE=routed is not None,
                                   BLOCK_E=triton.next_power_of_2(e), BLOCK_K=triton.next_power_of_2(top_k))
    return weights, ids


def _routed_args(routed: RoutedWrite | None, placeholder: torch.Tensor) -> tuple:
    """(table, slots, layer, slot stride, layer stride) for a kernel's HAS_TABLE arguments."""
    if routed is None:
        return placeholder, placeholder, 0, 0, 0
    table = routed.table
    if table.dtype != torch.int32 or table.stride(2) != 1:
        raise ValueError("the routed-experts table must be int32 with its top-k slots contiguous")
    return table, routed.slots, routed.layer, table.stride(0), table.stride(1)


def moe_pairs(x: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, logits: torch.Tensor, top_k: int,
              renormalize: bool, norm: InputNorm | None = None, routed: RoutedWrite | None = None,
              blocks: PairsBlocks | None = None) -> torch.Tensor:
    """The decode path, two kernels. Gate/up: a program per ((token, slot) pair, column block) routes its
    token from the logits (each program the same float32 softmax and top-k, in registers: no routing kernel
    of its own), reads only its expert's rows and, with `norm`, normalises x on the fly; the first column
    block's programs publish the pair's expert and weight (and the R3 table entry). Down: a program per
    (pair, column block) writes its weighted float32 product; the last of a token's k programs for a column
    block to finish (kernels/arrival.py) adds the k in slot order, so the top-k sum needs no kernel and the
    result does not depend on timing. Both launch with PDL at decode sizes (kernels/pdl.py)."""
    t, h = x.shape
    e, two_i, _ = w_gate_up.shape
    i, p = two_i // 2, t * top_k
    if logits.shape != (t, e):
        raise ValueError(f"router logits {tuple(logits.shape)} do not match {t} tokens x {e} experts")
    b = blocks or PAIRS_BLOCKS
    column_blocks = -(-h // b.down_n)
    if t * column_blocks > arrival.SIZE:
        raise ValueError(f"{t} tokens x {column_blocks} column blocks exceed the {arrival.SIZE} arrival counters")
    ids = torch.empty(p, dtype=torch.int64, device=x.device)
    table, slots, layer, stride_ts, stride_tl = _routed_args(routed, ids)
    weights = torch.empty(p, dtype=logits.dtype, device=x.device)
    inter = torch.empty(p, i, dtype=x.dtype, device=x.device)
    out = torch.empty_like(x)
    if t == 0:
        return out
    use_pdl = pdl.enabled(x.device, t)
    _gate_up_pairs_kernel[(p, triton.cdiv(i, b.gate_up_n))](
        x, norm.weight if norm is not None else x, logits, w_gate_up, inter, ids, weights, table, slots,
        e, h, i, x.stride(0), logits.stride(0), w_gate_up.stride(0), w_gate_up.stride(1), inter.stride(0),
        layer, stride_ts, stride_tl, norm.eps if norm is not None else 0.0,
        TOP_K=top_k, RENORM=renormalize, HAS_NORM=norm is not None, HAS_TABLE=routed is not None,
        BLOCK_E=triton.next_power_of_2(e), BLOCK_TOPK=triton.next_power_of_2(top_k),
        BN=b.gate_up_n, BK=b.gate_up_k, USE_PDL=use_pdl, num_warps=b.gate_up_warps, launch_pdl=use_pdl)
    partial = torch.empty(p, h, dtype=torch.float32, device=x.device)
    _down_pairs_kernel[(p, column_blocks)](
        inter, w_down, partial, out, arrival.counters(x.device), ids, weights, h, i, inter.stride(0), w_down.stride(0),
        w_down.stride(1), out.stride(0), TOP_K=top_k, BN=b.down_n, BK=b.down_k, USE_PDL=use_pdl, num_warps=b.down_warps,
        launch_pdl=use_pdl)
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
    def _route_row(LOGITS, t, E, stride_l, TOP_K: tl.constexpr, RENORM: tl.constexpr, BLOCK_E: tl.constexpr,
                   BLOCK_K: tl.constexpr):
        """Token t's routing from its logits, in registers: (weights [BLOCK_K] float32, ids [BLOCK_K] int64,
        slots [BLOCK_K]); slots past k hold weight 0. The k picks by repeated maximum of the probabilities."""
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
            # the largest and, of equal ones, the lowest id, in one reduction (each is a barrier in every program)
            best, pick = tl.max(left, axis=0, return_indices=True, return_indices_tie_break_left=True)
            picked_w = tl.where(slots == j, tl.where(best > 1.5, float("nan"), best), picked_w)
            picked_id = tl.where(slots == j, pick.to(tl.int64), picked_id)
            left = tl.where(offs == pick, -1.0, left)
        if RENORM:
            picked_w = picked_w / tl.sum(picked_w, axis=0)  # slots past k hold 0
        return picked_w, picked_id, slots

    @triton.jit
    def _topk_softmax_kernel(LOGITS, W_OUT, IDS_OUT, TABLE, SLOTS, E, stride_l, layer, stride_ts, stride_tl,
                             TOP_K: tl.constexpr, RENORM: tl.constexpr, HAS_TABLE: tl.constexpr,
                             BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr):
        """Program t: token t's routing (and its row of the routed-experts table)."""
        t = tl.program_id(0).to(tl.int64)
        picked_w, picked_id, slots = _route_row(LOGITS, t, E, stride_l, TOP_K, RENORM, BLOCK_E, BLOCK_K)
        out = t * TOP_K + slots
        tl.store(W_OUT + out, picked_w.to(W_OUT.dtype.element_ty), mask=slots < TOP_K)
        tl.store(IDS_OUT + out, picked_id, mask=slots < TOP_K)
        if HAS_TABLE:
            row = tl.load(SLOTS + t).to(tl.int64) * stride_ts + layer * stride_tl
            tl.store(TABLE + row + slots, picked_id.to(tl.int32), mask=slots < TOP_K)

    @triton.jit
    def _gate_up_pairs_kernel(X, NW, LOGITS, W, Y, IDS_OUT, W_OUT, TABLE, SLOTS, E, H, I, stride_xt, stride_lt,
                              stride_we, stride_wn, stride_yt, layer, stride_ts, stride_tl, eps,
                              TOP_K: tl.constexpr, RENORM: tl.constexpr, HAS_NORM: tl.constexpr,
                              HAS_TABLE: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_TOPK: tl.constexpr,
                              BN: tl.constexpr, BK: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (pair, n): silu(gate) * up for one (token, slot) pair, columns n*BN.., reading only its
        expert's rows, which it finds by routing the token itself; with HAS_NORM, of rmsnorm(x) * NW,
        accumulated as (x * NW) @ W^T beside x's sum of squares and scaled at the end. The next tiles are
        loaded before the current ones are used (as the batch-1 matmuls do)."""
        p = tl.program_id(0)
        pid_n = tl.program_id(1)
        wait_previous(USE_PDL)  # the logits and x are the previous kernels' output
        t = (p // TOP_K).to(tl.int64)
        j = p % TOP_K
        picked_w, picked_id, slots = _route_row(LOGITS, t, E, stride_lt, TOP_K, RENORM, BLOCK_E, BLOCK_TOPK)
        e = tl.sum(tl.where(slots == j, picked_id, 0), axis=0)
        if pid_n == 0:  # one program per pair publishes its routing (for the down kernel and the R3 table)
            tl.store(IDS_OUT + p, e)
            tl.store(W_OUT + p, tl.sum(tl.where(slots == j, picked_w, 0.0), axis=0).to(W_OUT.dtype.element_ty))
            if HAS_TABLE:
                tl.store(TABLE + tl.load(SLOTS + t).to(tl.int64) * stride_ts + layer * stride_tl + j, e.to(tl.int32))
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < I
        kk = tl.arange(0, BK)
        g_ptr = W + e * stride_we + n[:, None].to(tl.int64) * stride_wn
        u_ptr = g_ptr + I * stride_wn
        w_mask = n_ok[:, None] & (kk < H)[None, :]
        g_next = tl.load(g_ptr + kk[None, :], mask=w_mask, other=0.0)
        u_next = tl.load(u_ptr + kk[None, :], mask=w_mask, other=0.0)
        acc_g = tl.zeros((BN,), dtype=tl.float32)
        acc_u = tl.zeros((BN,), dtype=tl.float32)
        ss = tl.zeros((BK,), dtype=tl.float32)
        for k0 in tl.range(0, H, BK):
            k = k0 + kk
            g, u = g_next, u_next
            nk = k + BK
            w_mask = n_ok[:, None] & (nk < H)[None, :]
            g_next = tl.load(g_ptr + nk[None, :], mask=w_mask, other=0.0)
            u_next = tl.load(u_ptr + nk[None, :], mask=w_mask, other=0.0)
            xv = tl.load(X + t * stride_xt + k, mask=k < H, other=0.0).to(tl.float32)
            if HAS_NORM:
                ss += xv * xv
                xv = xv * tl.load(NW + k, mask=k < H, other=0.0).to(tl.float32)
            acc_g += tl.sum(g.to(tl.float32) * xv[None, :], axis=1)
            acc_u += tl.sum(u.to(tl.float32) * xv[None, :], axis=1)
        if HAS_NORM:
            scale = tl.rsqrt(tl.sum(ss, axis=0) / H + eps)
            acc_g = acc_g * scale
            acc_u = acc_u * scale
        y = acc_g * tl.sigmoid(acc_g) * acc_u
        tl.store(Y + p.to(tl.int64) * stride_yt + n, y.to(Y.dtype.element_ty), mask=n_ok)

    @triton.jit
    def _down_pairs_kernel(Y, W, PART, OUT, COUNTERS, IDS, TOPK_W, H, I, stride_yt, stride_we, stride_wn, stride_ot,
                           TOP_K: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, USE_PDL: tl.constexpr):
        """Program (pair, n): routing weight * down projection of one pair's row, columns n*BN.. of H, in
        float32 at the pair's row of PART [P, H] (next tile loaded ahead as in the gate/up kernel); the last
        of the token's k programs for these columns to finish adds the k rows in slot order into OUT."""
        p = tl.program_id(0).to(tl.int64)
        pid_n = tl.program_id(1)
        n = pid_n * BN + tl.arange(0, BN)
        n_ok = n < H
        wait_previous(USE_PDL)  # the experts, weights and rows are the gate/up kernel's output
        e = tl.load(IDS + p)
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
        tl.store(PART + p * H + n, acc * tl.load(TOPK_W + p).to(tl.float32), mask=n_ok)
        t = p // TOP_K
        counter = COUNTERS + t * tl.num_programs(1) + pid_n
        tl.debug_barrier()  # every thread's stores before the one thread's release
        if tl.atomic_add(counter, 1, sem="acq_rel") == TOP_K - 1:  # kernels/arrival.py
            tl.store(counter, 0)
            total = tl.zeros((BN,), dtype=tl.float32)
            for j in range(0, TOP_K):
                total += tl.load(PART + (t * TOP_K + j) * H + n, mask=n_ok, other=0.0, cache_modifier=".cg")
            tl.store(OUT + t * stride_ot + n, total.to(OUT.dtype.element_ty), mask=n_ok)
