"""The ranks a weight op runs on, behind one interface, so the handlers carry no tensor-parallel branches.

`LocalRanks` is a single-GPU engine: every op is a no-op and reads see this rank's slots. The
tensor-parallel implementation is `runner.tp_peers.TPPeers` (rank 0's side): it sends each op to the
workers, which apply their slices through the same `weights.apply` functions rank 0 uses.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from hotswap.weights.mapping import WeightMap


class WeightRanks(Protocol):
    broken: str | None  # why no op may run any more (a collective with the other ranks failed)

    @property
    def size(self) -> int: ...
    def agree(self, failure: str | None) -> str | None: ...
    def commit(self) -> None: ...
    def rollback(self) -> None: ...
    def apply_disk(self, model_path: str) -> None: ...
    def relay(self, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> None: ...
    def receive(self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None) -> None: ...
    def apply_received(self) -> None: ...
    def reset_tensors(self) -> None: ...
    def gather(self, weight_map: WeightMap, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]: ...
    def init_group(self, args: dict) -> str | None: ...
    def settle_join(self, key: str | None, own_failure: str | None, timeout_s: float) -> str | None: ...
    def destroy_group(self, group_name: str) -> None: ...


@dataclass(slots=True)
class LocalRanks:
    """One rank: nothing to tell anyone; the outcome is this rank's own."""

    broken: str | None = None

    @property
    def size(self) -> int:
        return 1

    def agree(self, failure: str | None) -> str | None:
        return failure

    def commit(self) -> None:
        pass

    def rollback(self) -> None:
        pass

    def apply_disk(self, model_path: str) -> None:
        pass

    def relay(self, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        pass

    def receive(self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None) -> None:
        pass

    def apply_received(self) -> None:
        pass

    def reset_tensors(self) -> None:
        pass

    def gather(self, weight_map: WeightMap, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        return ((name, weight_map.slots[name].dest) for name in names)

    def init_group(self, args: dict) -> str | None:
        return None

    def settle_join(self, key: str | None, own_failure: str | None, timeout_s: float) -> str | None:
        return own_failure

    def destroy_group(self, group_name: str) -> None:
        pass
