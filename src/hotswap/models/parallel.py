"""Tensor-parallel placement: which slice of a full HF tensor this rank holds."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

# torch 2.13 renamed all_gather_into_tensor (deprecated since) to all_gather_single
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


@dataclass(frozen=True, slots=True)
class TPInfo:
    rank: int = 0
    size: int = 1
    group: dist.ProcessGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        if self.size > 1:
            dist.all_reduce(x, group=self.group)
        return x

    def all_gather_last_dim(self, x: torch.Tensor) -> torch.Tensor:
        if self.size == 1:
            return x
        # one flat gather (a single collective, capturable in a CUDA graph), then the ranks' slices side by side
        out = torch.empty((self.size * x.shape[0], *x.shape[1:]), dtype=x.dtype, device=x.device)
        _all_gather_flat(out, x.contiguous(), group=self.group)
        return out.view(self.size, *x.shape).movedim(0, -2).reshape(*x.shape[:-1], self.size * x.shape[-1])

    def split(self, total: int) -> tuple[int, int]:
        """(start, length) of this rank's even share of `total` rows."""
        if total % self.size:
            raise ValueError(f"dimension {total} does not divide evenly over tensor-parallel size {self.size}")
        share = total // self.size
        return self.rank * share, share

    def split_heads(self, heads: int, head_dim: int) -> tuple[int, int, int]:
        """(start, length, replicas) of this rank's rows of `heads` heads of `head_dim` rows: an even share, or, with
        fewer heads than ranks, head rank // replicas whole, held by replicas = size // heads ranks (SGLang's
        QKVParallelLinear: num_kv_head_replicas, and its weight loader's shard rank tp_rank // replicas)."""
        if not heads % self.size:
            share = heads // self.size * head_dim
            return self.rank * share, share, 1
        if self.size % heads:
            raise ValueError(f"{heads} heads neither divide over nor replicate evenly across tensor-parallel size {self.size}")
        replicas = self.size // heads
        return self.rank // replicas * head_dim, head_dim, replicas


@dataclass(frozen=True, slots=True)
class ShardSpec:
    """Where a HF tensor lands in a (fused, TP-sliced) parameter.

    dest_* select the rows of the live parameter; src_* select this rank's part of the full HF tensor.
    `dest_index` (stacked MoE experts): the HF tensor is one entry of the parameter's leading dim; dest_*
    then narrow that entry. `replicas`: how many ranks hold this same slice (k/v heads fewer than ranks).
    """

    dest_dim: int
    dest_start: int
    dest_len: int
    src_dim: int
    src_start: int
    src_len: int
    hf_shape: tuple[int, ...]
    dest_index: int | None = None
    replicas: int = 1

    def dest_view(self, param: torch.Tensor) -> torch.Tensor:
        if self.dest_index is not None:
            param = param.select(0, self.dest_index)
        return param.narrow(self.dest_dim, self.dest_start, self.dest_len)

    def src_view(self, hf_tensor: torch.Tensor) -> torch.Tensor:
        if self.src_len == hf_tensor.shape[self.src_dim]:
            return hf_tensor
        return hf_tensor.narrow(self.src_dim, self.src_start, self.src_len)

    def rank_slice(self, rank: int) -> tuple[int, int]:
        """(src_start, src_len) that tensor-parallel rank `rank` holds, read off rank 0's spec: every rank
        holds rank 0's share length except the last vocab shard, which stops at the tensor's end; `replicas`
        neighbouring ranks hold the same share."""
        full = self.hf_shape[self.src_dim]
        if self.src_len == full:
            return 0, full
        start = min(rank // self.replicas * self.src_len, full)
        return start, min(self.src_len, full - start)

    def gathered_from(self, rank: int) -> bool:
        """Whether a whole tensor is assembled with rank `rank`'s slice: a replicated slice is taken once, from
        the first rank holding it."""
        return rank % self.replicas == 0


@dataclass(frozen=True, slots=True)
class ExpertShard:
    """Shard id of one expert's checkpoint tensor inside a stacked expert parameter
    (`...mlp.experts.gate_up_proj` [E, 2I, H] holds `...mlp.experts.{e}.gate_proj.weight` and `up_proj`)."""

    expert: int
    proj: str  # the HF projection: gate_proj, up_proj or down_proj

    def hf_name(self, param_name: str) -> str:
        return f"{param_name.rsplit('.', 1)[0]}.{self.expert}.{self.proj}.weight"
