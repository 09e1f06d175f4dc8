"""Push weights over a torch.distributed group the trainer creates as rank 0 (NCCL on GPUs, gloo on CPUs).

The contract is SGLang's: the trainer hosts the TCP rendezvous, each engine joins it through
`init_weights_update_group(master_address, master_port, rank_offset, world_size, group_name, backend)`,
and for each bucket the trainer calls `update_weights_from_distributed(names, dtypes, shapes, ...)` on
every engine while it broadcasts the bucket's bytes from rank 0.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, wait
from datetime import timedelta

import torch
import torch.distributed as dist

from hotswap.trainer.client import EngineHandle, EngineResult
from hotswap.trainer.push import (
    DEFAULT_BUCKET_BYTES,
    DEFAULT_CALL_TIMEOUT_S,
    WeightPusher,
    WeightPushError,
    call_result,
    engine_failures,
    failure_reason,
    spawn,
    wait_result,
)
from hotswap.wire.buckets import BucketMetadata, flatten_bucket
from hotswap.wire.process_group import (
    destroy_custom_process_group,
    forget_reservation,
    init_custom_process_group,
    retire_process_group,
    short_error,
    tcp_init_method,
    wait_work,
)

LOAD_FORMATS = ("flattened_bucket", None)


def free_port(host: str = "") -> int:
    """A TCP port free right now (for the group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _destroy_if_created(own) -> None:
    if own.exception() is None:
        destroy_custom_process_group(own.result())


class DistributedWeightPusher(WeightPusher):
    """The trainer's rank 0 of a weights update group shared with one or more engines.

    ```
    pusher = DistributedWeightPusher([engine_a, engine_b], master_address="10.0.0.5", master_port=29600)
    pusher.connect()                                   # engines join concurrently; both sides rendezvous
    pusher.push(model.state_dict(), weight_version="step-12")
    pusher.close()                                     # destroy the group on every side
    ```

    - `ranks_per_engine`: how many ranks each engine holds in the group (its tensor-parallel size); engine
      i joins with `rank_offset = 1 + sum(ranks_per_engine[:i])`.
    - `load_format`: "flattened_bucket" (default: one broadcast per bucket) or None (one per tensor).
    - `bucket_bytes` bounds each bucket as sent (after casting to `dtype`); with flattened buckets the
      trainer's extra memory is one bucket. Keep it at or below the engines' `weight_update_bucket_bytes`.
    - `timeout_s` bounds the rendezvous and every collective (the group's timeout), and the wait for each
      engine's reply to a bucket; `call_timeout_s` bounds the other calls (sessions, destroy).
    """

    def __init__(self, engines: EngineHandle | Sequence[EngineHandle], *, master_address: str = "127.0.0.1",
                 master_port: int | None = None, group_name: str = "weight_update_group", backend: str | None = None,
                 ranks_per_engine: int | Sequence[int] = 1, bucket_bytes: int = DEFAULT_BUCKET_BYTES,
                 load_format: str | None = "flattened_bucket", dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, timeout_s: float = 600.0, flush_cache: bool = True,
                 use_sessions: bool = True, call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S):
        super().__init__(engines, bucket_bytes=bucket_bytes, dtype=dtype, flush_cache=flush_cache, use_sessions=use_sessions,
                         call_timeout_s=call_timeout_s)
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be 'flattened_bucket' or None, got {load_format!r}")
        ranks = [ranks_per_engine] * len(self.engines) if isinstance(ranks_per_engine, int) else list(ranks_per_engine)
        if len(ranks) != len(self.engines) or any(r < 1 for r in ranks):
            raise ValueError(f"ranks_per_engine must give a positive count per engine, got {ranks_per_engine!r}")
        self.rank_offsets = [1 + sum(ranks[:i]) for i in range(len(ranks))]
        self.world_size = 1 + sum(ranks)
        self.master_address = master_address
        self._fixed_port = master_port
        self.master_port = master_port
        self.group_name = group_name
        self.backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.load_format = load_format
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu"))
        self.timeout_s = float(timeout_s)
        self.pg: dist.ProcessGroup | None = None

    @property
    def connected(self) -> bool:
        return self.pg is not None

    # ---- the group ----------------------------------------------------------------------------------

    def connect(self) -> list[EngineResult]:
        """Create the group: every engine's `init_weights_update_group` runs in a thread while this process
        creates the rendezvous as rank 0 (both sides block until all ranks arrive or `timeout_s`)."""
        if self.pg is not None:
            raise RuntimeError(f"already connected to group {self.group_name!r}; close() first")
        self.master_port = self._fixed_port or free_port()
        futures = [spawn(call_result, e.init_weights_update_group, self.master_address, self.master_port, offset,
                                     self.world_size, group_name=self.group_name, backend=self.backend, timeout_s=self.timeout_s)
                   for e, offset in zip(self.engines, self.rank_offsets)]
        own = spawn(init_custom_process_group, backend=self.backend,
                                init_method=tcp_init_method(self.master_address, self.master_port), world_size=self.world_size, rank=0,
                                group_name=self.group_name, timeout=timedelta(seconds=self.timeout_s))
        # wait for everyone, but stop at the first failure: the others would only give up at the timeout
        pending = {own, *futures}
        deadline = time.monotonic() + self.timeout_s + 5.0  # the rendezvous gives up at timeout_s on every side
        while pending and time.monotonic() < deadline:
            done, pending = wait(pending, timeout=max(0.0, deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            if (own in done and own.exception() is not None) or any(f in done and not f.result() for f in futures):
                break
        if not pending and own.exception() is None and all(f.result() for f in futures):
            self.pg = own.result()
            return [f.result() for f in futures]
        own.add_done_callback(_destroy_if_created)  # a late success of our own rendezvous is undone
        if not own.done():  # given up: a retry of connect() may take the name again (as the engine side does)
            forget_reservation(self.group_name)
        results = [f.result() if f.done() else EngineResult(False, "still waiting in the rendezvous (it gives up at its timeout)")
                   for f in futures]
        for engine, r, f in zip(self.engines, results, futures):
            if r.success:
                self.call_one(engine, "destroy_weights_update_group", group_name=self.group_name)
            elif not f.done():  # undo a late join too
                f.add_done_callback(lambda f, engine=engine: f.result().success and call_result(
                    engine.destroy_weights_update_group, group_name=self.group_name))
        reasons = [engine_failures([r], [e]) for e, r, f in zip(self.engines, results, futures) if f.done() and not r.success]
        if own.done() and own.exception() is not None:
            reasons.append(f"the trainer's rendezvous failed: {short_error(own.exception())}")
        raise WeightPushError(f"init_weights_update_group failed for group {self.group_name!r} at "
                              f"{self.master_address}:{self.master_port}: {'; '.join(reasons)}", results=results, group_broken=True)

    def close(self) -> list[EngineResult]:
        """Destroy the group on every engine and here; returns the engines' replies."""
        results = []
        if self.pg is not None:
            results = self.call_all("destroy_weights_update_group", group_name=self.group_name)
            self._drop_group()
        super().close()
        return results

    def _drop_group(self) -> None:
        pg, self.pg = self.pg, None
        if pg is not None:
            try:
                destroy_custom_process_group(pg)
            except Exception:
                pass

    def _break_group(self, reason: str, results: list[EngineResult], works: list) -> WeightPushError:
        """Lockstep is lost: tear the group down everywhere (this frees engines blocked in a receive). The
        pending broadcasts die with the group in a background thread (a gloo group with work in flight
        blocks in its destructor until its timeout)."""
        if self.pg is not None:
            works.append(self.pg)  # no local reference: the last release must happen in the retiring thread
            self.pg = None
        retire_process_group(works)  # takes the group and the works over, and empties the list
        self.call_all("destroy_weights_update_group", group_name=self.group_name)
        return WeightPushError(f"{reason}; the group {self.group_name!r} was torn down, connect() again", results=results,
                               group_broken=True)

    # ---- the push -----------------------------------------------------------------------------------

    def _before_push(self) -> None:
        if self.pg is None:
            raise WeightPushError(f"not connected: call connect() before push() (group {self.group_name!r})")

    @staticmethod
    def _wait_all(works: list, deadline: float) -> str | None:
        try:
            for work in works:
                wait_work(work, max(0.001, deadline - time.monotonic()))
        except Exception as exc:
            return short_error(exc)
        return None

    def push_bucket(self, bucket: list[tuple[str, torch.Tensor]], *, weight_version: str | None = None) -> list[EngineResult]:
        """One `update_weights_from_distributed` per engine (naming its session, see `session_ids`), with this
        process broadcasting meanwhile. Usable on its own (inside a session you opened) for custom bucketing."""
        if self.pg is None:
            raise WeightPushError(f"not connected: call connect() first (group {self.group_name!r})")
        meta = BucketMetadata.of(bucket, self.dtype)
        futures = self.submit_each("update_weights_from_distributed", meta.names, meta.dtypes, meta.shapes,
                                  group_name=self.group_name, flush_cache=self.flush_cache, weight_version=weight_version,
                                  load_format=self.load_format)
        works, sent_error = [], None
        try:
            if self.load_format == "flattened_bucket":
                flat = flatten_bucket(bucket, dtype=self.dtype, device=self.device)
                works.append(dist.broadcast(flat, src=0, group=self.pg, async_op=True))
            else:
                sent = [t.detach().to(device=self.device, dtype=self.dtype or t.dtype).contiguous() for _, t in bucket]
                works.extend(dist.broadcast(t, src=0, group=self.pg, async_op=True) for t in sent)
        except Exception as exc:
            sent_error = short_error(exc)
        deadline = time.monotonic() + self.timeout_s
        results = [wait_result(f, deadline - time.monotonic(), "update_weights_from_distributed", self.timeout_s) for f in futures]
        if sent_error is None and any(r.received is False or r.timed_out for r in results):
            # an engine refused without receiving: this process's broadcast has no partner any more
            raise self._break_group(f"update_weights_from_distributed failed without receiving: {engine_failures(results, self.engines)}",
                                    results, works)
        if sent_error is None:
            sent_error = self._wait_all(works, deadline)
        if sent_error is not None:
            raise self._break_group(f"broadcasting the bucket failed: {sent_error}; engines said: {engine_failures(results, self.engines) or 'ok'}",
                                    results, works)
        if not all(results):
            raise WeightPushError(failure_reason("update_weights_from_distributed", results, self.engines), results=results)
        return results
