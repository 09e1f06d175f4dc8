"""Opening tensor descriptors another process on the same host sent (`hotswap.wire.ipc` describes them
and builds them on the producer side): shared-memory bytes are copied out, CUDA IPC handles are mapped,
and kept mapped across updates (`CudaIpcMappings`, bounded), which keeps that producer block alive meanwhile.
The engine opens only shared-memory blocks named with its prefix (`wire.ipc.shm_block_prefix` of the token it
hands out: `Engine.get_ipc_token()`, HTTP `GET /get_ipc_token`), so a descriptor cannot name another block on the host.
"""

from __future__ import annotations

import base64
import binascii
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory
from operator import itemgetter

import torch

from hotswap.errors import HotswapError, shown
from hotswap.wire.buckets import BUCKET_CALLS_REMEMBERED, first_overlap
from hotswap.wire.dtypes import dtype_from_name
from hotswap.wire.ipc import B64_FIELDS, CUDA_FIELDS

# what a kept mapping's view depends on (the event and ref-counter handles are used only when opening)
_VIEW_FIELDS = itemgetter("name", "dtype", "shape", "stride", "storage_offset", "kind", "device", "handle", "storage_size",
                          "storage_handle_offset")


def _read_shm(name: str, offset: int, nbytes: int, what: str) -> torch.Tensor:
    """Copy `nbytes` at `offset` out of an existing POSIX shared-memory block, mapped read-only.

    The block belongs to the producer: it is opened by name with `shm_open` rather than through
    `multiprocessing.shared_memory`, whose attach (before Python 3.13) registers the block with this
    process's resource tracker, which would then unlink it at our exit (or complain when the producer,
    living in this same process, unlinks it)."""
    import mmap
    import os

    import numpy as np

    try:
        import _posixshmem
    except ImportError:  # not POSIX: fall back to the stdlib class
        block = shared_memory.SharedMemory(name=name, create=False)
        try:
            if offset + nbytes > block.size:
                raise HotswapError(f"{what}: offset {offset} + {nbytes} bytes runs past the end of shared-memory block {shown(name)} ({block.size} bytes)")
            out = torch.empty(nbytes, dtype=torch.uint8)
            out.numpy()[:] = np.frombuffer(block.buf, dtype=np.uint8, count=nbytes, offset=offset)
            return out
        finally:
            block.close()
    fd = _posixshmem.shm_open("/" + name.lstrip("/"), os.O_RDONLY, mode=0o600)
    try:
        size = os.fstat(fd).st_size
        if offset + nbytes > size:
            raise HotswapError(f"{what}: offset {offset} + {nbytes} bytes runs past the end of shared-memory block {shown(name)} ({size} bytes)")
        out = torch.empty(nbytes, dtype=torch.uint8)
        if nbytes:
            with mmap.mmap(fd, size, prot=mmap.PROT_READ) as mm:
                src = np.frombuffer(mm, dtype=np.uint8, count=nbytes, offset=offset)
                out.numpy()[:] = src
                del src  # release the exported buffer before the map closes
        return out
    finally:
        os.close(fd)


def _int_field(d: dict, key: str) -> int:
    v = d[key]
    if isinstance(v, bool) or not isinstance(v, int):
        raise HotswapError(f"{shown(d['name'])}: field {shown(key)} must be an integer, got {shown(v)}")
    return v


def _shape(d: dict) -> tuple[int, ...]:
    shape = d["shape"]
    if not isinstance(shape, (list, tuple)) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in shape):
        raise HotswapError(f"{shown(d['name'])}: shape must be a list of non-negative integers, got {shown(shape)}")
    return tuple(shape)


