"""The engine's end of checkpoint-engine's ZMQ protocol (what SGLang's `update_weights_from_ipc` speaks).

The ParameterServer binds a REQ socket per GPU (`zmq_handles`: "GPU-<uuid>" -> address) and sends, with
the engine answering each message on a REP socket:
  the handle of its uint8 double buffer -> map it; reply b"" (or an error string)
  a bucket (list of tensor metadata)    -> load those tensors from the buffer, synchronize; reply b"" or an error
  an exception                          -> the server aborts (a worker failed, maybe us): stop, no reply
  None                                  -> drop the buffer mapping; reply
  None                                  -> done; reply
The server reads each answer one step late (after filling the next bucket into the other half of its
buffer) and ignores the answer to the last bucket, so this side remembers any failure, keeps answering
until the server finishes, and reports the failure at the end; the caller rolls back. Every receive waits
at most `timeout_s`, so a server that dies leaves the engine serving, not hanging.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from hotswap.errors import HotswapError, shown
from hotswap.weights.checkpoint_engine_payloads import (
    MAX_MESSAGE_BYTES,
    BucketEntry,
    PayloadError,
    decode,
    parse_bucket,
    parse_ipc_handle,
)
from hotswap.weights.torch_handles import CudaTensorHandle

LoadBucket = Callable[[list[tuple[BucketEntry, torch.Tensor]]], None]


class ReceiveFailed(HotswapError):
    """The exchange with the parameter server failed; nothing it sent may be kept."""


def _cuda_index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def cuda_device_key(device: torch.device) -> str:
    """checkpoint-engine's name for a GPU: "GPU-" and its UUID, the same in every process whatever each
    one's CUDA_VISIBLE_DEVICES says."""
    if device.type != "cuda":
        raise HotswapError(f"update_weights_from_ipc needs a CUDA engine (checkpoint-engine hands over CUDA IPC buffers); this one runs on {device}")
    return f"GPU-{torch.cuda.get_device_properties(_cuda_index(device)).uuid}"


def open_cuda_buffer(handle: CudaTensorHandle, device: torch.device) -> torch.Tensor:
    """Map the server's buffer through torch's own rebuild path, with our classes, dtype and device: it
    caches the mapping per handle and hands the server's ref-count back when the storage dies."""
    from torch.multiprocessing.reductions import rebuild_cuda_tensor

    return rebuild_cuda_tensor(
        torch.Tensor, torch.Size([handle.view.numel]), (1,), handle.view.storage_offset, torch.UntypedStorage, torch.uint8, _cuda_index(device),
        handle.storage_handle, handle.storage_size_bytes, handle.storage_offset_bytes, False, handle.ref_counter_handle,
        handle.ref_counter_offset, handle.event_handle, handle.event_sync_required,
    )


@dataclass(frozen=True, slots=True)
class BufferSource:
    """How the engine names its device in `zmq_handles` and maps the server's buffer: CUDA IPC by default;
    CPU tests substitute an in-process stand-in."""

    device_key: Callable[[torch.device], str] = cuda_device_key
    open: Callable[[CudaTensorHandle, torch.device], torch.Tensor] = open_cuda_buffer


@dataclass(slots=True)
class ReceiveStats:
    num_buckets: int = 0
    num_tensors: int = 0
    num_bytes: int = 0


def find_address(zmq_handles: object, key: str) -> str:
    """This device's socket address in `zmq_handles`; raises naming the keys it has when there is none."""
    if not isinstance(zmq_handles, dict) or not zmq_handles:
        raise HotswapError(f"zmq_handles must be a non-empty dict of device UUID -> ZMQ address, got {zmq_handles!r:.200}")
    address = zmq_handles.get(key)
    if address is None:
        raise HotswapError(f"zmq_handles has no entry for this engine's device {key}; it has {sorted(map(str, zmq_handles))} "
                           "(is the parameter server on this host, pushing to this GPU?)")
    if not isinstance(address, str) or not address.startswith(("ipc://", "tcp://")):
        raise HotswapError(f"zmq_handles[{shown(key)}] must be an ipc:// or tcp:// address, got {address!r:.200}")
    return address


@dataclass(slots=True)
class _Channel:
    """The REP socket: every receive bounded by the timeout, every message decoded by the whitelist."""

    socket: object  # zmq.Socket
    address: str
    timeout_s: float
    again: type[Exception]  # zmq.Again

    def recv(self) -> object:
        try:
            data = self.socket.recv()
        except self.again:
            raise ReceiveFailed(f"no message from the parameter server at {self.address} within {self.timeout_s:g} s "
                                "(it died or stalled)") from None
        return decode(data)

    def reply(self, failure: str | None) -> None:
        try:
            self.socket.send(b"" if failure is None else failure.encode())
        except self.again:
            raise ReceiveFailed(f"could not answer the parameter server at {self.address} within {self.timeout_s:g} s") from None


