"""The engine's side of a trainer broadcast: per-tensor broadcasts, or one flattened byte bucket per call
(SGLang's `flattened_bucket`: every tensor's bytes concatenated in the announced order, each tensor
contiguous and row-major). The trainer's side is `hotswap.trainer.DistributedWeightPusher`; both use
`bucket_layout` so they agree on the bytes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.distributed import WeightsGroup
from hotswap.wire.dtypes import dtype_from_name

LOAD_FORMATS = (None, "flattened_bucket")


@dataclass(frozen=True, slots=True)
class BucketMeta:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def bucket_layout(metas: list[BucketMeta]) -> tuple[list[int], int]:
    """Byte offset of each tensor in a flattened bucket, and the bucket's size."""
    offsets, total = [], 0
    for m in metas:
        offsets.append(total)
        total += m.nbytes
    return offsets, total


def plan_receive(names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None, *, max_bytes: int) -> list[BucketMeta]:
    """Check the announced metadata can be received at all (the only refusal made before receiving)."""
    if load_format not in LOAD_FORMATS:
        raise HotswapError(f"unsupported load_format {shown(load_format)}; use None (one broadcast per tensor) or 'flattened_bucket'")
    if not all(isinstance(x, (list, tuple)) for x in (names, dtypes, shapes)):
        raise HotswapError("names, dtypes and shapes must be lists")
    if not (len(names) == len(dtypes) == len(shapes)):
        raise HotswapError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    metas = []
    for name, dt, shape in zip(names, dtypes, shapes):
        dtype = dtype_from_name(dt) if not isinstance(dt, torch.dtype) else dt
        if dtype is None:
            raise HotswapError(f"unknown dtype {shown(dt)} for {shown(name)}")
        if not isinstance(shape, (list, tuple)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise HotswapError(f"invalid shape {shown(shape)} for {shown(name)}")
        metas.append(BucketMeta(str(name), dtype, tuple(shape)))
    total = bucket_layout(metas)[1]
    if total > max_bytes and len(metas) > 1:
        # one tensor alone is always taken (an 8B model's embedding is 1.24 GB): the trainer cannot split it,
        # so the bound on scratch is then the largest parameter, which the engine already holds once
        raise HotswapError(f"bucket of {len(metas)} tensors, {total} bytes, exceeds the configured limit of {max_bytes} bytes "
                           "(weight_update_bucket_bytes); send fewer tensors per bucket")
    return metas


def receive_bucket(group: WeightsGroup, metas: list[BucketMeta], load_format: str | None) -> list[torch.Tensor]:
    """Receive every tensor the request announced into fresh scratch buffers on the group's device
    (bounded by the bucket limit), in the announced order."""
    device = group.device
    if load_format == "flattened_bucket":
        offsets, total = bucket_layout(metas)
        flat = torch.empty(total, dtype=torch.uint8, device=device)
        group.broadcast_from_trainer(flat)
        out = []
        for m, offset in zip(metas, offsets):
            chunk = flat[offset : offset + m.nbytes]
            if offset % m.dtype.itemsize:
                chunk = chunk.clone()  # view(dtype) needs an aligned start
            out.append(chunk.view(m.dtype).view(m.shape))
        return out
    out = []
    for m in metas:
        t = torch.empty(m.shape, dtype=m.dtype, device=device)
        group.broadcast_from_trainer(t)
        out.append(t)
    return out
