"""Decode SGLang's `serialized_named_tensors` without running anything from the wire.

RL frameworks colocated with the engine (slime, miles, verl) hand tensors over as
`MultiprocessingSerializer.serialize(obj)`: a `multiprocessing.reduction.ForkingPickler` pickle, base64
text when sent over HTTP (`output_str=True`), one payload per engine TP rank; rank r reads entry r.
`obj` depends on `load_format`:
- None / "direct": a list of `(name, tensor)` pairs, where a tensor may also be SGLang's
  `LocalSerializedTensor(values=[payload per TP rank])` (verl, via `sglang.srt.weight_sync.utils`);
- "flattened_bucket": `{"flattened_tensor": tensor, "metadata": [FlattenedTensorMetadata(name, shape,
  dtype, start_idx, end_idx, numel)]}`. Since SGLang made buckets multi-dtype the flat tensor is uint8
  and the indices count bytes; before, it had the tensors' one dtype and the indices counted elements.
A tensor is pickled as a call to a torch rebuild function (`rebuild_cuda_tensor`, or SGLang's
`_rebuild_cuda_tensor_modified` that names the GPU by UUID; on CPU `rebuild_tensor` over
`rebuild_typed_storage(rebuild_storage_filename(...))`).

`restricted_pickle`'s reader, with this protocol's whitelist, makes every such call an inert
`RebuildCall` record, every class a tensor handle needs a `GlobalRef`, torch dtypes and `torch.Size` the
real (inert) objects, and SGLang's two dataclasses records of their state; it refuses every other global
by name and calls nothing named on the wire. The records are then checked into `torch_handles` handles and opened there, every handle
before the first is opened.
"""

from __future__ import annotations

import base64
import binascii
import math
from dataclasses import dataclass

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.ipc import CudaIpcMappings
from hotswap.weights.restricted_pickle import TORCH_VALUES, GlobalRef, PickleRules, Refused, is_ref, refuse_build, restricted_loads
from hotswap.weights.torch_handles import (
    MAX_TENSOR_BYTES,
    CudaTensorHandle,
    EmptyTensorHandle,
    SharedFileTensorHandle,
    TensorHandle,
    TensorHandleError,
    TensorView,
    check_view,
    is_torch_shm_name,
    open_tensor_handle,
)
from hotswap.wire.buckets import first_overlap

LOAD_FORMATS = (None, "direct", "flattened_bucket")
MAX_PAYLOAD_BYTES = 64 << 20  # handles and metadata only (~0.5 KB a tensor); the bytes stay in shared memory


class PayloadError(HotswapError):
    """A serialized_named_tensors payload is not one SGLang's frameworks send, or names something refused."""


@dataclass(frozen=True, slots=True)
class RebuildCall:
    """A rebuild function applied to its arguments, recorded instead of called."""

    func: GlobalRef
    args: tuple
    __setstate__ = refuse_build

    def __call__(self, *args: object) -> object:
        raise Refused(f"refused a call on the result of {self.func}(...): a nested reducer is never part of a payload")


@dataclass(frozen=True, slots=True)
class _Recorder:
    """What find_class gives for a rebuild function: REDUCE on it records the call."""

    func: GlobalRef
    __setstate__ = refuse_build

    def __call__(self, *args: object) -> RebuildCall:
        return RebuildCall(self.func, args)


class _StateRecord:
    """An instance of a dataclass named in the payload, as the state dict pickle gives it (NEWOBJ makes it
    without __init__, BUILD hands over the state)."""

    kind = ""
    state: dict | None = None

    def __setstate__(self, state: object) -> None:
        if self.state is not None or not isinstance(state, dict):
            raise Refused(f"malformed {self.kind} record")
        self.state = state


class _MetadataRecord(_StateRecord):
    kind = "FlattenedTensorMetadata"


class _LocalSerializedRecord(_StateRecord):
    kind = "LocalSerializedTensor"