def _open_shm(d: dict, dtype: torch.dtype, shm_prefix: str | None) -> torch.Tensor:
    if "shm_name" not in d or "offset" not in d:
        raise HotswapError(f"{shown(d['name'])}: an 'shm' descriptor needs 'shm_name' and 'offset'")
    shm_name = d["shm_name"]
    if not isinstance(shm_name, str) or not shm_name.lstrip("/") or "/" in shm_name.lstrip("/") or "\0" in shm_name:
        raise HotswapError(f"{shown(d['name'])}: invalid shared-memory block name {shown(shm_name)}")
    if shm_prefix is None or not shm_name.lstrip("/").startswith(shm_prefix):
        raise HotswapError(f"{shown(d['name'])}: shared-memory block {shown(shm_name)} was not made for this engine; blocks must be "
                           "named with the engine's prefix (hotswap.wire.ipc.SharedMemoryBucket(..., token=engine.get_ipc_token()))")
    offset = _int_field(d, "offset")
    shape = _shape(d)
    nbytes = math.prod(shape) * dtype.itemsize
    if offset < 0:
        raise HotswapError(f"{shown(d['name'])}: negative offset {offset}")
    try:
        raw = _read_shm(shm_name, offset, nbytes, shown(d["name"]))
    except FileNotFoundError as exc:
        raise HotswapError(f"{shown(d['name'])}: shared-memory block {shown(shm_name)} does not exist (freed too early?)") from exc
    except OSError as exc:
        raise HotswapError(f"{shown(d['name'])}: cannot open shared-memory block {shown(shm_name)}: {exc}") from exc
    return raw.view(dtype).view(shape)


@dataclass(slots=True)
class RememberedCall:
    """One earlier call's 'cuda_ipc' descriptors (their view fields), the views they resolved to, the kept
    storages those views map, and what the engine matched the views to (set by the caller, see
    `weights.sources.tensor.match_named`): all dropped together when one of the storages is."""

    descriptors: list[tuple]
    resolved: list[tuple[str, torch.Tensor]]
    keys: list[tuple]
    matched: object = None


