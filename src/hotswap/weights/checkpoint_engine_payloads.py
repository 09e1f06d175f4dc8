"""Decode the pickled messages of MoonshotAI's checkpoint-engine without running anything from the wire.

Its ParameterServer talks to an engine over ZMQ with `send_pyobj` (pickle). The messages are:
- the buffer handle: `(rebuild_cuda_tensor, args)` as `torch.multiprocessing.reductions.reduce_tensor`
  makes it for a 1-D uint8 CUDA tensor (the receiver, not pickle, would call the function);
- a bucket: a list of `{"name", "dtype": torch.dtype, "shape": torch.Size, "offset"}` dicts;
- `None` (release the buffer, then: done) and an exception object (the server aborts the update).

`decode` unpickles with `restricted_pickle`'s reader and this protocol's whitelist: torch dtypes,
`torch.Size` and builtin exception classes are the real objects (constructing them runs nothing of
consequence); the rebuild function and the tensor and storage classes become inert `GlobalRef` markers,
so a pickle that tries to call them fails. Every other global (`os.system`, `builtins.eval`, ...) is
refused by name. `parse_ipc_handle` and `parse_bucket` then check
the decoded shapes; the engine opens the buffer itself from the checked record.
"""

from __future__ import annotations

import builtins
import math
from dataclasses import dataclass

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.restricted_pickle import TORCH_VALUES, GlobalRef, PickleRules, is_ref, restricted_loads
from hotswap.weights.torch_handles import CudaTensorHandle, TensorView
from hotswap.wire.buckets import first_overlap


class PayloadError(HotswapError):
    """A message from the parameter server is not one the protocol allows."""


REBUILD_CUDA_TENSOR = GlobalRef("torch.multiprocessing.reductions", "rebuild_cuda_tensor")
TENSOR_CLASSES = frozenset({GlobalRef.of(torch.Tensor)})
STORAGE_CLASSES = frozenset({GlobalRef.of(torch.storage.TypedStorage), GlobalRef.of(torch.UntypedStorage)})
MAX_MESSAGE_BYTES = 64 << 20  # a bucket's metadata is ~100 bytes per tensor; nothing legitimate comes near this
_RULES = PickleRules(
    source="checkpoint-engine messages", unit="message", error=PayloadError, max_bytes=MAX_MESSAGE_BYTES,
    allowed={**{ref: ref for ref in {REBUILD_CUDA_TENSOR} | TENSOR_CLASSES | STORAGE_CLASSES}, **TORCH_VALUES,
             **{GlobalRef("builtins", name): v for name, v in vars(builtins).items() if isinstance(v, type) and issubclass(v, Exception)}},
)


def decode(data: bytes) -> object:
    """Unpickle one message with the whitelist; raises PayloadError naming what was refused."""
    return restricted_loads(data, _RULES)


# ---- the buffer handle --------------------------------------------------------------------------------


