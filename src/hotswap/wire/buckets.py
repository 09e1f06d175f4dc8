"""Walking a trainer's weights in HF names, in buckets of bounded size, and flattening one bucket."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch

from hotswap.errors import shown  # errors.py imports nothing: wire stays at the bottom
from hotswap.wire.dtypes import DTYPES_BY_NAME, dtype_name

Weights = Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]]

# derived state, never a parameter (old Llama exports carry rotary caches); the engine ignores it too
SKIPPED_SUFFIXES = (".rotary_emb.inv_freq",)
SENDABLE_DTYPES = frozenset(DTYPES_BY_NAME.values())
# How many bucket calls the engine's per-call caches keep (copy plans, remembered IPC descriptors): a whole push's,
# since a push visits its buckets in the same order every step and an LRU smaller than that misses on every call
# (Qwen3-30B-A3B in 512 MiB buckets is 99 calls, a 235B-A22B about 900). A copy plan's device tables are about
# 1/8192 of its bucket's bytes: 64 MiB at most for 1,024 buckets of 512 MiB.
BUCKET_CALLS_REMEMBERED = 1024


def iter_named_tensors(weights: Weights) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs from a state_dict or an iterable of pairs.

    From a mapping, tied aliases (two names viewing the same memory, e.g. `lm_head.weight` of a model
    with tied embeddings) are sent once, under the non-`lm_head` name; `state_dict_manifest` counts
    what this yields. An iterable is passed through as is (its tensors may be temporaries whose addresses repeat).
    """
    if isinstance(weights, Mapping):
        seen: set[tuple] = set()
        for name in sorted(weights, key=lambda n: n.startswith("lm_head")):
            t = weights[name]
            if name.endswith(SKIPPED_SUFFIXES):
                continue
            key = (t.device, t.untyped_storage().data_ptr() + t.storage_offset() * t.element_size(), tuple(t.shape), t.dtype, t.stride())
            if t.numel() and key in seen:
                continue
            seen.add(key)
            yield name, t
        return
    for name, t in weights:
        if not name.endswith(SKIPPED_SUFFIXES):
            yield name, t


def wire_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    return dtype if dtype is not None else t.dtype


def tensor_nbytes(t: torch.Tensor, dtype: torch.dtype | None = None) -> int:
    return t.numel() * wire_dtype(t, dtype).itemsize


def iter_buckets(named: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int,
                 dtype: torch.dtype | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive groups of at most `bucket_bytes` (as sent, after casting to `dtype`); a tensor larger
    than that travels alone. Holds references only: no copies."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, t in named:
        n = tensor_nbytes(t, dtype)
        if bucket and size + n > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, t))
        size += n
    if bucket:
        yield bucket


@dataclass(frozen=True, slots=True)
class BucketMetadata:
    """What every transport announces with a bucket: names, dtype names and shapes, as sent."""

    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    nbytes: int

    @classmethod
    def of(cls, bucket: list[tuple[str, torch.Tensor]], dtype: torch.dtype | None = None) -> BucketMetadata:
        for name, t in bucket:
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"{name!r} is a {type(t).__name__}, not a tensor")
            if wire_dtype(t, dtype) not in SENDABLE_DTYPES:
                raise TypeError(f"{name!r} has dtype {wire_dtype(t, dtype)}; engines take {sorted(map(dtype_name, SENDABLE_DTYPES))} "
                                "(cast with dtype=...)")
        return cls(names=[n for n, _ in bucket], dtypes=[dtype_name(wire_dtype(t, dtype)) for _, t in bucket],
                   shapes=[list(t.shape) for _, t in bucket], nbytes=sum(tensor_nbytes(t, dtype) for _, t in bucket))


def flatten_bucket(bucket: list[tuple[str, torch.Tensor]], *, dtype: torch.dtype | None, device: torch.device) -> torch.Tensor:
    """One uint8 buffer on `device` holding every tensor's bytes (cast to `dtype`, contiguous, row-major)
    back to back: the `flattened_bucket` layout `hotswap.weights.distributed_receiver` reads."""
    total = sum(tensor_nbytes(t, dtype) for _, t in bucket)
    flat = torch.empty(total, dtype=torch.uint8, device=device)
    offset = 0
    for _, t in bucket:
        dt = wire_dtype(t, dtype)
        n = t.numel() * dt.itemsize
        if n:
            dst = flat[offset : offset + n]
            if offset % dt.itemsize == 0:
                dst.view(dt).view(t.shape).copy_(t.detach())  # cast and move in one copy
            else:
                dst.copy_(t.detach().to(device=device, dtype=dt).contiguous().reshape(-1).view(torch.uint8))
        offset += n
    return flat


def first_overlap(ranges: Iterable[tuple[str, int, int]]) -> str | None:
    """What is wrong when two of the (name, start, end) byte ranges of one buffer overlap, else None. Every
    packer of a bucket gives each tensor bytes of its own: an overlap is metadata that lies (two parameters
    would load the same bytes)."""
    last_name, last_end = None, 0
    for name, start, end in sorted((r for r in ranges if r[2] > r[1]), key=lambda r: r[1]):
        if start < last_end:
            return f"{shown(name)} (from {start}) overlaps {shown(last_name)} (up to {last_end}); each tensor must have bytes of its own"
        last_name, last_end = name, max(end, last_end)
    return None

