"""Mixture-of-experts layer math: the router's top-k, a PyTorch reference (CPU, tests) and the fused
Triton path (CUDA).

Every path computes, for tokens x [T, H], stacked experts w_gate_up [E, 2I, H] ([gate | up] rows) and
w_down [E, H, I], and each token's top-k experts `ids` [T, k] with weights `weights` [T, k]:
    out[t] = sum_j weights[t, j] * w_down[ids[t, j]] @ (silu(g) * u),  [g | u] = w_gate_up[ids[t, j]] @ x[t]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def route(hidden: torch.Tensor, gate_weight: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(weights [T, k] in the hidden dtype, expert ids [T, k] int64) as HF's Qwen3MoeTopKRouter computes
    them: logits in the model dtype, softmax in float32, top-k, optional renormalisation over the k."""
    logits = F.linear(hidden, gate_weight)
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
