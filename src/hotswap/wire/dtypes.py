"""Dtype names as they travel in requests and descriptors ("bfloat16", "float32", ...)."""

from __future__ import annotations

import torch

DTYPES_BY_NAME = {
    "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
    "half": torch.float16, "float64": torch.float64,
}
# every plain dtype a trainer's broadcast may announce: a distributed update receives what it will refuse
# (an int or bool tensor), so the trainer's broadcast completes and lockstep holds
RECEIVABLE_DTYPES = {
    **DTYPES_BY_NAME, "double": torch.float64, "bool": torch.bool, "uint8": torch.uint8, "int8": torch.int8, "int16": torch.int16,
    "int32": torch.int32, "int64": torch.int64, "int": torch.int32, "long": torch.int64, "short": torch.int16,
    **{name: getattr(torch, name) for name in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "uint16", "uint32",
                                               "uint64") if isinstance(getattr(torch, name, None), torch.dtype)},
}


def dtype_from_name(name: str) -> torch.dtype | None:
    return DTYPES_BY_NAME.get(str(name).removeprefix("torch."))


def receivable_dtype(name: str) -> torch.dtype | None:
    """The dtype of a tensor announced for receiving (a weight dtype, or one the update will then refuse by name)."""
    return RECEIVABLE_DTYPES.get(str(name).removeprefix("torch."))


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
