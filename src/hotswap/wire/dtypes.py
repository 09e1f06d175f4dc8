"""Dtype names as they travel in requests and descriptors ("bfloat16", "float32", ...)."""

from __future__ import annotations

import torch

DTYPES_BY_NAME = {
    "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "half": torch.float16, "float64": torch.float64,
}


def dtype_from_name(name: str) -> torch.dtype | None:
    return DTYPES_BY_NAME.get(str(name).removeprefix("torch."))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
