"""Push weights to engines on the same host by handle: CUDA IPC for GPU tensors (the engine maps the
trainer's memory, no copy in transit), shared memory for CPU tensors. Descriptors are plain JSON-able
data (`hotswap.wire.ipc`), so the same push works in process and over HTTP."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from functools import partial

import torch

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.trainer.push import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_CALL_TIMEOUT_S,
    WeightPusher,
    WeightPushError,
    call_result,
    failure_reason,
    new_stats,
    spawn,
)
from hotswap.wire.buckets import BucketMetadata, iter_buckets
from hotswap.wire.ipc import SharedMemoryBucket, cuda_ipc_descriptor

Bucket = list[tuple[str, torch.Tensor]]
Landed = Callable[[Bucket, list[EngineResult]], None]


@dataclass(slots=True)
class BucketCall:
    """One bucket's `update_weights_from_tensor` to the engines sharing an IPC token (every engine, for a
    bucket of GPU tensors only), sent and not yet answered by all of them. What it reads lives until then:
    `keep_alive` (the tensors its CUDA IPC handles name, views of pack buffer `slot` among them) and `block`."""

    bucket: Bucket
    results: list[EngineResult]  # the bucket's, one per engine, shared by its calls: each fills its engines' entries
    group: list[int]  # the engines it called
    futures: list[Future]
    keep_alive: list[torch.Tensor]
    block: SharedMemoryBucket | None
    slot: int | None  # the pack buffer it reads, if any
    last: bool  # the bucket's last call: its results are whole once this one is answered


class IPCWeightPusher(WeightPusher):
    """Buckets of handle descriptors through `update_weights_from_tensor`.

    GPU tensors travel as CUDA IPC handles of their own storage (or of a cast copy when `dtype` differs),
    kept alive until every engine has replied; CPU tensors are copied into one shared-memory block per
    bucket and engine IPC token (fetched with `get_ipc_token` each push: an engine opens only blocks named
    for it), unlinked after the call. A bucket of several GPU tensors is packed into one of `calls_in_flight`
    reused buffers (bucket k into buffer k % calls_in_flight), so engines map each handle once and keep it
    mapped (`CudaIpcMappings`).

    Pipelining: up to `calls_in_flight` calls are outstanding (1: each bucket waits for every reply before the
    next is packed), so the next bucket is packed and sent while the engines still load the last. An engine's
    scheduler thread runs them one at a time in the order they arrive, not always the buckets' order (which
    matters only to a name sent twice in one push). Replies are taken in bucket order. A pack buffer is reused,
    and a block unlinked, only once every engine reading it replied or timed out (a buffer then is dropped, not
    reused; a block is unlinked all the same: an engine opening it late finds none), so the extra trainer
    memory is `calls_in_flight` buckets, and the tensors taken from `weights` must stay unchanged until the
    push returns. On the first failed call nothing more is sent, the calls in flight are waited for (within
    one `call_timeout_s`) and the push fails: with sessions every engine rolls back, and a call landing after
    the abort names an ended session and is refused; without (`use_sessions=False`) every bucket that landed
    stays applied, those already in flight after the failed one (at most `calls_in_flight - 1`) included.

    Figures (H100, the 61 GB MoE push, the trainer's tensors sharing one storage so sent unpacked, no sessions;
    docs/benchmarks.md): an engine call costs ~0.45 ms beside its copy, and an engine takes the next call while the
    last one's copy runs (its reply waits for the copy: scheduler/copy_replies.py), so calls in flight overlap that
    fixed work with the bytes. Through a queue, 512 MiB buckets (99 calls) took 193 / 102 / 74 ms with 1 / 2 / 3 in
    flight (21 / 40 / 55 % of the D2D copy rate); 2 GiB buckets (33 calls) 101 / 53 / 42 ms (40 / 76 / 96 %); over
    HTTP 2 GiB buckets 116 / 65 / 49 ms (35 / 62 / 83 %). With sessions (the default) each call first saves what it
    overwrites (its reply still waits only for its copies): the same push took 1.26 s, its originals mostly in pinned
    host memory beside 61 GB of weights on an 80 GB card. For a large model raise `bucket_bytes` (the trainer's extra
    memory is `calls_in_flight` such buffers when it packs) and the engines' `cuda_ipc_cache_bytes`
    (`--cuda-ipc-cache-bytes`) to at least `calls_in_flight * bucket_bytes` (the default, 1.5 GiB, holds three 512 MiB
    buffers), or each call maps a buffer again."""

    def __init__(self, engines: EngineHandle | Sequence[EngineHandle], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, flush_cache: bool = True, use_sessions: bool = True, pack_cuda: bool = True,
                 call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S, calls_in_flight: int = 3):
        super().__init__(engines, bucket_bytes=bucket_bytes, dtype=dtype, flush_cache=flush_cache, use_sessions=use_sessions,
                         call_timeout_s=call_timeout_s)
        if calls_in_flight < 1:
            raise ValueError(f"calls_in_flight must be at least 1, got {calls_in_flight}")
        self.pack_cuda = pack_cuda
        self.calls_in_flight = calls_in_flight
        # bucket k packs into buffer k % calls_in_flight (grown when a bucket is larger): its last reader replied by then
        self.pack_buffers: list[torch.Tensor | None] = [None] * calls_in_flight
        self.ipc_tokens: list[str] | None = None  # each engine's IPC token, fetched once a push when a bucket holds CPU tensors

    def _before_push(self) -> None:
        self.ipc_tokens = None  # an engine restarted since the last push has a new token

    def _tokens(self) -> list[str]:
        if self.ipc_tokens is None:
            tokens = []
            for engine, future in zip(self.engines, [spawn(engine.get_ipc_token) for engine in self.engines]):
                try:
                    tokens.append(str(future.result(timeout=self.call_timeout_s)))
                except Exception as exc:
                    what = f"no reply within {self.call_timeout_s:g} s" if isinstance(exc, FutureTimeout) else f"{type(exc).__name__}: {exc}"
                    raise WeightPushError(f"cannot get the IPC token of {engine!r} for shared-memory buckets: {what}") from exc
            self.ipc_tokens = tokens
        return self.ipc_tokens

    def _gpu_tensors(self, gpu: Bucket, slot: int) -> tuple[list[torch.Tensor], bool]:
        """The tensors whose handles are sent, and whether they are views of pack buffer `slot`. With `pack_cuda`,
        a bucket of one wire dtype is copied into one flat buffer (extra memory: one bucket a buffer) so the engine opens a
        single IPC storage per bucket instead of one per tensor; tensors already sharing one storage, uncast, are
        sent as they are."""
        dtypes = {self.dtype or t.dtype for _, t in gpu}
        shared = len({t.untyped_storage().data_ptr() for _, t in gpu}) == 1 and all(self.dtype in (None, t.dtype) for _, t in gpu)
        if not (self.pack_cuda and len(gpu) > 1 and len(dtypes) == 1 and not shared):
            return [t.detach() if self.dtype in (None, t.dtype) else t.detach().to(self.dtype) for _, t in gpu], False
        dtype, device, numel = dtypes.pop(), gpu[0][1].device, sum(t.numel() for _, t in gpu)
        buf = self.pack_buffers[slot]
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            self.pack_buffers[slot] = buf = torch.empty(numel, dtype=dtype, device=device)
        flat = buf[:numel]  # every engine replied to the bucket that last read it: overwriting is safe
        views, offset = [], 0
        for _, t in gpu:
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t.detach())
            views.append(view)
            offset += t.numel()
        return views, True

    def _send(self, named, weight_version: str | None, progress: Callable | None) -> dict:
        stats = new_stats()
        self._deliver(iter_buckets(named, self.bucket_bytes, self.dtype), weight_version, partial(self._landed, stats, progress))
        return stats

    def push_bucket(self, bucket: Bucket, *, weight_version: str | None = None) -> list[EngineResult]:
        """Have every engine load one bucket; their replies (raises WeightPushError when one fails)."""
        results: list[list[EngineResult]] = []
        self._deliver([bucket], weight_version, lambda _, r: results.append(r))
        return results[0]

    def _deliver(self, buckets: Iterable[Bucket], weight_version: str | None, landed: Landed) -> None:
        """Send each bucket with up to `calls_in_flight` calls outstanding; `landed(bucket, results)` once every
        engine loaded it, in order. Whatever ends the loop, the calls in flight are waited for and freed."""
        calls: deque[BucketCall] = deque()
        try:
            for index, bucket in enumerate(buckets):
                self._start(bucket, index, weight_version, calls, landed)
            self._wait(calls, 0, landed)
        finally:
            self._settle(calls)

    def _start(self, bucket: Bucket, index: int, weight_version: str | None, calls: deque[BucketCall], landed: Landed) -> None:
        """Describe bucket `index` and send it. CPU tensors go through one shared-memory block per engine IPC
        token, each made only once a call slot is free (the engines sharing it are called together), so the
        extra host memory is `calls_in_flight` buckets whatever the number of engines."""
        BucketMetadata.of(bucket, self.dtype)  # refuse dtypes no engine takes before anything is shared
        gpu = [(n, t) for n, t in bucket if t.is_cuda]
        cpu = [(n, t) for n, t in bucket if not t.is_cuda]
        tokens = self._tokens() if cpu else [""] * len(self.engines)
        results = [EngineResult(False, "not called: the push stopped at the first failed call") for _ in self.engines]
        self._wait(calls, self.calls_in_flight - 1, landed)  # the bucket that last read this pack buffer is answered
        slot = index % self.calls_in_flight
        keep_alive, packed = self._gpu_tensors(gpu, slot)
        descriptors: dict[str, dict] = {}
        if keep_alive:
            torch.cuda.synchronize()  # the engine reads on its own stream: make the data visible first
            descriptors.update({n: cuda_ipc_descriptor(n, t) for (n, _), t in zip(gpu, keep_alive)})
        groups = [[i for i, tk in enumerate(tokens) if tk == token] for token in dict.fromkeys(tokens)]
        for j, (token, group) in enumerate(zip(dict.fromkeys(tokens), groups)):
            if j:
                self._wait(calls, self.calls_in_flight - 1, landed)
            block = SharedMemoryBucket(cpu, token=token, dtype=self.dtype) if cpu else None
            named = {**descriptors, **({d["name"]: d for d in block.descriptors} if block is not None else {})}
            ordered = [named[n] for n, _ in bucket]
            futures = [spawn(call_result, self.engines[i].update_weights_from_tensor, ordered, flush_cache=self.flush_cache,
                             weight_version=weight_version, **self.session_kw(i)) for i in group]
            calls.append(BucketCall(bucket, results, group, futures, keep_alive, block, slot if packed else None, j == len(groups) - 1))

    def _wait(self, calls: deque[BucketCall], room: int, landed: Landed) -> None:
        """Take the oldest calls' replies until at most `room` are outstanding; raises on the first failed one,
        after waiting for the others."""
        while len(calls) > room:
            call = calls.popleft()
            try:
                for i, r in zip(call.group, self.gather("update_weights_from_tensor", call.futures)):
                    call.results[i] = r
            finally:
                self._free(call)
            if not all(call.results[i] for i in call.group):
                self._settle(calls)  # the bucket's other calls in flight answer in the error too
                raise WeightPushError(failure_reason("update_weights_from_tensor", call.results, self.engines), results=call.results)
            if call.last:
                landed(call.bucket, call.results)

    def _settle(self, calls: deque[BucketCall]) -> None:
        """After a failure: wait for the calls still in flight (within one `call_timeout_s`) and free what they read."""
        replies = iter(self.gather("update_weights_from_tensor", [f for call in calls for f in call.futures]))
        while calls:
            call = calls.popleft()
            for i in call.group:
                call.results[i] = next(replies)
            self._free(call)

    def _free(self, call: BucketCall) -> None:
        """Release what a call read once it was waited for. A block is unlinked even when a reply is missing (an engine
        opening it later finds none and refuses the bucket); a pack buffer is then dropped, so no later bucket overwrites it."""
        if call.block is not None:
            call.block.close()
        lost = not all(f.done() for f in call.futures) or any(call.results[i].outcome_unknown for i in call.group)
        if call.slot is not None and lost:
            self.pack_buffers[call.slot] = None
        call.keep_alive = []  # the bucket's tensors go with its last call
