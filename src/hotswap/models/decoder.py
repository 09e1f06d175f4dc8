"""The Llama-family decoder (Llama, Qwen2 with q/k/v bias, Qwen3 with q/k RMSNorm; Llama's and Qwen3's
`attention_bias` on q/k/v and o_proj, Llama's `mlp_bias`; Qwen3-MoE and Qwen2-MoE with a sparse MoE block in place of
the MLP on their MoE layers) over a paged KV cache, rotary frequencies from models/rope.py."""

from __future__ import annotations

import torch
from torch import nn

from hotswap.config import ModelConfig
from hotswap.kernels import fused, l2_prefetch, skinny_matmul
from hotswap.kernels.split_sum import SplitSum
from hotswap.models.forward_context import ForwardContext
from hotswap.models.layers import MergedColumnLinear, RMSNorm, RotaryEmbedding, RowLinear, VocabEmbedding
from hotswap.models.moe import SparseMoeBlock
from hotswap.models.parallel import TPInfo


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, rotary: RotaryEmbedding):
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = cfg.head_dim
        self.num_heads = cfg.num_heads // tp.size
        self.num_kv_heads = max(1, cfg.num_kv_heads // tp.size)
        self.scale = cfg.head_dim**-0.5
        q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        dt = cfg.torch_dtype
        self.qkv_proj = MergedColumnLinear(cfg.hidden_size, {"q": q, "k": kv, "v": kv}, cfg.attention_bias, dt, tp,
                                           head_rows={"k": cfg.head_dim, "v": cfg.head_dim})
        self.o_proj = RowLinear(q, cfg.hidden_size, dt, tp, bias=cfg.o_proj_bias)
        self.q_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None
        self.k_norm = RMSNorm(cfg.head_dim, cfg.rms_norm_eps, dt) if cfg.qk_norm else None
        self.rotary = rotary

    def norm_forward(self, x: torch.Tensor | SplitSum, residual: torch.Tensor | None, norm: RMSNorm,
                     ctx: ForwardContext, ahead: l2_prefetch.Ahead | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Attention on norm(x + residual) (norm(x) before the first residual); returns (output, new residual).
        A decode of up to 64 rows (our matmul kernels) finishes its heads (norm, rotary, KV store) inside the qkv
        matmul, and asks L2 for the weights `ahead` once that matmul is queued."""
        if ((ctx.skinny_matmul and skinny_matmul.HEADS_EPILOGUE) or ctx.rows_matmul) and fused.available(x):
            k_cache, v_cache = ctx.attention.kv_cache(self.layer_id)
            q_w, k_w, eps = self._qk_norm()
            heads = skinny_matmul.HeadsEpilogue(self.num_heads, self.num_kv_heads, self.head_dim, q_w, k_w, eps,
                                                self.rotary.cos_sin, ctx.positions, k_cache, v_cache, ctx.slot_mapping)
            qkv, residual = self.qkv_proj.norm_forward(x, residual, norm, ctx.skinny_matmul, heads)
            if ahead is not None:
                ahead.ask()
            q = qkv[:, :self.num_heads * self.head_dim].view(-1, self.num_heads, self.head_dim)
            return self._project(ctx.attention.attend(self.layer_id, q, self.scale, ctx), ctx), residual
        qkv, residual = self.qkv_proj.norm_forward(x, residual, norm, ctx.skinny_matmul)
        return self.forward(qkv, ctx), residual

    def forward(self, qkv: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention and o_proj over the already projected q/k/v rows."""
        sizes = self.qkv_proj.output_sizes
        q, k, v = qkv.split([sizes["q"], sizes["k"], sizes["v"]], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        if fused.available(q):
            q_w, k_w, eps = self._qk_norm()
            k_cache, v_cache = ctx.attention.kv_cache(self.layer_id)
            fused.qk_norm_rope(q, k, q_w, k_w, self.rotary.cos_sin, ctx.positions, eps,
                               kv_store=(v, k_cache, v_cache, ctx.slot_mapping))
            out = ctx.attention.attend(self.layer_id, q, self.scale, ctx)
        else:
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)
            q, k = self.rotary(ctx.positions, q, k)
            out = ctx.attention.forward(self.layer_id, q, k, v, self.scale, ctx)
        return self._project(out, ctx)

    def _qk_norm(self) -> tuple[torch.Tensor | None, torch.Tensor | None, float]:
        """(q norm weight, k norm weight, eps) of Qwen3's per-head RMSNorm; (None, None, 0.0) without one."""
        if self.q_norm is None:
            return None, None, 0.0
        return self.q_norm.weight, self.k_norm.weight, self.q_norm.eps

    def _project(self, out: torch.Tensor, ctx: ForwardContext) -> torch.Tensor | SplitSum:
        """o_proj over the attention output [tokens, heads, head_dim]; the output goes into the MLP's (or MoE block's)
        residual add + norm, so it may be left as split-K partials."""
        return self.o_proj(out.view(-1, self.num_heads * self.head_dim), ctx.skinny_matmul, ctx.rows_matmul,
                           into_norm=True)


class MLP(nn.Module):
    """gate/up and down projections; the layer runs them (gate_up fused with the post-attention norm)."""

    def __init__(self, cfg: ModelConfig, tp: TPInfo):
        super().__init__()
        i = cfg.intermediate_size
        self.gate_up_proj = MergedColumnLinear(cfg.hidden_size, {0: i, 1: i}, cfg.mlp_bias, cfg.torch_dtype, tp)
        self.down_proj = RowLinear(i, cfg.hidden_size, cfg.torch_dtype, tp, bias=cfg.mlp_bias)

    def norm_forward(self, x: torch.Tensor | SplitSum, residual: torch.Tensor, norm: RMSNorm,
                     ctx: ForwardContext) -> tuple[torch.Tensor | SplitSum, torch.Tensor]:
        """The MLP on norm(x + residual); returns (output, new residual). The output goes into the next residual add +
        norm (the next layer's or the final one), so down_proj may leave it as split-K partials."""
        if ctx.rows_matmul and fused.available(x):  # SiLU-and-mul in the gate/up matmul
            act, residual = self.gate_up_proj.norm_forward(x, residual, norm, False, silu_mul=True)
            return self.down_proj(act, rows=True, into_norm=True), residual
        gate_up, residual = self.gate_up_proj.norm_forward(x, residual, norm, ctx.skinny_matmul)
        return self.down_proj.silu_mul_forward(gate_up, ctx.skinny_matmul), residual


def _mlp(cfg: ModelConfig, layer_id: int, tp: TPInfo) -> MLP | SparseMoeBlock:
    if not cfg.is_moe_layer(layer_id):
        return MLP(cfg, tp)
    return SparseMoeBlock(cfg.num_experts, cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size,
                          cfg.norm_topk_prob, cfg.torch_dtype, layer_id=layer_id,
                          shared_intermediate=cfg.shared_expert_intermediate_size)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int, tp: TPInfo, rotary: RotaryEmbedding):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
        self.self_attn = Attention(cfg, layer_id, tp, rotary)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
        self.mlp = _mlp(cfg, layer_id, tp)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None, ctx: ForwardContext,
                side: l2_prefetch.SideStream | None = None):
        """With `side`, a dense layer's MLP weights are asked of L2 while its attention runs (kernels/l2_prefetch.py)."""
        ahead = None
        if side is not None and isinstance(self.mlp, MLP):
            ahead = l2_prefetch.Ahead(side, self.mlp.gate_up_proj.weight, self.mlp.down_proj.weight)
        x, residual = self.self_attn.norm_forward(x, residual, self.input_layernorm, ctx, ahead)
        return self.mlp.norm_forward(x, residual, self.post_attention_layernorm, ctx)


