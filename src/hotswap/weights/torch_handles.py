"""Tensors named by torch.multiprocessing's reduce records, opened by the engine from checked plain data.

A pickle made by `ForkingPickler` (what SGLang's `MultiprocessingSerializer` uses) describes a tensor as
a call to a rebuild function; `sglang_payloads` turns that call into one of the records below without
calling anything, and `open_tensor_handle` opens a record the way our own descriptors are opened:
- `CudaTensorHandle`: `rebuild_cuda_tensor`'s arguments (a CUDA IPC handle of the sender's allocation and
  the view on it); opened through `ipc`'s checked CUDA IPC path (bounds against the storage size).
  checkpoint-engine's buffer handle is one too (`checkpoint_engine_payloads`), mapped by its receiver.
- `SharedFileTensorHandle`: a CPU tensor shared with the `file_system` strategy: a POSIX shared-memory
  object named `/torch_<pid>_<n>_<n>` that torch's allocator laid out as a 64-byte refcount header and
  the storage's bytes. The name is confined to that pattern, the object's size must be exactly header +
  the declared storage size, and the view must lie inside the storage before torch maps it; torch's
  own open (`_new_shared_filename_cpu`) keeps the refcount right, so the sender's block is freed as usual.
- `EmptyTensorHandle`: a tensor with no bytes (`rebuild_storage_empty`, or a zero-size view).
The `file_descriptor` strategy (`rebuild_storage_fd`) is not openable: its fd number means something only
over the live connection it was sent on (SCM_RIGHTS), which an HTTP body or a list of bytes is not.
"""

from __future__ import annotations

import math
import os
import re
import stat
from dataclasses import dataclass

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.ipc import CudaIpcMappings, _open_cuda_ipc
from hotswap.wire.dtypes import dtype_name
from hotswap.wire.ipc import b64

SHM_HEADER_BYTES = 64  # torch's RefcountedMapAllocator: an aligned refcount block before the data
_TORCH_SHM_NAME = re.compile(r"/torch_\d{1,10}_\d{1,20}_\d{1,20}")
_MANAGER_DIR_PREFIX = "torch-shm-dir-"  # tempfile.mkdtemp(prefix=...) in torch's libshm manager
MAX_TENSOR_BYTES = 1 << 40  # a sanity bound on what a handle may claim; real tensors are far below it


class TensorHandleError(HotswapError):
    """A tensor handle from another process is malformed, out of bounds or cannot be opened here."""


@dataclass(frozen=True, slots=True)
class TensorView:
    """Where a tensor lies in its storage, in elements of `dtype`."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    storage_offset: int

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def end_bytes(self) -> int:
        """One past the last byte the view touches (0 for an empty view)."""
        if not self.numel:
            return 0
        last = self.storage_offset + sum((n - 1) * s for n, s in zip(self.shape, self.stride))
        return (last + 1) * self.dtype.itemsize


@dataclass(frozen=True, slots=True)
class CudaTensorHandle:
    """`rebuild_cuda_tensor`'s arguments. `device` is an ordinal, or a GPU UUID string when the sender
    ran SGLang's `monkey_patch_torch_reductions` (so ranks with other CUDA_VISIBLE_DEVICES agree)."""

    view: TensorView
    device: int | str
    storage_handle: bytes
    storage_size_bytes: int
    storage_offset_bytes: int
    ref_counter_handle: bytes
    ref_counter_offset: int
    event_handle: bytes | None
    event_sync_required: bool


@dataclass(frozen=True, slots=True)
class SharedFileTensorHandle:
    """A CPU tensor in a torch `file_system` shared-memory object."""

    view: TensorView
    shm_name: str
    manager_socket: str
    storage_size_bytes: int


@dataclass(frozen=True, slots=True)
class EmptyTensorHandle:
    """A tensor with no elements: nothing to open."""

    view: TensorView


TensorHandle = CudaTensorHandle | SharedFileTensorHandle | EmptyTensorHandle


def check_view(view: TensorView, storage_bytes: int, what: str) -> None:
    if len(view.stride) != len(view.shape):
        raise TensorHandleError(f"{what}: stride {view.stride} does not fit shape {view.shape}")
    if view.end_bytes() > storage_bytes:
        raise TensorHandleError(f"{what}: shape {list(view.shape)}, stride {list(view.stride)} and offset {view.storage_offset} "
                                f"reach past the shared storage ({storage_bytes} bytes)")


def _device_index(device: int | str, what: str) -> int:
    """The local ordinal of the sender's GPU (by UUID when given one, as SGLang's patched reductions do)."""
    if isinstance(device, int):
        if not 0 <= device < torch.cuda.device_count():
            raise TensorHandleError(f"{what}: CUDA device {device} does not exist here")
        return device
    for i in range(torch.cuda.device_count()):
        if str(torch.cuda.get_device_properties(i).uuid) == device:
            return i
    raise TensorHandleError(f"{what}: no local GPU has UUID {shown(device)}")


