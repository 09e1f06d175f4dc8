"""Routing replay (R3): decode the routed experts an engine returns with a generation."""

from __future__ import annotations

import base64
from collections.abc import Mapping

import numpy as np


def decode_routed_experts(output: Mapping | str, num_layers: int, top_k: int) -> np.ndarray:
    """int32 [positions, num_layers, top_k] from an output dict (its `meta_info["routed_experts"]`) or the
    base64 string itself. Position p is the token at p in prompt + output (every position but the last
    sampled token, which was never forwarded); dense layers hold -1."""
    data = output if isinstance(output, str) else output["meta_info"]["routed_experts"]
    flat = np.frombuffer(base64.b64decode(data), dtype="<i4")
    if flat.size % (num_layers * top_k):
        raise ValueError(f"{flat.size} routed expert ids do not split into [positions, {num_layers} layers, top-{top_k}]")
    return flat.reshape(-1, num_layers, top_k).astype(np.int32)
