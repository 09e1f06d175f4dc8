"""Open CUDA IPC descriptors that share one producer storage once, not once per tensor.

`hotswap.weights.ipc.resolve_named_tensors` opens every descriptor on its own: a memory handle, an IPC
event and a shared ref-counter file per tensor, about 50 us each, which dominates an update of a few
hundred tensors. A trainer that packs a bucket into one flat buffer (or whose tensors live in one
allocation) sends descriptors with the same `handle`: here each such group opens the storage once, through
`resolve_named_tensors` itself (a uint8 view of the whole storage, waiting on the group's last event, which
the producer recorded after every earlier one), and every tensor of the group becomes a view of it after the
same checks `ipc._open_cuda_ipc` makes. Anything else goes through `resolve_named_tensors` unchanged.
"""

from __future__ import annotations

import math

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.ipc import CudaIpcMappings, cuda_ipc_storage_key, resolve_named_tensors
from hotswap.wire.dtypes import dtype_from_name


def _group_key(item) -> tuple | None:
    if isinstance(item, dict) and item.get("kind") == "cuda_ipc" and isinstance(item.get("handle"), str):
        return item.get("device"), item["handle"], item.get("storage_handle_offset"), item.get("storage_size")
    return None


def _whole_dtype(item: dict) -> torch.dtype | None:
    """The dtype the whole storage is opened as (the descriptor's own: the engine knows only float dtypes),
    when the storage is a whole number of its elements."""
    dtype = dtype_from_name(item["dtype"]) if isinstance(item.get("dtype"), str) else None
    size = item.get("storage_size")
    if dtype is None or isinstance(size, bool) or not isinstance(size, int) or size < 0 or size % dtype.itemsize:
        return None
    return dtype


def _int_list(d: dict, key: str) -> tuple[int, ...]:
    v = d.get(key)
    if not isinstance(v, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in v):
        raise HotswapError(f"{shown(d.get('name'))}: {key} must be a list of non-negative integers, got {shown(v)}")
    return tuple(v)


def _view(d: dict, storage: torch.UntypedStorage, device: torch.device, storage_size: int) -> tuple[str, torch.Tensor]:
    name = d.get("name")
    if not isinstance(name, str) or not name:
        raise HotswapError(f"descriptor name must be a non-empty string, got {shown(name)}")
    dtype = dtype_from_name(d["dtype"]) if isinstance(d.get("dtype"), str) else None
    if dtype is None:
        raise HotswapError(f"{shown(name)}: unknown dtype {shown(d.get('dtype'))}")
    shape, stride = _int_list(d, "shape"), _int_list(d, "stride")
    if len(stride) != len(shape):
        raise HotswapError(f"{shown(name)}: stride {list(stride)} does not fit shape {list(shape)}")
    offset = d.get("storage_offset")
    if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
        raise HotswapError(f"{shown(name)}: storage_offset must be a non-negative integer, got {shown(offset)}")
    if math.prod(shape):
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if (last + 1) * dtype.itemsize > storage_size:
            raise HotswapError(f"{shown(name)}: shape/stride/offset reach past the shared storage ({storage_size} bytes)")
    return name, torch.empty(0, dtype=dtype, device=device).set_(storage, offset, shape, stride)


def _geometry(d: dict) -> tuple | None:
    """A descriptor's view geometry as a hashable key, or None when malformed (then `_view` says why)."""
    try:
        g = (d["name"], d["dtype"], tuple(d["shape"]), tuple(d["stride"]), d["storage_offset"])
        hash(g)
    except (KeyError, TypeError):
        return None
    return g[1:] if isinstance(g[0], str) and g[0] else None


def resolve_grouped(items, mappings: CudaIpcMappings | None = None, *,
                    shm_prefix: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """`resolve_named_tensors` with one open per shared producer storage (same result, same errors); the
    same descriptors as the previous call resolve to its result (`CudaIpcMappings.repeat`). Shared-memory
    blocks must be named with `shm_prefix` (see `resolve_named_tensors`)."""
    if not isinstance(items, (list, tuple)):
        return resolve_named_tensors(items, mappings, shm_prefix=shm_prefix)
    if items and type(items[0]) is not dict:
        pairs = _tensor_pairs(items)
        return pairs if pairs is not None else _resolve(items, mappings, shm_prefix)
    if mappings is None or not items:
        return _resolve(items, mappings, shm_prefix)
    out = mappings.repeat(items)
    if out is None:
        out = _resolve(items, mappings, shm_prefix)
        mappings.remember(items, out)
    return out


def _tensor_pairs(items) -> list[tuple[str, torch.Tensor]] | None:
    """In-process (str, tensor) pairs, checked in bulk rather than one by one (a few hundred tensors every
    step); None when anything else is in the list, which `resolve_named_tensors` then names."""
    if set(map(type, items)) != {tuple} or set(map(len, items)) != {2}:
        return None
    names, tensors = zip(*items)
    if set(map(type, names)) != {str} or not all(issubclass(t, torch.Tensor) for t in set(map(type, tensors))):
        return None
    return items if type(items) is list else list(items)


def _resolve(items, mappings: CudaIpcMappings | None, shm_prefix: str | None) -> list[tuple[str, torch.Tensor]]:
    groups: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        key = _group_key(item)
        if key is not None:
            groups.setdefault(key, []).append(i)
    shared = {key: idx for key, idx in groups.items() if len(idx) > 1 and _whole_dtype(items[idx[-1]]) is not None}
    if not shared:
        return resolve_named_tensors(items, mappings, shm_prefix=shm_prefix)
    grouped = {i for idx in shared.values() for i in idx}
    out: list = [None] * len(items)
    rest = [i for i in range(len(items)) if i not in grouped]
    for i, pair in zip(rest, resolve_named_tensors([items[i] for i in rest], mappings, shm_prefix=shm_prefix)):
        out[i] = pair
    for idx in shared.values():
        last = items[idx[-1]]
        size = last.get("storage_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise HotswapError(f"{shown(last.get('name'))}: field 'storage_size' must be an integer, got {shown(size)}")
        itemsize = _whole_dtype(last).itemsize
        whole = dict(last, name=f"{last.get('name')} (storage)", shape=[size // itemsize], stride=[1], storage_offset=0)
        _, flat = resolve_named_tensors([whole], mappings)[0]
        storage = flat.untyped_storage()
        key = cuda_ipc_storage_key(whole) if mappings is not None else None  # opened above, so well-formed
        for i in idx:
            d = items[i]
            geometry = _geometry(d) if key is not None else None
            try:
                if geometry is None:
                    out[i] = _view(d, storage, flat.device, size)
                else:  # a view checked and built for an earlier update of the same kept storage
                    out[i] = d["name"], mappings.view(key, geometry, lambda d=d: _view(d, storage, flat.device, size)[1])
            except HotswapError:
                raise
            except (KeyError, TypeError, ValueError, RuntimeError) as exc:
                raise HotswapError(f"{shown(d.get('name'))}: cannot open cuda_ipc handle: {exc}") from exc
    return out
