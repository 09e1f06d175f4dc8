"""Push weights to engines on the same host by handle: CUDA IPC for GPU tensors (the engine maps the
trainer's memory, no copy in transit), shared memory for CPU tensors. Descriptors are plain JSON-able
data (`hotswap.wire.ipc`), so the same push works in process and over HTTP."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import TimeoutError as FutureTimeout

import torch

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.trainer.push import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_CALL_TIMEOUT_S,
    WeightPusher,
    WeightPushError,
    call_result,
    failure_reason,
    spawn,
)
from hotswap.wire.buckets import BucketMetadata
from hotswap.wire.ipc import SharedMemoryBucket, cuda_ipc_descriptor


class IPCWeightPusher(WeightPusher):
    """Buckets of handle descriptors through `update_weights_from_tensor`.

    GPU tensors travel as CUDA IPC handles of their own storage (or of a cast copy when `dtype` differs),
    kept alive until every engine has replied; CPU tensors are copied into one shared-memory block per
    bucket and engine IPC token (fetched with `get_ipc_token` each push: an engine opens only blocks named
    for it), unlinked after the call. Extra trainer memory is one bucket at most: packed buckets reuse one
    buffer, so engines map its handle once and keep it mapped (`CudaIpcMappings`).

    An engine call costs ~0.35 ms beside its copy (hand-offs, launch and sync, the GPU switching from this
    process's packing to the engine): a 61 GB MoE push in 512 MiB buckets is 99 calls, 47-53 % of the D2D copy rate
    on an H100, in 2 GiB buckets 33 calls, 75 % (docs/benchmarks.md). For a large model raise `bucket_bytes`, and
    the engines' `cuda_ipc_cache_bytes` (`--cuda-ipc-cache-bytes`) to at least it, or each call maps the buffer again."""

    def __init__(self, engines: EngineHandle | Sequence[EngineHandle], *, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 dtype: torch.dtype | None = None, flush_cache: bool = True, use_sessions: bool = True, pack_cuda: bool = True,
                 call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S):
        super().__init__(engines, bucket_bytes=bucket_bytes, dtype=dtype, flush_cache=flush_cache, use_sessions=use_sessions,
                         call_timeout_s=call_timeout_s)
        self.pack_cuda = pack_cuda
        self.pack_buffer: torch.Tensor | None = None  # reused by every packed bucket (grown when one is larger)
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

    def _gpu_tensors(self, gpu: list[tuple[str, torch.Tensor]]) -> list[torch.Tensor]:
        """The tensors whose handles are sent. With `pack_cuda`, a bucket of one wire dtype is copied into one
        flat buffer (extra memory: one bucket) so the engine opens a single IPC storage per bucket instead of
        one per tensor; tensors already sharing one storage, uncast, are sent as they are."""
        dtypes = {self.dtype or t.dtype for _, t in gpu}
        shared = len({t.untyped_storage().data_ptr() for _, t in gpu}) == 1 and all(self.dtype in (None, t.dtype) for _, t in gpu)
        if not (self.pack_cuda and len(gpu) > 1 and len(dtypes) == 1 and not shared):
            return [t.detach() if self.dtype in (None, t.dtype) else t.detach().to(self.dtype) for _, t in gpu]
        dtype, device, numel = dtypes.pop(), gpu[0][1].device, sum(t.numel() for _, t in gpu)
        buf = self.pack_buffer
        if buf is None or buf.dtype != dtype or buf.device != device or buf.numel() < numel:
            self.pack_buffer = buf = torch.empty(numel, dtype=dtype, device=device)
        flat = buf[:numel]  # every engine replied to the last bucket after copying it out: overwriting is safe
        views, offset = [], 0
        for _, t in gpu:
            view = flat[offset : offset + t.numel()].view(t.shape)
            view.copy_(t.detach())
            views.append(view)
            offset += t.numel()
        return views

    def push_bucket(self, bucket: list[tuple[str, torch.Tensor]], *, weight_version: str | None = None) -> list[EngineResult]:
        """Describe one bucket, have every engine load it, free the handles.

        CPU tensors go through one shared-memory block per engine IPC token, and blocks are made one token
        at a time (the engines sharing it are called in parallel, then the block is unlinked): the extra
        host memory is one bucket whatever the number of engines."""
        BucketMetadata.of(bucket, self.dtype)  # refuse dtypes no engine takes before anything is shared
        gpu = [(n, t) for n, t in bucket if t.is_cuda]
        cpu = [(n, t) for n, t in bucket if not t.is_cuda]
        keep_alive = self._gpu_tensors(gpu)
        results: list[EngineResult | None] = [None] * len(self.engines)
        try:
            descriptors: dict[str, dict] = {}
            if keep_alive:
                torch.cuda.synchronize()  # the engine reads on its own stream: make the data visible first
                descriptors.update({n: cuda_ipc_descriptor(n, t) for (n, _), t in zip(gpu, keep_alive)})
            tokens = self._tokens() if cpu else [""] * len(self.engines)
            for token in dict.fromkeys(tokens):
                group = [i for i, tk in enumerate(tokens) if tk == token]
                block = SharedMemoryBucket(cpu, token=token, dtype=self.dtype) if cpu else None
                try:
                    named = {**descriptors, **({d["name"]: d for d in block.descriptors} if block is not None else {})}
                    ordered = [named[n] for n, _ in bucket]
                    futures = [spawn(call_result, self.engines[i].update_weights_from_tensor, ordered, flush_cache=self.flush_cache,
                                     weight_version=weight_version, **self.session_kw(i)) for i in group]
                    for i, r in zip(group, self.gather("update_weights_from_tensor", futures)):
                        results[i] = r
                finally:
                    if block is not None:
                        block.close()  # a call that timed out may still read it: the engine then refuses the bucket
        finally:
            del keep_alive
        if any(r is None or r.outcome_unknown for r in results):
            self.pack_buffer = None  # an engine may still read it: the next bucket gets a buffer of its own
        if not all(results):
            raise WeightPushError(failure_reason("update_weights_from_tensor", results, self.engines), results=results)
        return results