class DecoderModel(nn.Module):
    def __init__(self, cfg: ModelConfig, tp: TPInfo):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.torch_dtype, tp)
        rotary = RotaryEmbedding(cfg.head_dim, cfg.max_positions, cfg.rope_theta, cfg.rope_scaling, torch.device("cpu"),
                                 cfg.max_position_embeddings)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, tp, rotary) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.torch_dtype)
        self.rotary = rotary
        self.l2_side = l2_prefetch.SideStream()

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        x, residual = self.embed_tokens.embed(input_ids, ctx.input_src, ctx.prev_ids), None
        side = self.l2_side if ctx.is_decode and l2_prefetch.wanted(x) else None
        for layer in self.layers:
            x, residual = layer(x, residual, ctx, side)
        if side is not None:
            side.join()
        x, _ = self.norm.forward_residual(x, residual)
        return x


class CausalLM(nn.Module):
    """Parameter names are HF names with q/k/v fused into `qkv_proj` and gate/up into `gate_up_proj`."""

    # HF sub-module name -> (engine parameter's module name, shard id)
    packed_modules = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, cfg: ModelConfig, tp: TPInfo = TPInfo()):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(cfg, tp)
        self.lm_head = None if cfg.tie_word_embeddings else VocabEmbedding(cfg.vocab_size, cfg.hidden_size, cfg.torch_dtype, tp)

    def forward(self, input_ids: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        return self.model(input_ids, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """In the model's dtype: the sampler casts to float32 only where it computes with them."""
        head = self.lm_head if self.lm_head is not None else self.model.embed_tokens
        return head.logits(hidden)

    def tied_aliases(self) -> dict[str, str]:
        """HF names that share storage with another (tied embeddings): alias -> canonical."""
        return {"lm_head.weight": "model.embed_tokens.weight"} if self.lm_head is None else {}
