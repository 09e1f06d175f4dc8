"""The one place HF parameter names meet the engine's fused, TP-sliced parameters.

Every transport (disk, tensor, IPC, distributed), `get_weights_by_name`, checksums and the sharded saver
go through `WeightMap`: a slot per HF name holding a view into the live parameter storage, so loading is
`slot.dest.copy_(slot.spec.src_view(hf_tensor))` with no per-call name parsing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hotswap.models.parallel import ShardSpec


@dataclass(frozen=True, slots=True)
class WeightSlot:
    hf_name: str
    param_name: str
    shard_id: str | int | None
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


def hf_name_for(param_name: str, shard_id: str | int | None, packed_modules: dict) -> str:
    if shard_id is None:
        return param_name
    inverse = {v: k for k, v in packed_modules.items()}
    prefix, module, leaf = param_name.rsplit(".", 2)
    return f"{prefix}.{inverse[(module, shard_id)]}.{leaf}"


class WeightMap:
    """HF name -> WeightSlot for one model. Rebuild it whenever parameter storage moves (memory resume)."""

    def __init__(self, model: nn.Module):
        self.slots: dict[str, WeightSlot] = {}
        for param_name, param in model.named_parameters():
            for shard_id, spec in param.hf_shards.items():
                hf = hf_name_for(param_name, shard_id, model.packed_modules)
                self.slots[hf] = WeightSlot(hf, param_name, shard_id, spec, spec.dest_view(param.data))
        self.aliases: dict[str, str] = model.tied_aliases()
        self.names: list[str] = sorted(self.slots)

    def resolve(self, name: str) -> WeightSlot | None:
        return self.slots.get(self.aliases.get(name, name))

    def __len__(self) -> int:
        return len(self.slots)

    @property
    def total_bytes(self) -> int:
        return sum(s.dest.numel() * s.dest.element_size() for s in self.slots.values())