def _int(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PayloadError(f"buffer handle: {what} must be a non-negative integer, got {shown(value)}")
    return value


def _bytes(value: object, what: str) -> bytes:
    if not isinstance(value, bytes) or not value:
        raise PayloadError(f"buffer handle: {what} must be non-empty bytes, got {type(value).__name__}")
    return value


def parse_ipc_handle(msg: object) -> CudaTensorHandle:
    """Check that `msg` is reduce_tensor's form of a contiguous 1-D uint8 CUDA tensor. The device it names
    is checked but not used: the engine maps the buffer on its own device."""
    if not (isinstance(msg, tuple) and len(msg) == 2 and msg[0] == REBUILD_CUDA_TENSOR and isinstance(msg[1], tuple)):
        raise PayloadError(f"expected the buffer handle ({REBUILD_CUDA_TENSOR}, args), got {type(msg).__name__}")
    args = msg[1]
    if len(args) != 15:
        raise PayloadError(f"buffer handle: rebuild_cuda_tensor takes 15 arguments, got {len(args)}")
    (tensor_cls, size, stride, tensor_offset, storage_cls, dtype, device, storage_handle, storage_size, storage_offset,
     _requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required) = args
    if not is_ref(tensor_cls, TENSOR_CLASSES):
        raise PayloadError(f"buffer handle: tensor class must be torch.Tensor, got {shown(tensor_cls)}")
    if not is_ref(storage_cls, STORAGE_CLASSES):
        raise PayloadError(f"buffer handle: storage class must be a torch storage, got {shown(storage_cls)}")
    if dtype != torch.uint8:
        raise PayloadError(f"buffer handle: the buffer must be uint8, got {shown(dtype)}")
    if not (isinstance(size, tuple) and len(size) == 1 and stride == (1,)):
        raise PayloadError(f"buffer handle: the buffer must be 1-D and contiguous, got size {shown(size)} stride {shown(stride)}")
    device = _int(device, "device")
    if event_handle is not None and not isinstance(event_handle, bytes):
        raise PayloadError(f"buffer handle: event handle must be bytes or None, got {type(event_handle).__name__}")
    numel, offset = _int(size[0], "size"), _int(tensor_offset, "tensor offset")
    handle = CudaTensorHandle(
        view=TensorView(dtype=torch.uint8, shape=(numel,), stride=(1,), storage_offset=offset), device=device,
        storage_handle=_bytes(storage_handle, "storage handle"), storage_size_bytes=_int(storage_size, "storage size"),
        storage_offset_bytes=_int(storage_offset, "storage offset"), ref_counter_handle=_bytes(ref_counter_handle, "ref-counter handle"),
        ref_counter_offset=_int(ref_counter_offset, "ref-counter offset"), event_handle=event_handle or None,
        event_sync_required=bool(event_sync_required),
    )
    if offset + numel > handle.storage_size_bytes:
        raise PayloadError(f"buffer handle: {numel} bytes at offset {offset} run past the storage ({handle.storage_size_bytes} bytes)")
    return handle


# ---- a bucket -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BucketEntry:
    """One tensor of a bucket: its bytes lie contiguous at `offset` in the server's buffer."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_bucket(msg: object, buffer_bytes: int) -> list[BucketEntry]:
    """Check a bucket's metadata and that every tensor lies aligned inside the buffer."""
    if not isinstance(msg, list):
        raise PayloadError(f"expected a bucket (a list of tensor metadata), got {type(msg).__name__}")
    entries = []
    for i, item in enumerate(msg):
        if not isinstance(item, dict) or not {"name", "dtype", "shape", "offset"} <= item.keys():
            raise PayloadError(f"bucket item {i} must be a dict with name, dtype, shape and offset, got {shown(item)}")
        name, dtype, shape, offset = item["name"], item["dtype"], item["shape"], item["offset"]
        if not isinstance(name, str) or not name:
            raise PayloadError(f"bucket item {i}: name must be a non-empty string, got {shown(name)}")
        if not isinstance(dtype, torch.dtype):
            raise PayloadError(f"{shown(name)}: dtype must be a torch.dtype, got {shown(dtype)}")
        if not isinstance(shape, (tuple, list)) or any(isinstance(d, bool) or not isinstance(d, int) or d < 0 for d in shape):
            raise PayloadError(f"{shown(name)}: shape must be a sequence of non-negative integers, got {shown(shape)}")
        if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0 or offset % dtype.itemsize:
            raise PayloadError(f"{shown(name)}: offset must be a non-negative multiple of {dtype.itemsize}, got {shown(offset)}")
        entry = BucketEntry(name, dtype, tuple(shape), offset)
        if offset + entry.nbytes > buffer_bytes:
            raise PayloadError(f"{shown(name)}: {entry.nbytes} bytes at offset {offset} run past the {buffer_bytes}-byte buffer")
        entries.append(entry)
    overlap = first_overlap((e.name, e.offset, e.offset + e.nbytes) for e in entries)
    if overlap is not None:
        raise PayloadError(f"bucket: {overlap}")
    return entries
