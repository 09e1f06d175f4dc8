"""Tensors handed over in process, by CUDA IPC or by shared memory -> matched tensors, or a refusal."""

from __future__ import annotations

import torch

from hotswap import protocol as p
from hotswap.errors import HotswapError, shown
from hotswap.weights.fast_copy import MatchedTensors, TensorPlanCache
from hotswap.weights.ipc import CudaIpcMappings
from hotswap.weights.ipc_grouped import resolve_grouped
from hotswap.weights.mapping import WeightMap
from hotswap.weights.sglang_payloads import decode_serialized_named_tensors


def match_tensors(req: p.UpdateWeightsFromTensorRequest, weight_map: WeightMap, mappings: CudaIpcMappings,
                  plans: TensorPlanCache, *, shm_prefix: str) -> MatchedTensors:
    """Open the handles (one open per shared IPC storage; shared-memory blocks only under this engine's
    `shm_prefix`; SGLang's `serialized_named_tensors` through the restricted decoder, this rank's payload,
    tensor parallelism relays the whole tensors from here), then match them (`match_named`)."""
    if (req.named_tensors is None) == (req.serialized_named_tensors is None):
        raise HotswapError("give exactly one of named_tensors or serialized_named_tensors")
    if req.serialized_named_tensors is not None:
        decoded = decode_serialized_named_tensors(req.serialized_named_tensors, 0, req.load_format, mappings)
        return plans.match(weight_map, decoded.named_tensors)
    if req.load_format not in (None, "direct"):
        raise HotswapError(f"unsupported load_format {shown(req.load_format)} for named_tensors (\"flattened_bucket\" comes as serialized_named_tensors)")
    return match_named(resolve_grouped(req.named_tensors, mappings, shm_prefix=shm_prefix), weight_map, mappings, plans)


def match_named(named: list[tuple[str, torch.Tensor]], weight_map: WeightMap, mappings: CudaIpcMappings,
                plans: TensorPlanCache) -> MatchedTensors:
    """Match by metadata (cached by names). Views of remembered IPC descriptors are the engine's own and
    cannot change: their call keeps its match, and a repeat of it skips every per-tensor check."""
    call = mappings.last_call
    if call is None or call.resolved is not named:
        return plans.match(weight_map, named)
    if not plans.current(call.matched, weight_map):
        call.matched = plans.match(weight_map, named, trusted=True)
    return call.matched