_REDUCTIONS = "torch.multiprocessing.reductions"
REBUILD_TENSOR = GlobalRef(_REDUCTIONS, "rebuild_tensor")
REBUILD_TYPED_STORAGE = GlobalRef(_REDUCTIONS, "rebuild_typed_storage")
REBUILD_STORAGE_FILENAME = GlobalRef(_REDUCTIONS, "rebuild_storage_filename")
REBUILD_STORAGE_EMPTY = GlobalRef(_REDUCTIONS, "rebuild_storage_empty")
REBUILD_STORAGE_FD = GlobalRef(_REDUCTIONS, "rebuild_storage_fd")
CUDA_REBUILDS = frozenset({
    GlobalRef(_REDUCTIONS, "rebuild_cuda_tensor"),
    GlobalRef("sglang.srt.utils.patch_torch", "_rebuild_cuda_tensor_modified"),  # device as a GPU UUID
    GlobalRef("sglang.srt.patch_torch", "_rebuild_cuda_tensor_modified"),  # the same before SGLang's utils package
})
_REBUILDS = CUDA_REBUILDS | {REBUILD_TENSOR, REBUILD_TYPED_STORAGE, REBUILD_STORAGE_FILENAME, REBUILD_STORAGE_EMPTY,
                             REBUILD_STORAGE_FD}
TENSOR_CLASSES = frozenset({GlobalRef.of(torch.Tensor), GlobalRef.of(torch.nn.Parameter)})
UNTYPED_STORAGE = GlobalRef.of(torch.UntypedStorage)
STORAGE_CLASSES = frozenset({UNTYPED_STORAGE, GlobalRef.of(torch.storage.TypedStorage)})
_RECORDS: dict[GlobalRef, type[_StateRecord]] = {
    GlobalRef("sglang.srt.weight_sync.tensor_bucket", "FlattenedTensorMetadata"): _MetadataRecord,
    GlobalRef("sglang.srt.model_executor.model_runner", "FlattenedTensorMetadata"): _MetadataRecord,  # older SGLang
    GlobalRef("sglang.srt.model_executor.model_runner", "LocalSerializedTensor"): _LocalSerializedRecord,
}
_WHY_REFUSED = {
    GlobalRef("multiprocessing.resource_sharer", "DupFd"): (
        "a CPU tensor shared with torch's file_descriptor strategy: its fd is usable only over the sender's live "
        "connection; call torch.multiprocessing.set_sharing_strategy('file_system') in the trainer, or send CUDA tensors"),
}


_RULES = PickleRules(
    source="serialized_named_tensors", unit="payload", error=PayloadError, max_bytes=MAX_PAYLOAD_BYTES,
    allowed={**{ref: _Recorder(ref) for ref in _REBUILDS}, **{ref: ref for ref in TENSOR_CLASSES | STORAGE_CLASSES},
             **_RECORDS, **TORCH_VALUES},
    why_refused=_WHY_REFUSED,
)


def unpickle(data: bytes | str, what: str) -> object:
    """One payload (bytes, or base64 text as over HTTP) unpickled with the whitelist; nothing is opened."""
    if isinstance(data, str):
        try:
            data = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise PayloadError(f"{what}: not valid base64: {exc}") from None
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise PayloadError(f"{what}: a payload must be bytes or base64 text, got {type(data).__name__}")
    try:
        return restricted_loads(data, _RULES)
    except PayloadError as exc:
        raise PayloadError(f"{what}: {exc}") from None


# ---- records -> checked handles ------------------------------------------------------------------------


