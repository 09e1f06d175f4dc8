"""A torch.distributed group shared with a trainer, made the way RL frameworks make it for SGLang:
a TCP rendezvous at the trainer (rank 0), a store prefixed by `group_name`, broadcasts from rank 0."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world, rendezvous

DTYPES_BY_NAME = {
    "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "half": torch.float16, "float64": torch.float64,
}


def dtype_from_name(name: str) -> torch.dtype | None:
    return DTYPES_BY_NAME.get(str(name).removeprefix("torch."))


def init_custom_process_group(*, backend: str, init_method: str, world_size: int, rank: int, group_name: str,
                              timeout: timedelta) -> dist.ProcessGroup:
    """A process group that does not touch the default group (the engine may have its own TP group)."""
    store, rank, world_size = next(rendezvous(init_method, rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    store = PrefixStore(group_name, store)
    pg, _ = _new_process_group_helper(world_size, rank, [], backend, store, group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


@dataclass(slots=True)
class WeightsGroup:
    name: str
    pg: dist.ProcessGroup
    rank: int
    world_size: int
    backend: str
    device: torch.device

    def broadcast_from_trainer(self, tensor: torch.Tensor) -> None:
        dist.broadcast(tensor, src=0, group=self.pg)

    def destroy(self) -> None:
        dist.destroy_process_group(self.pg)
