"""The sparse MoE block (Qwen3-MoE; Qwen2-MoE adds a gated shared expert): a float32-softmax top-k router
over stacked experts.

The experts live in two stacked parameters named as transformers 5 names them,
`experts.gate_up_proj` [E, 2I, H] and `experts.down_proj` [E, H, I]; each also carries a ShardSpec per
expert and projection, so checkpoint names (`experts.{e}.gate_proj.weight`, ...) land in the same
storage (see weights/mapping.py).
"""

from __future__ import annotations

import torch
from torch import nn

from hotswap.kernels import fused_moe, skinny_matmul
from hotswap.kernels.split_sum import SplitSum
from hotswap.models.forward_context import ForwardContext
from hotswap.models.layers import MergedColumnLinear, RMSNorm, RowLinear, hf_param
from hotswap.models.parallel import ExpertShard, ShardSpec, TPInfo


def _full(shape: tuple[int, ...]) -> ShardSpec:
    return ShardSpec(0, 0, shape[0], 0, 0, shape[0], shape)


class StackedExperts(nn.Module):
    def __init__(self, num_experts: int, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        e, h, i = num_experts, hidden, intermediate
        gate_up: dict = {None: _full((e, 2 * i, h))}
        down: dict = {None: _full((e, h, i))}
        for x in range(e):
            gate_up[ExpertShard(x, "gate_proj")] = ShardSpec(0, 0, i, 0, 0, i, (i, h), dest_index=x)
            gate_up[ExpertShard(x, "up_proj")] = ShardSpec(0, i, i, 0, 0, i, (i, h), dest_index=x)
            down[ExpertShard(x, "down_proj")] = ShardSpec(0, 0, h, 0, 0, h, (h, i), dest_index=x)
        self.gate_up_proj = hf_param((e, 2 * i, h), dtype, gate_up)
        self.down_proj = hf_param((e, h, i), dtype, down)


class Router(nn.Module):
    """A bias-free [out, H] projection held whole: the router's logits over the experts (`mlp.gate`), or
    Qwen2-MoE's one-logit shared-expert gate (`mlp.shared_expert_gate`)."""

    def __init__(self, num_experts: int, hidden: int, dtype: torch.dtype):
        super().__init__()
        self.weight = hf_param((num_experts, hidden), dtype, {None: _full((num_experts, hidden))})


class SharedExpert(nn.Module):
    """Qwen2-MoE's always-on expert: a SiLU MLP (gate/up fused as in the dense MLP)."""

    def __init__(self, hidden: int, intermediate: int, dtype: torch.dtype):
        super().__init__()
        self.gate_up_proj = MergedColumnLinear(hidden, {0: intermediate, 1: intermediate}, False, dtype, TPInfo())
        self.down_proj = RowLinear(intermediate, hidden, dtype, TPInfo())

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.down_proj.silu_mul_forward(self.gate_up_proj(h), skinny=False)


class SparseMoeBlock(nn.Module):
    """`layer_id`: the decoder layer, the column of the routed-experts table this block writes.
    `shared_intermediate` > 0 adds Qwen2-MoE's shared expert, scaled per token by sigmoid(shared_expert_gate)."""

    def __init__(self, num_experts: int, top_k: int, hidden: int, intermediate: int, renormalize: bool,
                 dtype: torch.dtype, layer_id: int, shared_intermediate: int = 0):
        super().__init__()
        self.top_k, self.renormalize, self.layer_id = top_k, renormalize, layer_id
        self.gate = Router(num_experts, hidden, dtype)
        self.experts = StackedExperts(num_experts, hidden, intermediate, dtype)
        self.shared_expert = SharedExpert(hidden, shared_intermediate, dtype) if shared_intermediate else None
        self.shared_expert_gate = Router(1, hidden, dtype) if shared_intermediate else None

    def forward(self, h: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """The block on an already normalised h."""
        out = self._experts(h, torch.nn.functional.linear(h, self.gate.weight), ctx, norm=None)
        if self.shared_expert is None:
            return out
        gate = torch.sigmoid(torch.nn.functional.linear(h, self.shared_expert_gate.weight))
        return out + gate * self.shared_expert(h)

    def norm_forward(self, x: torch.Tensor | SplitSum, residual: torch.Tensor, norm: RMSNorm,
                     ctx: ForwardContext) -> tuple[torch.Tensor, torch.Tensor]:
        """The block on norm(x + residual); returns (output, new residual); `x` may be o_proj's split-K partials (2-64
        rows), which the norm sums. At batch 1 (the fused batch-1
        matmuls) the router's matmul adds the residual and normalises its row itself, and the expert kernels
        normalise the new residual on the fly: the layer's MoE half is three kernels, no norm of its own."""
        if ctx.skinny_matmul and self.shared_expert is None:
            logits, residual = skinny_matmul.skinny_linear(x, self.gate.weight, prologue=skinny_matmul.ADD_NORM,
                                                           residual=residual, norm_weight=norm.weight, eps=norm.eps)
            return self._experts(residual, logits, ctx, fused_moe.InputNorm(norm.weight, norm.eps)), residual
        h, residual = norm.forward_residual(x, residual)
        return self(h, ctx), residual

    def _experts(self, x: torch.Tensor, logits: torch.Tensor, ctx: ForwardContext,
                 norm: fused_moe.InputNorm | None) -> torch.Tensor:
        routed = None
        if ctx.routed_experts is not None:
            routed = fused_moe.RoutedWrite(ctx.routed_experts, ctx.slot_mapping, self.layer_id)
        return fused_moe.moe(x, self.experts.gate_up_proj, self.experts.down_proj, logits, self.top_k, self.renormalize,
                             norm, routed)