class CudaIpcMappings:
    """Storages opened from CUDA IPC handles, kept open across updates (least recently used first out,
    bounded by the bytes they map).

    Opening a handle maps the producer's memory, opens its IPC event and ref-counter file; doing that and
    unmapping again on every update cost 5.5-6 ms a push on the H100 whatever its size. A trainer that
    sends the same buffers each step (its live parameters, or `IPCWeightPusher`'s reused pack buffers)
    pays it once. A cached mapping keeps the producer's block alive (torch's IPC ref counter): a
    producer that allocates fresh buffers every push (an FSDP gather, say) has up to the bound of its
    freed memory held here, which on a shared GPU is memory its trainer lacks, hence a small default. On a
    hit the producer's IPC event is not waited on again: the producer makes its data visible before
    sending (`cuda_ipc_descriptor` says so; `IPCWeightPusher` synchronizes).

    The last `MAX_CALLS` calls are remembered too (`repeat`): a push of N buckets repeats N calls a step."""

    MAX_VIEWS = 4096  # per storage; a producer sending ever new shapes only rebuilds them
    MAX_CALLS = BUCKET_CALLS_REMEMBERED  # a whole push's calls; each holds only views and descriptors

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.storages: OrderedDict[tuple, torch.UntypedStorage] = OrderedDict()
        self.sizes: dict[tuple, int] = {}
        self.views: dict[tuple, dict[tuple, torch.Tensor]] = {}  # storage key -> geometry -> checked view
        self.mapped_bytes = 0
        self.hits = 0
        self.misses = 0
        self.calls: OrderedDict[tuple, RememberedCall] = OrderedDict()  # (length, first name, last name) -> call
        self.last_call: RememberedCall | None = None  # the call the latest repeat or remember returned

    @staticmethod
    def _call_key(items: list) -> tuple | None:
        try:
            key = len(items), items[0]["name"], items[-1]["name"]
        except (KeyError, TypeError, IndexError):
            return None
        return key if isinstance(key[1], str) and isinstance(key[2], str) else None  # a malformed name: resolving says why

    def repeat(self, items: list) -> list[tuple[str, torch.Tensor]] | None:
        """A remembered call's result when `items` describe the same views of the same kept storages
        (every field but the IPC event and ref-counter handles, which a producer makes anew each time
        and which a kept mapping does not use): the same checked views, without decoding 300 handles
        again. A trainer sends such descriptors every step when it pushes the same buffers."""
        key = self._call_key(items)
        call = self.calls.get(key) if key is not None else None
        self.last_call = None
        if call is None:
            return None
        try:
            if list(map(_VIEW_FIELDS, items)) != call.descriptors:
                return None
        except (KeyError, TypeError):
            return None
        self.calls.move_to_end(key)
        self.hits += len(call.keys)
        self.last_call = call
        return call.resolved

    def remember(self, items: list, resolved: list[tuple[str, torch.Tensor]]) -> None:
        """Keep this call for `repeat` when every entry is a 'cuda_ipc' descriptor whose storage stayed
        mapped ('shm' blocks are copied out every time: their bytes may change under the same name)."""
        self.last_call = None
        key = self._call_key(items)
        if key is None:
            return
        self.calls.pop(key, None)
        if not all(type(d) is dict and d.get("kind") == "cuda_ipc" for d in items):
            return
        keys = list({cuda_ipc_storage_key(d) for d in items})
        if all(k in self.storages for k in keys):  # a snapshot: the caller may reuse its dicts and lists
            snapshot = [(*f[:2], list(f[2]), list(f[3]), *f[4:]) for f in map(_VIEW_FIELDS, items)]
            self.calls[key] = self.last_call = RememberedCall(snapshot, resolved, keys)
            while len(self.calls) > self.MAX_CALLS:
                self.calls.popitem(last=False)

    def get(self, key: tuple, open_storage: Callable[[], torch.UntypedStorage], nbytes: int) -> torch.UntypedStorage:
        storage = self.storages.get(key)
        if storage is not None:
            self.storages.move_to_end(key)
            self.hits += 1
            return storage
        self.misses += 1
        storage = open_storage()
        if nbytes <= self.max_bytes:
            self.storages[key], self.sizes[key] = storage, nbytes
            self.mapped_bytes += nbytes
            while self.mapped_bytes > self.max_bytes:
                old, _ = self.storages.popitem(last=False)
                self.mapped_bytes -= self.sizes.pop(old)
                self.views.pop(old, None)
                for k in [k for k, call in self.calls.items() if old in call.keys]:
                    if self.calls.pop(k) is self.last_call:
                        self.last_call = None
        return storage

    def view(self, key: tuple, geometry: tuple, make: Callable[[], torch.Tensor]) -> torch.Tensor:
        """The checked tensor view `make()` builds over the kept storage `key`, built once per geometry
        (dtype, shape, stride, offset): checking and building 310 views cost about 4.6 ms a call."""
        if key not in self.storages:
            return make()
        views = self.views.setdefault(key, {})
        t = views.get(geometry)
        if t is None:
            if len(views) >= self.MAX_VIEWS:
                views.clear()
            t = views[geometry] = make()
        return t


def cuda_ipc_storage_key(d: dict) -> tuple:
    """What identifies the producer storage a 'cuda_ipc' descriptor maps: (device, handle, offset, size)."""
    return (_int_field(d, "device"), base64.b64decode(d["handle"], validate=True), _int_field(d, "storage_handle_offset"),
            _int_field(d, "storage_size"))


