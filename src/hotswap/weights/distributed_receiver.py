"""The engine's side of a trainer broadcast: per-tensor broadcasts, or one flattened byte bucket per call
(SGLang's `flattened_bucket`: every tensor's bytes concatenated in the announced order, each tensor
contiguous and row-major). The trainer's side is `hotswap.trainer.DistributedWeightPusher`; both use
`bucket_layout` so they agree on the bytes."""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.distributed import WeightsGroup
from hotswap.wire.dtypes import dtype_name, receivable_dtype

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


def plan_receive(names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None, *, max_bytes: int,
                 max_numel: int) -> list[BucketMeta]:
    """Check the announced metadata can be received at all (the only refusal made before receiving): known
    dtypes, and scratch bounded by `max_bytes` for a bucket, or for one tensor alone by the larger of that and
    `max_numel` elements (the model's largest parameter: nothing larger can be loaded)."""
    if load_format not in LOAD_FORMATS:
        raise HotswapError(f"unsupported load_format {shown(load_format)}; use None (one broadcast per tensor) or 'flattened_bucket'")
    if not all(isinstance(x, (list, tuple)) for x in (names, dtypes, shapes)):
        raise HotswapError("names, dtypes and shapes must be lists")
    if not (len(names) == len(dtypes) == len(shapes)):
        raise HotswapError(f"names, dtypes and shapes differ in length ({len(names)}, {len(dtypes)}, {len(shapes)})")
    metas = []
    for name, dt, shape in zip(names, dtypes, shapes):
        dtype = receivable_dtype(dtype_name(dt) if isinstance(dt, torch.dtype) else dt)
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
    if total > max_bytes and math.prod(metas[0].shape) > max_numel:
        raise HotswapError(f"tensor {shown(metas[0].name)} of shape {shown(list(metas[0].shape))} ({total} bytes) is larger than the configured limit of "
                           f"{max_bytes} bytes (weight_update_bucket_bytes) and than any parameter of the model ({max_numel} elements)")
    return metas


class ShortBroadcast(HotswapError):
    """The trainer broadcast fewer bytes than its request announced; lockstep held, the bucket is refused."""


CANARY_BYTES = 16  # random bytes planted at the end of each receiving buffer


def _tails(buffers: list[tuple[str, torch.Tensor]]) -> list[tuple[str, torch.Tensor]]:
    return [(name, b.view(-1).view(torch.uint8)[-CANARY_BYTES:]) for name, b in buffers if b.numel()]


def _plant(buffers: list[tuple[str, torch.Tensor]], canary: torch.Tensor) -> None:
    """Write the canary over each receiving buffer's last bytes (see `_check_planted`)."""
    for _, tail in _tails(buffers):
        tail.copy_(canary[: tail.numel()], non_blocking=True)


def _check_planted(buffers: list[tuple[str, torch.Tensor]], canary: torch.Tensor) -> None:
    """Refuse a buffer whose last bytes are still the canary: gloo accepts a broadcast shorter than the
    receiving buffer and leaves the rest as it was, so a trainer that sends less than it announced would
    otherwise have uninitialized memory loaded (the canary is random: a tensor of 16 bytes or more ends so by
    chance with odds of 2**-128)."""
    tails = _tails(buffers)
    if not tails:
        return
    same = (torch.cat([t for _, t in tails]) == torch.cat([canary[: t.numel()] for _, t in tails])).split([t.numel() for _, t in tails])
    untouched = torch.stack([x.all() for x in same]).tolist()  # one device sync for the whole bucket
    short = [name for (name, _), bad in zip(tails, untouched) if bad]
    if short:
        more = f" and {len(short) - 3} more" if len(short) > 3 else ""
        raise ShortBroadcast(f"the trainer broadcast fewer bytes than announced for {short[:3]}{more}; check the dtypes and shapes it sends")


def receive_bucket(group: WeightsGroup, metas: list[BucketMeta], load_format: str | None) -> list[torch.Tensor]:
    """Receive every tensor the request announced into fresh scratch buffers on the group's device
    (bounded by the bucket limit), in the announced order. An empty request announces no broadcast in
    either format (SGLang's receiver broadcasts nothing for it), so none is waited for. Raises
    ShortBroadcast, once every broadcast completed, when the trainer sent less than it announced."""
    if not metas:
        return []
    device = group.device
    canary = torch.frombuffer(bytearray(secrets.token_bytes(CANARY_BYTES)), dtype=torch.uint8).to(device)
    if load_format == "flattened_bucket":
        offsets, total = bucket_layout(metas)
        flat = torch.empty(total, dtype=torch.uint8, device=device)
        _plant([("the flattened bucket", flat)], canary)
        group.broadcast_from_trainer(flat)
        _check_planted([("the flattened bucket", flat)], canary)
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
        _plant([(m.name, t)], canary)
        group.broadcast_from_trainer(t)
        out.append(t)
    _check_planted([(m.name, t) for m, t in zip(metas, out)], canary)
    return out