def _int(value: object, what: str, field: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_TENSOR_BYTES:
        raise PayloadError(f"{what}: {field} must be an integer in [0, {MAX_TENSOR_BYTES}], got {shown(value)}")
    return value


def _ints(value: object, what: str, field: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or len(value) > 64:
        raise PayloadError(f"{what}: {field} must be a sequence of integers, got {shown(value)}")
    return tuple(_int(x, what, field) for x in value)


def _call(obj: object, funcs: frozenset[GlobalRef] | set[GlobalRef], what: str) -> RebuildCall:
    if not isinstance(obj, RebuildCall) or obj.func not in funcs:
        got = obj.func if isinstance(obj, RebuildCall) else type(obj).__name__
        raise PayloadError(f"{what}: expected a call to {' or '.join(sorted(map(str, funcs)))}, got {got}")
    return obj


def _view(dtype: object, shape: object, stride: object, offset: object, what: str) -> TensorView:
    if not isinstance(dtype, torch.dtype):
        raise PayloadError(f"{what}: dtype must be a torch dtype, got {shown(dtype)}")
    view = TensorView(dtype=dtype, shape=_ints(shape, what, "shape"), stride=_ints(stride, what, "stride"),
                      storage_offset=_int(offset, what, "storage offset"))
    if math.prod(view.shape) * dtype.itemsize > MAX_TENSOR_BYTES:
        raise PayloadError(f"{what}: shape {list(view.shape)} is larger than any tensor a handle may name")
    return view


def _checked(handle: TensorHandle, storage_bytes: int, what: str) -> TensorHandle:
    try:
        check_view(handle.view, storage_bytes, what)
    except TensorHandleError as exc:
        raise PayloadError(str(exc)) from None
    return handle


def _parse_cuda(call: RebuildCall, what: str) -> TensorHandle:
    if len(call.args) != 15:
        raise PayloadError(f"{what}: {call.func} takes 15 arguments, got {len(call.args)}")
    (tensor_cls, size, stride, tensor_offset, storage_cls, dtype, device, storage_handle, storage_size, storage_offset,
     _requires_grad, ref_counter_handle, ref_counter_offset, event_handle, event_sync_required) = call.args
    if not is_ref(tensor_cls, TENSOR_CLASSES) or not is_ref(storage_cls, STORAGE_CLASSES):
        raise PayloadError(f"{what}: a CUDA tensor handle must name torch's tensor and storage classes, got {shown(tensor_cls)}, {shown(storage_cls)}")
    view = _view(dtype, size, stride, tensor_offset, what)
    if not (isinstance(device, int) and not isinstance(device, bool) and 0 <= device < 1024) and not (
            isinstance(device, str) and 0 < len(device) <= 64 and device.isprintable()):
        raise PayloadError(f"{what}: device must be a CUDA ordinal or a GPU UUID, got {shown(device)}")
    storage_bytes = _int(storage_size, what, "storage size")
    if not view.numel:
        return EmptyTensorHandle(view=view)
    for field, value in (("storage handle", storage_handle), ("ref-counter handle", ref_counter_handle)):
        if not isinstance(value, bytes) or not value or len(value) > 4096:
            raise PayloadError(f"{what}: {field} must be non-empty bytes, got {type(value).__name__}")
    if event_handle is not None and not (isinstance(event_handle, bytes) and len(event_handle) <= 4096):
        raise PayloadError(f"{what}: event handle must be bytes or None, got {type(event_handle).__name__}")
    if not isinstance(event_sync_required, bool):
        raise PayloadError(f"{what}: event_sync_required must be a bool, got {shown(event_sync_required)}")
    handle = CudaTensorHandle(
        view=view, device=device, storage_handle=storage_handle, storage_size_bytes=storage_bytes,
        storage_offset_bytes=_int(storage_offset, what, "storage offset in its allocation"),
        ref_counter_handle=ref_counter_handle, ref_counter_offset=_int(ref_counter_offset, what, "ref-counter offset"),
        event_handle=event_handle or None, event_sync_required=event_sync_required,
    )
    return _checked(handle, storage_bytes, what)


def _ascii(value: object, what: str, field: str) -> str:
    if not isinstance(value, bytes) or not value or len(value) > 4096:
        raise PayloadError(f"{what}: {field} must be non-empty bytes, got {type(value).__name__}")
    try:
        text = value.decode("ascii")
    except UnicodeDecodeError:
        raise PayloadError(f"{what}: {field} is not ASCII") from None
    if not text.isprintable():
        raise PayloadError(f"{what}: {field} {shown(text)} has control characters")
    return text


def _parse_cpu(call: RebuildCall, what: str) -> TensorHandle:
    if len(call.args) != 3 or not isinstance(call.args[2], tuple) or len(call.args[2]) != 4:
        raise PayloadError(f"{what}: {REBUILD_TENSOR} takes (class, storage, (offset, size, stride, requires_grad))")
    tensor_cls, storage, (offset, size, stride, _requires_grad) = call.args
    if not is_ref(tensor_cls, TENSOR_CLASSES):
        raise PayloadError(f"{what}: tensor class must be torch.Tensor or a Parameter, got {shown(tensor_cls)}")
    typed = _call(storage, {REBUILD_TYPED_STORAGE}, what)
    if len(typed.args) != 2:
        raise PayloadError(f"{what}: {REBUILD_TYPED_STORAGE} takes (storage, dtype)")
    untyped, dtype = typed.args
    view = _view(dtype, size, stride, offset, what)
    if isinstance(untyped, RebuildCall) and untyped.func == REBUILD_STORAGE_FD:
        raise PayloadError(f"{what}: {_WHY_REFUSED[GlobalRef('multiprocessing.resource_sharer', 'DupFd')]}")
    storage_call = _call(untyped, {REBUILD_STORAGE_FILENAME, REBUILD_STORAGE_EMPTY}, what)
    if storage_call.func == REBUILD_STORAGE_EMPTY:
        if storage_call.args != (UNTYPED_STORAGE,):
            raise PayloadError(f"{what}: {REBUILD_STORAGE_EMPTY} takes torch's untyped storage class")
        return _checked(EmptyTensorHandle(view=view), 0, what)
    if len(storage_call.args) != 4 or storage_call.args[0] != UNTYPED_STORAGE:
        raise PayloadError(f"{what}: {REBUILD_STORAGE_FILENAME} takes (UntypedStorage, manager, name, size in bytes)")
    _, manager, name, nbytes = storage_call.args
    shm_name = _ascii(name, what, "shared-memory name")
    if not is_torch_shm_name(shm_name):
        raise PayloadError(f"{what}: {shown(shm_name)} is not a torch shared-memory object name (/torch_<pid>_<n>_<n>)")
    handle = SharedFileTensorHandle(view=view, shm_name=shm_name, manager_socket=_ascii(manager, what, "manager socket"),
                                    storage_size_bytes=_int(nbytes, what, "storage size"))
    return _checked(handle, handle.storage_size_bytes, what)


def parse_tensor(obj: object, what: str) -> TensorHandle:
    """Check that `obj` is a recorded torch rebuild of one tensor and return its handle."""
    call = _call(obj, CUDA_REBUILDS | {REBUILD_TENSOR}, what)
    return _parse_cuda(call, what) if call.func in CUDA_REBUILDS else _parse_cpu(call, what)


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise PayloadError(f"{what}: a tensor name must be a non-empty string, got {shown(value)}")
    return value


def _parse_pairs(obj: object, tp_rank: int, what: str) -> list[tuple[str, TensorHandle]]:
    if not isinstance(obj, list):
        raise PayloadError(f"{what}: expected a list of (name, tensor) pairs, got {type(obj).__name__}")
    pairs = []
    for i, item in enumerate(obj):
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise PayloadError(f"{what}[{i}]: expected a (name, tensor) pair, got {type(item).__name__}")
        name = _name(item[0], f"{what}[{i}]")
        tensor = item[1]
        if isinstance(tensor, _LocalSerializedRecord):
            values = (tensor.state or {}).get("values")
            if set(tensor.state or {}) != {"values"} or not isinstance(values, list):
                raise PayloadError(f"{shown(name)}: a LocalSerializedTensor has exactly one field, values (a list)")
            if not tp_rank < len(values):
                raise PayloadError(f"{shown(name)}: LocalSerializedTensor has {len(values)} values, none for TP rank {tp_rank}")
            tensor = unpickle(values[tp_rank], f"{shown(name)} (TP rank {tp_rank})")
        pairs.append((name, parse_tensor(tensor, repr(name))))
    return pairs


@dataclass(frozen=True, slots=True)
class _BucketEntry:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int


def _parse_metadata(record: object, flat: TensorView, i: int) -> _BucketEntry:
    what = f"bucket metadata[{i}]"
    if not isinstance(record, _MetadataRecord):
        raise PayloadError(f"{what}: expected a FlattenedTensorMetadata, got {type(record).__name__}")
    fields = {"name", "shape", "dtype", "start_idx", "end_idx", "numel"}
    if set(record.state or {}) != fields:
        raise PayloadError(f"{what}: FlattenedTensorMetadata has the fields {sorted(fields)}, got {sorted(record.state or {})}")
    s = record.state
    name = _name(s["name"], what)
    dtype = s["dtype"]
    if not isinstance(dtype, torch.dtype):
        raise PayloadError(f"{shown(name)}: dtype must be a torch dtype, got {shown(dtype)}")
    shape = _ints(s["shape"], repr(name), "shape")
    start, end, numel = (_int(s[k], repr(name), k) for k in ("start_idx", "end_idx", "numel"))
    by_bytes = flat.dtype == torch.uint8  # SGLang's multi-dtype bucket: indices count bytes
    if not by_bytes and dtype != flat.dtype:
        raise PayloadError(f"{shown(name)}: dtype {dtype} differs from the flat tensor's {flat.dtype} (only a uint8 flat tensor mixes dtypes)")
    want = math.prod(shape) * (dtype.itemsize if by_bytes else 1)
    if end - start != numel or numel != want:
        raise PayloadError(f"{shown(name)}: start_idx {start}, end_idx {end} and numel {numel} do not hold shape {list(shape)} of {dtype}")
    if end > flat.numel:
        raise PayloadError(f"{shown(name)}: end_idx {end} runs past the flat tensor ({flat.numel} elements)")
    return _BucketEntry(name=name, dtype=dtype, shape=shape, start=start, end=end)


def _parse_bucket(obj: object, what: str) -> tuple[TensorHandle, list[_BucketEntry]]:
    if not isinstance(obj, dict) or set(obj) != {"flattened_tensor", "metadata"}:
        keys = sorted(shown(k) for k in list(obj)[:8]) if isinstance(obj, dict) else type(obj).__name__
        raise PayloadError(f"{what}: a flattened_bucket payload is a dict of flattened_tensor and metadata, got {keys}")
    flat = parse_tensor(obj["flattened_tensor"], f"{what}: flattened_tensor")
    if len(flat.view.shape) != 1 or (flat.view.numel > 1 and flat.view.stride != (1,)):
        raise PayloadError(f"{what}: flattened_tensor must be 1-D and contiguous, got shape {list(flat.view.shape)}")
    if not isinstance(obj["metadata"], list):
        raise PayloadError(f"{what}: metadata must be a list, got {type(obj['metadata']).__name__}")
    entries = [_parse_metadata(m, flat.view, i) for i, m in enumerate(obj["metadata"])]
    overlap = first_overlap((e.name, e.start, e.end) for e in entries)
    if overlap is not None:
        raise PayloadError(f"{what}: bucket metadata: {overlap}")
    return flat, entries



def _unflatten(flat: torch.Tensor, entries: list[_BucketEntry]) -> list[tuple[str, torch.Tensor]]:
    out = []
    for e in entries:
        piece = flat[e.start:e.end]
        if flat.dtype == torch.uint8 and e.dtype != torch.uint8:
            if e.start % e.dtype.itemsize:  # packed after an odd-sized tensor: a view cannot reinterpret it
                piece = piece.clone()
            piece = piece.view(e.dtype)
        out.append((e.name, piece.view(e.shape)))
    return out


# ---- the entry point -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DecodedTensors:
    """What one TP rank loads: (name, tensor) pairs with HF names, and the load_format as sent (None or
    "direct" as SGLang's; a "flattened_bucket" is already unflattened and loads as None does). The tensors
    map the sender's memory: copy them before the update call returns."""

    named_tensors: list[tuple[str, torch.Tensor]]
    load_format: str | None


def decode_serialized_named_tensors(payloads: list[str | bytes], tp_rank: int, load_format: str | None,
                                    mappings: CudaIpcMappings | None = None) -> DecodedTensors:
    """SGLang's `serialized_named_tensors[tp_rank]` decoded and opened; raises PayloadError (or
    TensorHandleError when a checked handle cannot be opened here) naming what was wrong. Every handle
    is checked before the first is opened."""
    if load_format not in LOAD_FORMATS:
        raise PayloadError(f"unsupported load_format {shown(load_format)}; use one of {list(LOAD_FORMATS)}")
    if not isinstance(payloads, (list, tuple)):
        raise PayloadError(f"serialized_named_tensors must be a list (one payload per TP rank), got {type(payloads).__name__}")
    if isinstance(tp_rank, bool) or not isinstance(tp_rank, int) or not 0 <= tp_rank < len(payloads):
        raise PayloadError(f"serialized_named_tensors has {len(payloads)} payload(s), none for TP rank {shown(tp_rank)}")
    what = f"serialized_named_tensors[{tp_rank}]"
    obj = unpickle(payloads[tp_rank], what)
    if load_format == "flattened_bucket":
        flat, entries = _parse_bucket(obj, what)
        if not entries:  # a rank with no tensors this round (slime pads with an empty bucket)
            return DecodedTensors(named_tensors=[], load_format=load_format)
        return DecodedTensors(named_tensors=_unflatten(open_tensor_handle(flat, f"{what}: flattened_tensor", mappings), entries),
                              load_format=load_format)
    pairs = _parse_pairs(obj, tp_rank, what)
    return DecodedTensors(named_tensors=[(name, open_tensor_handle(h, repr(name), mappings)) for name, h in pairs],
                          load_format=load_format)
