"""The process groups of one tensor-parallel engine, over a TCP store that rank 0 hosts.

- `control` (gloo, host memory): commands, batch metadata and outcomes. Its timeout is unbounded because
  an idle worker waits in it for the next command; rank 0 bounds each of its own waits instead.
- `device` (NCCL on CUDA, gloo on the CPU): the model's all-reduces and all-gathers, the sampled ids, the
  weight relay and gathers. Bounded by `timeout_s` while the ranks start (they load at their own pace), then by the
  step bound (`bound_steps`): a forward step must not wait on a hung rank for as long as a load may take.

Neither is the default process group, so an engine can live in a process that has its own (a trainer's).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _set_pg_timeout, _world

from hotswap.models.parallel import TPInfo

UNBOUNDED = timedelta(days=3650)


def _group(store: dist.Store, name: str, rank: int, size: int, backend: str, timeout: timedelta) -> dist.ProcessGroup:
    pg, _ = _new_process_group_helper(size, rank, [], backend, PrefixStore(name, store), group_name=name, timeout=timeout)
    _world.pg_group_ranks[pg] = {i: i for i in range(size)}
    return pg


@dataclass(slots=True)
class TPGroups:
    rank: int
    size: int
    store: dist.Store
    control: dist.ProcessGroup
    device: dist.ProcessGroup
    backend: str

    @classmethod
    def create(cls, *, store: dist.Store, rank: int, size: int, prefix: str, backend: str, timeout_s: float) -> TPGroups:
        """Blocks until every rank arrives (bounded by the store's timeout)."""
        control = _group(store, f"{prefix}-control", rank, size, "gloo", UNBOUNDED)
        device = _group(store, f"{prefix}-device", rank, size, backend, timedelta(seconds=timeout_s))
        return cls(rank=rank, size=size, store=store, control=control, device=device, backend=backend)

    def bound_steps(self, timeout_s: float) -> None:
        """From now on each device-group collective (a step's, one bucket of a relay, one tensor of a gather) gives
        up after `timeout_s`. Every rank calls it once it has started, before its first step."""
        _set_pg_timeout(timedelta(seconds=timeout_s), self.device)

    @property
    def info(self) -> TPInfo:
        return TPInfo(self.rank, self.size, self.device)


def worker_device(device: torch.device, rank: int, gpu_id_step: int = 1) -> torch.device:
    """Rank r's device: SGLang's base_gpu_id + r * gpu_id_step from rank 0's GPU (cuda:k -> cuda:k+r*step); every rank
    of a CPU engine on the CPU."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", (device.index or 0) + rank * gpu_id_step)
