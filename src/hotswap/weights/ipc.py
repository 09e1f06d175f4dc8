"""Tensors handed over by another process on the same host, described by plain data (never pickle).

A descriptor is a JSON-able dict: {"name", "dtype", "shape", "kind", ...}
- kind "cuda_ipc": a CUDA IPC memory handle of the producer's storage (base64 fields), plus
  "storage_offset" and "stride" in elements. The consumer maps the same GPU memory: no copy in transit.
- kind "shm": a POSIX shared-memory block name and a byte "offset"; for CPU engines and tests.
The producer must keep its tensors alive until the update call returns.
"""

from __future__ import annotations

import base64
import math
from multiprocessing import shared_memory

import torch

from hotswap.errors import HotswapError
from hotswap.weights.distributed import dtype_from_name

_B64_FIELDS = ("handle", "ref_counter_handle", "event_handle")


def _b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def cuda_ipc_descriptor(name: str, t: torch.Tensor) -> dict:
    """Producer side: describe a CUDA tensor by its storage's IPC handle."""
    if not t.is_cuda:
        raise HotswapError(f"{name!r}: cuda_ipc needs a CUDA tensor")
    storage = t.untyped_storage()
    device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = storage._share_cuda_()
    return {
        "name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "stride": list(t.stride()),
        "storage_offset": t.storage_offset(), "kind": "cuda_ipc",
        "device": device, "handle": _b64(handle), "storage_size": size, "storage_handle_offset": offset,
        "ref_counter_handle": _b64(rc_handle), "ref_counter_offset": rc_offset,
        "event_handle": _b64(ev_handle or b""), "event_sync_required": bool(ev_sync),
    }


def _open_cuda_ipc(d: dict, dtype: torch.dtype) -> torch.Tensor:
    raw = {k: base64.b64decode(d[k]) for k in _B64_FIELDS}
    storage = torch.UntypedStorage._new_shared_cuda(
        int(d["device"]), raw["handle"], int(d["storage_size"]), int(d["storage_handle_offset"]),
        raw["ref_counter_handle"], int(d["ref_counter_offset"]), raw["event_handle"] or None, bool(d["event_sync_required"]),
    )
    t = torch.empty(0, dtype=dtype, device=f"cuda:{int(d['device'])}")
    return t.set_(storage, int(d["storage_offset"]), tuple(d["shape"]), tuple(d["stride"]))


def shm_descriptors(named_tensors: list[tuple[str, torch.Tensor]]) -> tuple[shared_memory.SharedMemory, list[dict]]:
    """Producer side for CPU: copy tensors into one shared-memory block; the caller unlinks it after the update."""
    sizes = [t.numel() * t.element_size() for _, t in named_tensors]
    block = shared_memory.SharedMemory(create=True, size=max(1, sum(sizes)))
    descs, offset = [], 0
    for (name, t), n in zip(named_tensors, sizes):
        if n:
            dst = torch.frombuffer(block.buf, dtype=torch.uint8, count=n, offset=offset)
            dst.copy_(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8))
        descs.append({"name": name, "dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape), "kind": "shm",
                      "shm_name": block.name, "offset": offset})
        offset += n
    return block, descs


def _open_shm(d: dict, dtype: torch.dtype) -> torch.Tensor:
    try:
        block = shared_memory.SharedMemory(name=str(d["shm_name"]))
    except FileNotFoundError as exc:
        raise HotswapError(f"{d['name']!r}: shared-memory block {d['shm_name']!r} does not exist") from exc
    try:
        count = math.prod(d["shape"])
        nbytes = count * dtype.itemsize
        if int(d["offset"]) < 0 or int(d["offset"]) + nbytes > block.size:
            raise HotswapError(f"{d['name']!r}: offset/shape run past the end of shared-memory block {d['shm_name']!r}")
        if count == 0:
            return torch.empty(tuple(d["shape"]), dtype=dtype)
        src = torch.frombuffer(block.buf, dtype=dtype, count=count, offset=int(d["offset"]))
        return src.clone().view(tuple(d["shape"]))
    finally:
        block.close()


def resolve_named_tensors(items, device: torch.device) -> list[tuple[str, torch.Tensor]]:
    """In-process (name, tensor) pairs pass through; descriptors are opened. Raises HotswapError naming
    the first malformed entry."""
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append((str(item[0]), item[1]))
            continue
        if not isinstance(item, dict):
            raise HotswapError(f"named_tensors[{i}] is neither a (name, tensor) pair nor a handle descriptor")
        missing = [k for k in ("name", "dtype", "shape", "kind") if k not in item]
        if missing:
            raise HotswapError(f"named_tensors[{i}] lacks field(s) {missing}")
        dtype = dtype_from_name(item["dtype"])
        if dtype is None:
            raise HotswapError(f"{item['name']!r}: unknown dtype {item['dtype']!r}")
        try:
            if item["kind"] == "cuda_ipc":
                out.append((item["name"], _open_cuda_ipc(item, dtype)))
            elif item["kind"] == "shm":
                out.append((item["name"], _open_shm(item, dtype)))
            else:
                raise HotswapError(f"{item['name']!r}: unknown handle kind {item['kind']!r}; use 'cuda_ipc' or 'shm'")
        except HotswapError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise HotswapError(f"{item['name']!r}: cannot open {item['kind']} handle: {exc}") from exc
    return out