def _abort_reason(exc: Exception) -> str:
    """The server's abort as the failure names it, cut short: its args come from the wire (str() of a list
    sharing one sublist 40 levels deep is 2**40 items long, from a 300-byte pickle)."""
    args = exc.args
    text = args[0] if len(args) == 1 and isinstance(args[0], str) else shown(args)
    return f"{type(exc).__name__}: {text if len(text) <= 500 else text[:500] + '...'}"


def _load(msg: object, buffer: torch.Tensor, load_bucket: LoadBucket, stats: ReceiveStats) -> str | None:
    """Load one bucket; the error to send back, or None. The views die on return: only `buffer` maps the server's memory."""
    where = f"bucket {stats.num_buckets + 1}"
    try:
        entries = parse_bucket(msg, buffer.numel())
        load_bucket([(e, buffer[e.offset : e.offset + e.nbytes].view(e.dtype).view(e.shape)) for e in entries])
        if buffer.is_cuda:
            torch.cuda.synchronize(buffer.device)  # the server refills this half of its buffer once we answer
    except HotswapError as exc:
        return f"{where}: {exc}"
    except Exception as exc:  # a device error mid-copy: report it to the server too
        return f"{where}: {type(exc).__name__}: {exc}"
    stats.num_buckets += 1
    stats.num_tensors += len(entries)
    stats.num_bytes += sum(e.nbytes for e in entries)
    return None


def _connect(address: str, timeout_s: float):
    """A REP socket connected to the server's address, in a context of its own (the caller terminates both)."""
    import zmq

    ctx = zmq.Context()
    sock = ctx.socket(zmq.REP)
    for opt, value in ((zmq.RCVTIMEO, int(timeout_s * 1000)), (zmq.SNDTIMEO, int(timeout_s * 1000)), (zmq.LINGER, 0),
                       (zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)):
        sock.setsockopt(opt, value)
    sock.connect(address)
    return ctx, _Channel(sock, address, timeout_s, zmq.Again)


def _exchange(channel: _Channel, open_buffer: Callable[[object], torch.Tensor] | None, load_bucket: LoadBucket | None,
              stats: ReceiveStats, failure: str | None) -> str | None:
    """Follow the server's messages to the end; returns the first failure (None when all went well).
    `open_buffer` None: refuse the handle with `failure` (then nothing is loaded)."""
    buffer = None
    try:
        try:
            msg = channel.recv()
            if failure is None:
                buffer = open_buffer(msg)
        except PayloadError as exc:
            failure = failure or f"the buffer handle: {exc}"
        except ReceiveFailed:
            raise
        except Exception as exc:  # torch could not map it
            failure = f"cannot map the parameter server's buffer: {type(exc).__name__}: {exc}"
        channel.reply(failure)
        released = False
        while True:
            try:
                msg = channel.recv()
            except PayloadError as exc:
                failure = failure or f"bucket {stats.num_buckets + 1}: {exc}"
                channel.reply(failure)
                continue
            except ReceiveFailed as exc:
                if released:  # checkpoint-engine < 0.4.0 ends a push with one None, >= 0.4.0 with two
                    raise ReceiveFailed(f"{exc}; it released its buffer (None) but did not send the second None that "
                                        "ends a push in checkpoint-engine >= 0.4.0: a parameter server older than 0.4.0 "
                                        "ends with one None, which this engine does not speak") from None
                raise
            if isinstance(msg, Exception):
                return failure or f"the parameter server aborted the update: {_abort_reason(msg)}"
            if msg is None:
                buffer = None  # unmap before answering: the server frees its buffer next
                channel.reply(None)
                if released:
                    return failure
                released = True
                continue
            if released:
                failure = failure or "the parameter server sent a bucket after releasing its buffer"
            if failure is None:
                failure = _load(msg, buffer, load_bucket, stats)
            channel.reply(failure)
    finally:
        buffer = None  # a raised error's traceback keeps this frame: it must not keep the mapping too


def receive_buckets(address: str, *, device: torch.device, source: BufferSource, timeout_s: float, load_bucket: LoadBucket) -> ReceiveStats:
    """Run the exchange with the server at `address`, handing each bucket's (entry, view) pairs to
    `load_bucket` (which raises to refuse it). Raises ReceiveFailed, once the server is done or gone, if
    anything failed."""
    ctx, channel = _connect(address, timeout_s)
    stats = ReceiveStats()
    try:
        failure = _exchange(channel, lambda msg: source.open(parse_ipc_handle(msg), device), load_bucket, stats, None)
    finally:
        channel.socket.close(linger=0)
        ctx.term()
    if failure is not None:
        raise ReceiveFailed(failure)
    return stats


def refuse_exchange(address: str, message: str, *, timeout_s: float) -> None:
    """Answer the server's buffer handle with `message` and follow the exchange to its end, so the server
    aborts instead of waiting for a peer that never comes. A server already gone is no error here."""
    ctx, channel = _connect(address, timeout_s)
    try:
        _exchange(channel, None, None, ReceiveStats(), message)
    except ReceiveFailed:
        pass
    finally:
        channel.socket.close(linger=0)
        ctx.term()
