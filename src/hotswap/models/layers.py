"""Layers whose parameters know where each HF tensor lands in them (`param.hf_shards`)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from hotswap.kernels import fused, rows_matmul, skinny_matmul
from hotswap.kernels.split_sum import SplitSum
from hotswap.models.parallel import ShardSpec, TPInfo
from hotswap.models.rope import rope_frequencies


def hf_param(shape: tuple[int, ...], dtype: torch.dtype, shards: dict) -> nn.Parameter:
    p = nn.Parameter(torch.empty(shape, dtype=dtype), requires_grad=False)
    p.hf_shards = shards
    return p


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype):
        super().__init__()
        self.eps = eps
        self.weight = hf_param((dim,), dtype, {})
        self.weight.hf_shards[None] = ShardSpec(0, 0, dim, 0, 0, dim, (dim,))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.available(x):
            return fused.rmsnorm(x, self.weight, self.eps)
        orig = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(orig)

    def forward_residual(self, x: torch.Tensor | SplitSum, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the residual then normalise; returns (normed, new residual) as HF does in the layer's dtype. `x` may be a
        split-K matmul's partials (RowLinear's `into_norm`), which the fused kernel sums first."""
        if fused.available(x):
            return fused.rmsnorm(x, self.weight, self.eps, residual=residual), residual  # residual updated in place
        residual = x + residual
        return self.forward(residual), residual