def _open_cuda(handle: CudaTensorHandle, what: str, mappings: CudaIpcMappings | None) -> torch.Tensor:
    if not torch.cuda.is_available():
        raise TensorHandleError(f"{what}: a CUDA IPC handle needs a CUDA engine")
    v = handle.view
    descriptor = {  # ipc's own descriptor: the same checks and the same kept mappings as our CUDA IPC path
        "name": what, "dtype": dtype_name(v.dtype), "shape": list(v.shape), "stride": list(v.stride),
        "storage_offset": v.storage_offset, "kind": "cuda_ipc", "device": _device_index(handle.device, what),
        "handle": b64(handle.storage_handle), "storage_size": handle.storage_size_bytes,
        "storage_handle_offset": handle.storage_offset_bytes, "ref_counter_handle": b64(handle.ref_counter_handle),
        "ref_counter_offset": handle.ref_counter_offset, "event_handle": b64(handle.event_handle or b""),
        "event_sync_required": handle.event_sync_required,
    }
    try:
        return _open_cuda_ipc(descriptor, v.dtype, mappings)
    except HotswapError as exc:
        raise TensorHandleError(str(exc)) from None
    except (RuntimeError, TypeError, ValueError, OverflowError) as exc:
        raise TensorHandleError(f"{what}: cannot open the CUDA IPC handle: {exc}") from None


def _shm_object_size(name: str, what: str) -> int:
    import _posixshmem

    try:
        fd = _posixshmem.shm_open(name, os.O_RDONLY, mode=0o600)
    except FileNotFoundError:
        raise TensorHandleError(f"{what}: shared-memory object {shown(name)} does not exist (freed before the update?)") from None
    except OSError as exc:
        raise TensorHandleError(f"{what}: cannot open shared-memory object {shown(name)}: {exc}") from None
    try:
        return os.fstat(fd).st_size
    finally:
        os.close(fd)


def _check_manager_socket(path: str, what: str) -> None:
    """torch's per-process shm manager socket: `<tmpdir>/torch-shm-dir-XXXX/manager.sock`, a socket."""
    parent = os.path.dirname(path)
    if (not os.path.isabs(path) or os.path.normpath(path) != path or os.path.basename(path) != "manager.sock"
            or not os.path.basename(parent).startswith(_MANAGER_DIR_PREFIX)):
        raise TensorHandleError(f"{what}: {shown(path)} is not a torch shared-memory manager socket")
    try:
        mode = os.stat(path, follow_symlinks=False).st_mode
    except OSError as exc:
        raise TensorHandleError(f"{what}: torch shared-memory manager socket {shown(path)}: {exc.strerror}") from None
    if not stat.S_ISSOCK(mode):
        raise TensorHandleError(f"{what}: {shown(path)} is not a socket")


def _open_shared_file(handle: SharedFileTensorHandle, what: str) -> torch.Tensor:
    if os.name != "posix":
        raise TensorHandleError(f"{what}: shared-memory tensors need a POSIX host")
    size = _shm_object_size(handle.shm_name, what)
    if size != SHM_HEADER_BYTES + handle.storage_size_bytes:
        raise TensorHandleError(f"{what}: shared-memory object {shown(handle.shm_name)} holds {size} bytes, not the "
                                f"{SHM_HEADER_BYTES}-byte header + {handle.storage_size_bytes} bytes the handle declares")
    _check_manager_socket(handle.manager_socket, what)
    try:
        storage = torch.UntypedStorage._new_shared_filename_cpu(handle.manager_socket.encode(), handle.shm_name.encode(),
                                                                handle.storage_size_bytes)
        storage._shared_decref()  # balances the sender's incref at pickling, as torch's own rebuild does
    except RuntimeError as exc:
        raise TensorHandleError(f"{what}: cannot map shared-memory object {shown(handle.shm_name)}: {exc}") from None
    v = handle.view
    return torch.empty(0, dtype=v.dtype).set_(storage, v.storage_offset, v.shape, v.stride)


def open_tensor_handle(handle: TensorHandle, what: str, mappings: CudaIpcMappings | None = None) -> torch.Tensor:
    """The tensor a checked handle names: CUDA IPC maps the sender's GPU memory (through `mappings` when
    given), a shared-memory object is mapped from /dev/shm; the sender keeps both alive until the update
    call returns, and the caller copies what it needs before then."""
    v = handle.view
    if isinstance(handle, EmptyTensorHandle) or not v.numel:
        return torch.empty(v.shape, dtype=v.dtype)
    if isinstance(handle, CudaTensorHandle):
        return _open_cuda(handle, what, mappings)
    return _open_shared_file(handle, what)


def is_torch_shm_name(name: str) -> bool:
    return _TORCH_SHM_NAME.fullmatch(name) is not None
