"""Prove an engine holds exactly the trainer's weights: the same per-tensor sha256 manifest on both sides."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.trainer.push import call_result
from hotswap.wire.checksum import state_dict_manifest
from hotswap.wire.dtypes import dtype_from_name


def engine_dtype(engine: EngineHandle) -> torch.dtype | None:
    """The dtype the engine stores its weights in (None if it cannot say)."""
    r = call_result(engine.get_model_info)
    return dtype_from_name(r.get("dtype") or "") if r.success else None


def verify_engine_weights(engine: EngineHandle, state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | str | None = None) -> EngineResult:
    """Compare the engine's checksums with `state_dict_manifest(state_dict, dtype)`.

    `dtype` casts the trainer's tensors first (an fp32 trainer proving a bf16 engine's weights); "auto"
    asks the engine which dtype it stores. Returns the engine's reply as an EngineResult: `success` when
    every checksum matches, else `data["mismatches"]` names the parameters that differ."""
    if dtype == "auto":
        dtype = engine_dtype(engine)
    elif isinstance(dtype, str):
        resolved = dtype_from_name(dtype)
        if resolved is None:
            raise ValueError(f"unknown dtype {dtype!r}")
        dtype = resolved
    manifest = state_dict_manifest(state_dict, dtype)
    return call_result(engine.check_weights, "checksum", expected=manifest)
