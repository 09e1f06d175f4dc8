"""Checksum manifests: per HF name, sha256 of the tensor's raw bytes in its stored dtype (contiguous,
row-major), plus a digest over the sorted names each followed by its hex checksum. The trainer side
computes the same from a state_dict, so a trainer can prove the engine holds exactly its weights."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping

import torch

from hotswap.wire.buckets import iter_named_tensors


def tensor_sha256(t: torch.Tensor) -> str:
    data = t.detach().contiguous().cpu()
    if data.dim() == 0:
        data = data.reshape(1)
    return hashlib.sha256(data.view(torch.uint8).numpy().tobytes()).hexdigest()


def manifest_digest(checksums: Mapping[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(checksums):
        h.update(name.encode())
        h.update(checksums[name].encode())
    return h.hexdigest()


def checksum_manifest(named_tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> dict[str, str]:
    """{name: sha256}; `dtype` casts first (a trainer in fp32 proving a bf16 engine's weights)."""
    return {name: tensor_sha256(t if dtype is None else t.to(dtype)) for name, t in named_tensors}


def state_dict_manifest(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None) -> dict[str, str]:
    """The manifest of a HF model's state_dict as the engine reports it: what a push of that state_dict
    sends (`iter_named_tensors`: tied aliases such as `lm_head.weight` and rotary caches left out)."""
    return checksum_manifest(iter_named_tensors(state_dict), dtype)