class MergedColumnLinear(nn.Module):
    """Several HF projections fused along the output dim (q/k/v or gate/up), each column-sharded for TP.
    `head_rows`: the projections made of heads of that many rows (k/v), whose heads are replicated across
    ranks when there are fewer of them than ranks."""

    def __init__(self, in_features: int, out_sizes: dict, bias: bool, dtype: torch.dtype, tp: TPInfo,
                 head_rows: dict | None = None):
        super().__init__()
        head_rows = head_rows or {}
        local = {sid: tp.split_heads(size // head_rows[sid], head_rows[sid]) if sid in head_rows else (*tp.split(size), 1)
                 for sid, size in out_sizes.items()}
        total = sum(length for _, length, _ in local.values())
        w_shards, b_shards, offset = {}, {}, 0
        for sid, (src_start, length, replicas) in local.items():
            full = out_sizes[sid]
            w_shards[sid] = ShardSpec(0, offset, length, 0, src_start, length, (full, in_features), replicas=replicas)
            b_shards[sid] = ShardSpec(0, offset, length, 0, src_start, length, (full,), replicas=replicas)
            offset += length
        self.output_sizes = {sid: length for sid, (_, length, _) in local.items()}
        self.weight = hf_param((total, in_features), dtype, w_shards)
        self.bias = hf_param((total,), dtype, b_shards) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def norm_forward(self, x: torch.Tensor | SplitSum, residual: torch.Tensor | None, norm: RMSNorm, skinny: bool,
                     heads: skinny_matmul.HeadsEpilogue | None = None,
                     silu_mul: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """This projection of norm(x + residual), or of norm(x) before the first residual exists;
        returns (projection, new residual). `skinny` fuses the add and the norm into the batch-1 matmul. `heads`
        finishes the q/k/v heads' norm, rotary and KV-cache store in the matmul (q then leads the projection's
        columns), and `silu_mul` returns silu(gate) * up of a gate/up projection; without `skinny` both run on the
        few-rows decode kernel (kernels/rows_matmul.py)."""
        if skinny:
            prologue = skinny_matmul.NORM if residual is None else skinny_matmul.ADD_NORM
            y, new_residual = skinny_matmul.skinny_linear(x, self.weight, self.bias, prologue=prologue, residual=residual,
                                                          norm_weight=norm.weight, eps=norm.eps, heads=heads)
            return y, x if residual is None else new_residual
        if residual is None:
            residual, h = x, norm(x)
        else:
            h, residual = norm.forward_residual(x, residual)
        if heads is not None or silu_mul:
            return rows_matmul.rows_linear(h, self.weight, self.bias, silu_mul=silu_mul, heads=heads), residual
        return self(h), residual


class RowLinear(nn.Module):
    """Input-dim sharded projection (o_proj, down_proj); partial sums are all-reduced across TP ranks."""

    def __init__(self, in_features: int, out_features: int, dtype: torch.dtype, tp: TPInfo, bias: bool = False):
        super().__init__()
        start, length = tp.split(in_features)
        self.tp = tp
        self.weight = hf_param(
            (out_features, length), dtype, {None: ShardSpec(1, 0, length, 1, start, length, (out_features, in_features))}
        )
        # whole on every rank, added once after the all-reduce (Llama's attention_bias / mlp_bias)
        self.bias = hf_param((out_features,), dtype, {None: ShardSpec(0, 0, out_features, 0, 0, out_features, (out_features,))}) if bias else None

    def forward(self, x: torch.Tensor, skinny: bool = False, rows: bool = False,
                into_norm: bool = False) -> torch.Tensor | SplitSum:
        """`skinny`: the one-row kernel; `rows`: the few-rows one (kernels/rows_matmul.py); else cuBLAS. `into_norm`:
        the caller's next step is RMSNorm.forward_residual, which takes the few-rows kernel's split-K partials as they
        are (one rank, no bias: nothing to add before the norm)."""
        if skinny:
            y = skinny_matmul.skinny_linear(x, self.weight)[0]
        elif rows:
            y = rows_matmul.rows_linear(x, self.weight, split_sum=into_norm and self.tp.size == 1 and self.bias is None)
            if isinstance(y, SplitSum):
                return y
        else:
            y = F.linear(x, self.weight)
        return self._reduce(y)

    def _reduce(self, y: torch.Tensor) -> torch.Tensor:
        """The sum of the ranks' partial products, plus the bias."""
        y = self.tp.all_reduce(y)
        return y if self.bias is None else y + self.bias

    def silu_mul_forward(self, gate_up: torch.Tensor, skinny: bool) -> torch.Tensor:
        """This projection of silu(gate) * up, for gate_up = [gate | up] along the last dim."""
        if skinny and self.weight.shape[1] <= skinny_matmul.SILU_MUL_MAX_K:
            y = skinny_matmul.skinny_linear(gate_up, self.weight, prologue=skinny_matmul.SILU_MUL)[0]
        elif fused.available(gate_up):
            y = F.linear(fused.silu_and_mul(gate_up), self.weight)
        else:
            gate, up = gate_up.chunk(2, dim=-1)
            y = F.linear(F.silu(gate) * up, self.weight)
        return self._reduce(y)


class VocabEmbedding(nn.Module):
    """Vocab-sharded embedding; also serves as the (tied or untied) LM head."""

    def __init__(self, vocab_size: int, hidden: int, dtype: torch.dtype, tp: TPInfo):
        super().__init__()
        self.vocab_size = vocab_size
        self.tp = tp
        self.shard_len = math.ceil(vocab_size / tp.size)
        self.start = tp.rank * self.shard_len
        length = max(0, min(self.shard_len, vocab_size - self.start))
        self.weight = hf_param((self.shard_len, hidden), dtype, {None: ShardSpec(0, 0, length, 0, self.start, length, (vocab_size, hidden))})

    def embed(self, ids: torch.Tensor, src: torch.Tensor | None = None, prev: torch.Tensor | None = None) -> torch.Tensor:
        """`src`/`prev` (CUDA graphs, one rank): rows with src >= 0 embed prev[src] instead of ids."""
        if src is not None:
            if self.tp.size != 1:
                raise ValueError("inputs resolved on the device (CUDA graphs) need the whole vocabulary on one rank")
            return fused.embed_pending(ids, src, prev, self.weight)
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        mask = (local < 0) | (local >= self.shard_len)
        out = F.embedding(local.clamp(0, self.shard_len - 1), self.weight)
        out[mask] = 0
        return self.tp.all_reduce(out)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        out = F.linear(hidden, self.weight)
        return self.tp.all_gather_last_dim(out)[..., : self.vocab_size]


class RotaryEmbedding(nn.Module):
    """Neox-style rotary embedding of any rope type in models/rope.py, as a [positions, cos | sin] table with the
    attention factor (YaRN's) folded in, as transformers scales cos and sin.

    The table is a non-persistent buffer: `rebuild()` recreates it after memory release.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float, scaling: dict | None, device: torch.device,
                 max_position_embeddings: int = 0):
        super().__init__()
        self.max_positions = max_positions
        self.inv_freq, self.attention_factor = rope_frequencies(head_dim, theta, scaling, max_position_embeddings or max_positions)
        self.register_buffer("cos_sin", self._build(device), persistent=False)

    def _build(self, device: torch.device) -> torch.Tensor:
        t = torch.arange(self.max_positions, dtype=torch.float32, device=device)
        freqs = torch.outer(t, self.inv_freq.to(device))
        return torch.cat([freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor], dim=-1)

    def rebuild(self, device: torch.device) -> None:
        self.cos_sin = self._build(device)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cos, sin = self.cos_sin[positions].chunk(2, dim=-1)
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: [T, H, D]; HF computes rotary in float32 then casts back (apply_rotary_pos_emb on q.dtype tensors).
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

