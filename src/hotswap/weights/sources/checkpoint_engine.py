"""checkpoint-engine's push: the ZMQ socket of this device -> buckets matched one by one, or a refusal.

Once this device's socket is known the exchange always runs, even for a refused update (the updater calls
`checkpoint_engine_receiver.refuse_exchange`), so the parameter server fails instead of waiting for a peer."""

from __future__ import annotations

from collections.abc import Callable

import torch

from hotswap.errors import HotswapError
from hotswap.weights.checkpoint_engine_payloads import BucketEntry
from hotswap.weights.checkpoint_engine_receiver import BufferSource, ReceiveStats, receive_buckets
from hotswap.weights.fast_copy import MatchedTensors, TensorPlanCache
from hotswap.weights.mapping import WeightMap


def check_ranks(tp_size: int) -> None:
    if tp_size > 1:  # each rank would have to take its own device's socket: not built yet
        raise HotswapError("update_weights_from_ipc (checkpoint-engine) is not supported with tensor_parallel_size > 1 yet; "
                           "push with update_weights_from_distributed, _from_tensor or _from_disk")


def receive(address: str, device: torch.device, source: BufferSource, timeout_s: float, weight_map: WeightMap, plans: TensorPlanCache,
            load: Callable[[MatchedTensors], object]) -> ReceiveStats:
    """Take every bucket; each is matched against the model, and against the buckets before it (the buckets
    are one update: each parameter comes once), before `load` copies it."""
    filled: dict[str, str] = {}  # slot -> the incoming name that filled it
    stacked: dict[str, str] = {}  # stacked expert parameter -> "whole" or "per expert", as it came

    def load_bucket(views: list[tuple[BucketEntry, torch.Tensor]]) -> None:
        matched = plans.match(weight_map, [(e.name, t) for e, t in views])
        for name, target, _ in matched.items:
            hf = target.slot.hf_name
            prev = filled.get(hf)
            if prev is not None and name not in weight_map.aliases and prev not in weight_map.aliases:
                raise HotswapError(f"parameter {name!r} was given in an earlier bucket of this update already")
            canonical = weight_map.part_of.get(hf)
            key, how = (canonical, "per expert") if canonical is not None else (hf, "whole")
            if key in weight_map.part_names and stacked.setdefault(key, how) != how:
                raise HotswapError(f"parameter {key!r} was given both whole and per expert in this update")
            filled[hf] = name
        load(matched)

    return receive_buckets(address, device=device, source=source, timeout_s=timeout_s, load_bucket=load_bucket)

