"""Tensors handed to another process on the same host, described by plain data (never pickle).

A descriptor is a JSON-able dict: {"name", "dtype", "shape", "kind", ...}
- kind "cuda_ipc": a CUDA IPC memory handle of the producer's storage (base64 fields), plus
  "storage_offset" and "stride" in elements. The consumer maps the same GPU memory: no copy in transit.
- kind "shm": a POSIX shared-memory block name ("shm_name") and a byte "offset"; the tensor's bytes lie
  there contiguous and row-major. For CPU engines and tests. An engine opens only blocks named with its
  prefix, `shm_block_prefix(token)` for the token it hands out (`get_ipc_token`).
The producer keeps its tensors (and blocks) alive until the update call returns: the consumer copies what
it needs before it replies.

The producer side (a trainer) builds descriptors here; the engine opens them (`hotswap.weights.ipc`).
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterable
from multiprocessing import shared_memory

import torch

from hotswap.wire.dtypes import dtype_name

B64_FIELDS = ("handle", "ref_counter_handle", "event_handle")  # bytes fields of a 'cuda_ipc' descriptor, base64-encoded
CUDA_FIELDS = ("device", "handle", "storage_size", "storage_handle_offset", "ref_counter_handle", "ref_counter_offset",
               "event_handle", "event_sync_required", "storage_offset", "stride")  # what a 'cuda_ipc' descriptor adds


def b64(x: bytes) -> str:
    return base64.b64encode(x).decode()


def new_ipc_token() -> str:
    """A fresh engine IPC token (random, so each engine's shared-memory names are its own)."""
    return secrets.token_hex(8)


def shm_block_prefix(token: str) -> str:
    """The name prefix of the shared-memory blocks an engine with IPC token `token` accepts."""
    if not isinstance(token, str) or not token.isalnum():
        raise ValueError(f"invalid IPC token {token!r}: letters and digits only")
    return f"hotswap_{token}_"


def cuda_ipc_descriptor(name: str, t: torch.Tensor) -> dict:
    """Producer side: describe a CUDA tensor by its storage's IPC handle. The producer must make the
    tensor's data visible before the consumer reads it (`torch.cuda.synchronize()` or the stream it was
    written on) and keep it alive until the update call returns."""
    if not t.is_cuda:
        raise ValueError(f"{name!r}: cuda_ipc needs a CUDA tensor")
    storage = t.untyped_storage()
    device, handle, size, offset, rc_handle, rc_offset, ev_handle, ev_sync = storage._share_cuda_()
    return {
        "name": name, "dtype": dtype_name(t.dtype), "shape": list(t.shape), "stride": list(t.stride()),
        "storage_offset": t.storage_offset(), "kind": "cuda_ipc",
        "device": device, "handle": b64(handle), "storage_size": size, "storage_handle_offset": offset,
        "ref_counter_handle": b64(rc_handle), "ref_counter_offset": rc_offset,
        "event_handle": b64(ev_handle or b""), "event_sync_required": bool(ev_sync),
    }


class SharedMemoryBucket:
    """Producer side for CPU tensors: one shared-memory block holding a bucket of tensors, and their
    descriptors. Use as a context manager (or call `close()`): the block is unlinked when done. `token` is the
    consuming engine's IPC token (`get_ipc_token()`): the block is named with its prefix, as it requires.
    `dtype` casts the tensors as they are copied in."""

    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], *, token: str, dtype: torch.dtype | None = None):
        named = [(str(n), t) for n, t in named_tensors]
        dtypes = [dtype or t.dtype for _, t in named]
        sizes = [t.numel() * dt.itemsize for (_, t), dt in zip(named, dtypes)]
        self.block = shared_memory.SharedMemory(name=shm_block_prefix(token) + secrets.token_hex(8), create=True, size=max(1, sum(sizes)))
        self.descriptors: list[dict] = []
        self.nbytes = sum(sizes)
        offset = 0
        try:
            for (name, t), dt, n in zip(named, dtypes, sizes):
                if n:  # cast one tensor at a time: the extra memory is this block and at most one tensor
                    dst = torch.frombuffer(self.block.buf, dtype=torch.uint8, count=n, offset=offset)
                    dst.copy_(t.detach().to(device="cpu", dtype=dt).contiguous().reshape(-1).view(torch.uint8))
                    del dst
                self.descriptors.append({"name": name, "dtype": dtype_name(dt), "shape": list(t.shape), "kind": "shm",
                                         "shm_name": self.block.name, "offset": offset})
                offset += n
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self.block.name

    def close(self) -> None:
        block, self.block = self.block, None
        if block is None:
            return
        block.close()
        try:
            block.unlink()
        except FileNotFoundError:
            pass

    def __enter__(self) -> SharedMemoryBucket:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

