"""The one place HF parameter names meet the engine's fused, TP-sliced parameters.

Every transport (disk, tensor, IPC, distributed), `get_weights_by_name`, checksums and the sharded saver
go through `WeightMap`: a slot per HF name holding a view into the live parameter storage, so loading is
`slot.dest.copy_(slot.spec.src_view(hf_tensor))` with no per-call name parsing.

Stacked MoE experts have two names each: the parameter's own (transformers 5's fused tensor, e.g.
`model.layers.0.mlp.experts.gate_up_proj`), which is canonical (reads, checksums, saves), and one per
expert and projection (`model.layers.0.mlp.experts.3.gate_proj.weight`, the checkpoint layout), which
resolve to parts: slots viewing a piece of the same storage, accepted by every transport.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hotswap.models.parallel import ExpertShard, ShardSpec


@dataclass(frozen=True, slots=True)
class WeightSlot:
    hf_name: str
    spec: ShardSpec
    dest: torch.Tensor  # view of this rank's part of the live parameter

    @property
    def hf_shape(self) -> tuple[int, ...]:
        return self.spec.hf_shape

    @property
    def dtype(self) -> torch.dtype:
        return self.dest.dtype

    @property
    def is_full(self) -> bool:
        """True when this rank holds the whole HF tensor (no TP slicing)."""
        return self.spec.src_len == self.spec.hf_shape[self.spec.src_dim]

    def load(self, hf_tensor: torch.Tensor) -> None:
        self.dest.copy_(self.spec.src_view(hf_tensor), non_blocking=True)


def hf_name_for(param_name: str, shard_id: str | int | ExpertShard | None, packed_modules: dict) -> str:
    if shard_id is None:
        return param_name
    if isinstance(shard_id, ExpertShard):
        return shard_id.hf_name(param_name)
    inverse = {v: k for k, v in packed_modules.items()}
    prefix, module, leaf = param_name.rsplit(".", 2)
    return f"{prefix}.{inverse[(module, shard_id)]}.{leaf}"


class WeightMap:
    """HF name -> WeightSlot for one model. Rebuild it whenever parameter storage moves (memory resume)."""

    def __init__(self, model: nn.Module):
        self.slots: dict[str, WeightSlot] = {}  # canonical names: together they cover every parameter once
        self.parts: dict[str, WeightSlot] = {}  # per-expert names: pieces of a canonical slot's storage
        self.part_of: dict[str, str] = {}  # part name -> its canonical name
        self.part_names: dict[str, list[str]] = {}  # canonical name -> its part names
        for param_name, param in model.named_parameters():
            for shard_id, spec in param.hf_shards.items():
                hf = hf_name_for(param_name, shard_id, model.packed_modules)
                slot = WeightSlot(hf, spec, spec.dest_view(param.data))
                if isinstance(shard_id, ExpertShard):
                    self.parts[hf] = slot
                    self.part_of[hf] = param_name
                    self.part_names.setdefault(param_name, []).append(hf)
                else:
                    self.slots[hf] = slot
        self.aliases: dict[str, str] = model.tied_aliases()
        self.names: list[str] = sorted(self.slots)
        self.max_numel = max((math.prod(s.hf_shape) for s in self.slots.values()), default=0)  # the largest HF tensor

    def resolve(self, name: str) -> WeightSlot | None:
        name = self.aliases.get(name, name)
        return self.slots.get(name) or self.parts.get(name)

    def checkpoint_layout(self, name: str, whole: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Canonical tensor `name` (whole, as `whole`) as checkpoints store it: stacked experts split per
        expert and projection (the layout transformers writes and every engine reads), others as is."""
        parts = self.part_names.get(name)
        if parts is None:
            return [(name, whole)]
        return [(part, self.parts[part].spec.dest_view(whole)) for part in parts]

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def total_bytes(self) -> int:
        return sum(s.dest.numel() * s.dest.element_size() for s in self.slots.values())