def _open_cuda_ipc(d: dict, dtype: torch.dtype, mappings: CudaIpcMappings | None) -> torch.Tensor:
    missing = [k for k in CUDA_FIELDS if k not in d]
    if missing:
        raise HotswapError(f"{shown(d['name'])}: a 'cuda_ipc' descriptor lacks field(s) {missing}")
    if not torch.cuda.is_available():
        raise HotswapError(f"{shown(d['name'])}: cuda_ipc handles need a CUDA engine")
    try:
        raw = {k: base64.b64decode(d[k], validate=True) for k in B64_FIELDS}
    except (binascii.Error, TypeError, ValueError) as exc:
        raise HotswapError(f"{shown(d['name'])}: handle fields are not valid base64: {exc}") from exc
    shape = _shape(d)
    stride = d["stride"]
    if not isinstance(stride, (list, tuple)) or len(stride) != len(shape) or any(isinstance(x, bool) or not isinstance(x, int) or x < 0 for x in stride):
        raise HotswapError(f"{shown(d['name'])}: stride {shown(stride)} does not fit shape {list(shape)}")
    storage_offset = _int_field(d, "storage_offset")
    storage_size = _int_field(d, "storage_size")
    if storage_offset < 0:
        raise HotswapError(f"{shown(d['name'])}: negative storage_offset {storage_offset}")
    if math.prod(shape):
        last = storage_offset + sum((n - 1) * s for n, s in zip(shape, stride))
        if (last + 1) * dtype.itemsize > storage_size:
            raise HotswapError(f"{shown(d['name'])}: shape/stride/offset reach past the shared storage ({storage_size} bytes)")
    key = cuda_ipc_storage_key(d)
    device, _, handle_offset, _ = key

    def open_storage() -> torch.UntypedStorage:
        torch.cuda.init()  # opening a handle in a process whose CUDA is not initialised yet segfaults (no-op once it is)
        return torch.UntypedStorage._new_shared_cuda(
            device, raw["handle"], storage_size, handle_offset, raw["ref_counter_handle"], _int_field(d, "ref_counter_offset"),
            raw["event_handle"] or None, bool(d["event_sync_required"]),
        )

    storage = mappings.get(key, open_storage, storage_size) if mappings is not None else open_storage()

    def make_view() -> torch.Tensor:
        return torch.empty(0, dtype=dtype, device=f"cuda:{device}").set_(storage, storage_offset, shape, tuple(stride))

    return mappings.view(key, (dtype, shape, tuple(stride), storage_offset), make_view) if mappings is not None else make_view()


def resolve_named_tensors(items, mappings: CudaIpcMappings | None = None, *,
                          shm_prefix: str | None = None) -> list[tuple[str, torch.Tensor]]:
    """In-process (name, tensor) pairs pass through; descriptors are opened (shm data is copied out, CUDA
    IPC maps the producer's memory, through `mappings` when given). Only shared-memory blocks named with
    `shm_prefix` are opened (None: none are). Raises HotswapError naming the first malformed entry."""
    if not isinstance(items, (list, tuple)):
        raise HotswapError("named_tensors must be a list of (name, tensor) pairs or handle descriptors")
    out = []
    shm_ranges: dict[str, list[tuple[str, int, int]]] = {}  # block -> (name, start, end) of each tensor read from it
    for i, item in enumerate(items):
        if isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[1], torch.Tensor):
            out.append((str(item[0]), item[1]))
            continue
        if not isinstance(item, dict):
            raise HotswapError(f"named_tensors[{i}] is neither a (name, tensor) pair nor a handle descriptor")
        missing = [k for k in ("name", "dtype", "shape", "kind") if k not in item]
        if missing:
            raise HotswapError(f"named_tensors[{i}] lacks field(s) {missing}")
        if not isinstance(item["name"], str) or not item["name"]:
            raise HotswapError(f"named_tensors[{i}]: name must be a non-empty string, got {shown(item['name'])}")
        dtype = dtype_from_name(item["dtype"]) if isinstance(item["dtype"], str) else None
        if dtype is None:
            raise HotswapError(f"{shown(item['name'])}: unknown dtype {shown(item['dtype'])}")
        try:
            if item["kind"] == "cuda_ipc":
                out.append((item["name"], _open_cuda_ipc(item, dtype, mappings)))
            elif item["kind"] == "shm":
                t = _open_shm(item, dtype, shm_prefix)
                shm_ranges.setdefault(item["shm_name"], []).append((item["name"], item["offset"], item["offset"] + t.numel() * t.element_size()))
                out.append((item["name"], t))
            else:
                raise HotswapError(f"{shown(item['name'])}: unknown handle kind {shown(item['kind'])}; use 'cuda_ipc' or 'shm'")
        except HotswapError:
            raise
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as exc:
            raise HotswapError(f"{shown(item['name'])}: cannot open {item['kind']} handle: {exc}") from exc
    for block, ranges in shm_ranges.items():
        overlap = first_overlap(ranges)
        if overlap is not None:
            raise HotswapError(f"shared-memory block {shown(block)}: {overlap}")
    return out
