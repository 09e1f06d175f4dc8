"""Rank 0's side of a tensor-parallel engine: the worker processes, and every message to them.

Rank 0 schedules; each worker (`runner/tp_worker.py`) runs what rank 0 sends. Rank 0's ModelRunner sends
each batch before running it; its WeightUpdater and MemoryManager send each weight op and then `agree`
(every rank reports how its part went) before they commit or roll back. A failed collective leaves the
ranks out of step, so it marks the engine broken: every later batch or op fails at once, naming the cause.
"""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from typing import TypeVar

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.distributed_c10d import _world

from hotswap.config import EngineConfig
from hotswap.errors import HotswapError
from hotswap.models.parallel import TPInfo
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.tp_group import TPGroups, worker_device
from hotswap.runner.tp_protocol import Op, exchange, send_command, send_step
from hotswap.runner.tp_step_codec import StepMode, StepReplica
from hotswap.runner.tp_worker import worker_main
from hotswap.weights.distributed import WeightsGroup
from hotswap.weights.mapping import WeightMap, WeightSlot
from hotswap.wire.buckets import BucketMetadata, flatten_bucket, iter_buckets
from hotswap.wire.process_group import short_error

log = logging.getLogger(__name__)

T = TypeVar("T")

# NVLink multicast can take a shared host's GPUs out of service: off in NCCL, PyTorch and NVSHMEM
_MULTICAST_OFF = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


@dataclass(kw_only=True, slots=True)
class TPPeers:
    groups: TPGroups
    procs: list  # the worker of rank r at procs[r - 1] (multiprocessing processes)
    device: torch.device  # rank 0's
    timeout_s: float  # the bound of a startup or weight op (tp_timeout_s)
    step_timeout_s: float  # the bound of a forward step, and of each device-group transfer once started (SGLang's watchdog_timeout)
    relay_group: WeightsGroup = field(init=False)  # the device group as a broadcast channel from rank 0 (weight relays)
    ready: bool = False  # every worker built its runner and serves commands
    broken: str | None = None  # why nothing may run any more
    joins: int = 0  # weights update groups joined so far (store keys)
    replica: StepReplica = field(default_factory=StepReplica)  # the last batch the workers hold (decode steps go as deltas)

    def __post_init__(self) -> None:
        self.relay_group = WeightsGroup("tensor-parallel relay", self.groups.device, 0, self.groups.size, self.groups.backend, self.device,
                                        op_timeout_s=self.step_timeout_s)

    # ---- startup and shutdown ----------------------------------------------------------------------

    @classmethod
    def launch(cls, config: EngineConfig, device: torch.device) -> TPPeers:
        """Spawn one worker per rank 1..N-1 and form the groups with them; each worker then builds its
        ModelRunner (loading its slices) while rank 0 builds its own. Call `wait_ready` after that."""
        size = config.tensor_parallel_size
        backend = "nccl" if device.type == "cuda" else "gloo"
        for var, off in _MULTICAST_OFF.items():  # before NCCL starts here; the workers inherit them
            os.environ.setdefault(var, off)
        timeout = timedelta(seconds=config.tp_timeout_s)
        store = dist.TCPStore("127.0.0.1", 0, size, True, timeout=timeout, wait_for_workers=False)
        prefix = f"hotswap-tp-{uuid.uuid4().hex[:12]}"
        ctx = mp.get_context("spawn")  # CUDA cannot be forked
        procs = []
        for rank in range(1, size):
            spec = {"rank": rank, "size": size, "port": store.port, "prefix": prefix, "backend": backend,
                    "device": str(worker_device(device, rank, config.gpu_id_step)), "config": asdict(config)}
            procs.append(ctx.Process(target=worker_main, args=(json.dumps(spec),), name=f"hotswap-tp-rank{rank}", daemon=True))
        for p in procs:
            p.start()
        try:
            _wait_for(store, procs, "hello", config.tp_timeout_s)
            groups = TPGroups.create(store=store, rank=0, size=size, prefix=prefix, backend=backend, timeout_s=config.tp_timeout_s)
        except BaseException:
            _stop(procs, 0.0)
            raise
        return cls(groups=groups, procs=procs, device=device, timeout_s=config.tp_timeout_s, step_timeout_s=config.step_timeout_s)

    def wait_ready(self) -> None:
        """Every worker built its model runner (raises naming the worker's error otherwise); from now on steps are
        bounded by `step_timeout_s`."""
        _wait_for(self.groups.store, self.procs, "ready", self.timeout_s)
        self.groups.bound_steps(self.step_timeout_s)
        self.ready = True

    def worker_error(self) -> str | None:
        """The first startup error a worker reported, if any (after a failed start)."""
        for rank in range(1, self.size):
            if self.groups.store.check([f"error/{rank}"]):
                return f"tensor-parallel worker rank {rank} failed to start: {self.groups.store.get(f'error/{rank}').decode()}"
        return None

    def shutdown(self) -> None:
        """Tell the workers to exit and wait for them; kill any that does not (or that a broken engine left
        inside a collective), then leave the groups."""
        told = False
        if self.broken is None and self.ready:
            try:
                send_command(self.groups.control, Op.SHUTDOWN, None, min(self.timeout_s, 10.0))
                told = True
            except Exception:
                pass
        self.broken = self.broken or "the tensor-parallel engine is shut down"
        _stop(self.procs, 10.0 if told else 0.0)
        for pg in (self.groups.device, self.groups.control):
            if _world.pg_map.get(pg) is not None:
                dist.destroy_process_group(pg)

    @property
    def size(self) -> int:
        return self.groups.size

    @property
    def info(self) -> TPInfo:
        return self.groups.info

    # ---- failures ----------------------------------------------------------------------------------

    def _fail(self, exc: BaseException, during: str, step: bool) -> HotswapError:
        """A collective with the workers failed `during` an op: the ranks may be out of step, so nothing may run
        any more. The reason names a worker that exited, else the bound a hung worker ran past."""
        if self.broken is None:
            for p in self.procs:
                p.join(timeout=0.5)  # a worker that died is still exiting when its sockets close
            self._mark_broken(self._exited() or self._unanswered(exc, during, step))
        return HotswapError(self.broken)

    def _unanswered(self, exc: BaseException, during: str, step: bool) -> str:
        bound, knob = (self.step_timeout_s, "step_timeout_s, SGLang's watchdog_timeout") if step else (self.timeout_s, "tp_timeout_s")
        if not _timed_out(exc):
            return f"{during} failed ({short_error(exc)})"
        alive = ", ".join(f"rank {r} (pid {p.pid})" for r, p in enumerate(self.procs, 1))
        return f"{during} got no answer within {bound:g} s ({knob}) from workers still running ({alive}): a worker is hung ({short_error(exc)})"

    def check_workers(self) -> str | None:
        """`broken`, or broken now if a worker has exited: an idle engine learns of a dead worker here (a server
        polls it), not only at its next collective. Safe from any thread: it runs no collective."""
        if self.broken is None and self.ready and (dead := self._exited()):
            self._mark_broken(dead)
        return self.broken

    def _exited(self) -> str:
        return "; ".join(f"worker rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in enumerate(self.procs, 1) if p.exitcode is not None)

    def _mark_broken(self, why: str) -> None:
        self.broken = f"tensor-parallel engine broken: {why}; restart the engine"
        log.error(self.broken)

    def _send(self, op: Op, args: dict | None = None) -> None:
        if self.broken is not None:
            raise HotswapError(self.broken)
        try:
            send_command(self.groups.control, op, args, self.timeout_s)
        except Exception as exc:
            raise self._fail(exc, f"the weight op {op.name}", step=False) from exc

    # ---- batches -----------------------------------------------------------------------------------

    def forward(self, hb: HostBatch, fix: np.ndarray | None, mode: StepMode, compute: Callable[[], T]) -> T:
        """Send the batch to every worker, then `compute()` it here (its collectives pair with the workers'
        own forward of the same batch, run the same way: `mode`). A decode graph's sampled ids reach the
        workers inside it (no `send_sampled`)."""
        if self.broken is not None:
            raise HotswapError(self.broken)
        try:
            send_step(self.groups.control, self.replica, hb, fix, mode, self.step_timeout_s)
            return compute()
        except Exception as exc:
            raise self._fail(exc, "a forward step", step=True) from exc

    def send_sampled(self, token_ids: torch.Tensor) -> None:
        """The workers' copy of the sampled ids: the next batch may take its inputs from them on the device."""
        try:
            dist.broadcast(token_ids, src=0, group=self.groups.device)
        except Exception as exc:
            raise self._fail(exc, "a forward step (its sampled ids)", step=True) from exc

    # ---- weight ops --------------------------------------------------------------------------------

    def agree(self, failure: str | None) -> str | None:
        """Every rank's outcome of the ops sent since the last agreement: None when every rank succeeded,
        else the first failure (rank 0's own `failure` first)."""
        if self.broken is not None:
            return failure or self.broken
        try:
            send_command(self.groups.control, Op.AGREE, None, self.timeout_s)
            outcomes = exchange(self.groups.control, self.size, {"failure": failure}, self.timeout_s)
        except Exception as exc:
            return failure or str(self._fail(exc, "agreeing on a weight op's outcome", step=False))
        if failure is not None:
            return failure
        return next((f"tensor-parallel rank {r}: {o['failure']}" for r, o in enumerate(outcomes) if o["failure"] is not None), None)

    def apply_disk(self, model_path: str) -> None:
        self._send(Op.APPLY_DISK, {"model_path": model_path})

    def relay(self, named: list[tuple[str, torch.Tensor]], bucket_bytes: int) -> None:
        """Broadcast full HF tensors to the workers in flattened buckets (at most `bucket_bytes` of extra
        memory here); each worker loads its slices of one bucket before the next arrives."""
        for bucket in iter_buckets(named, bucket_bytes):
            meta = BucketMetadata.of(bucket)
            flat = flatten_bucket(bucket, dtype=None, device=self.device)
            self._send(Op.RELAY, {"names": meta.names, "dtypes": meta.dtypes, "shapes": meta.shapes})
            try:
                self.relay_group.broadcast_from_trainer(flat)
            except Exception as exc:
                raise self._fail(exc, "relaying a weight bucket", step=True) from exc

    def receive(self, group_name: str, names: list[str], dtypes: list[str], shapes: list[list[int]], load_format: str | None) -> None:
        """Every worker takes part in a trainer's broadcast of one bucket, as rank 0 is about to."""
        self._send(Op.RECEIVE, {"group": group_name, "names": names, "dtypes": dtypes, "shapes": shapes, "load_format": load_format})

    def apply_received(self) -> None:
        self._send(Op.APPLY_RECEIVED)

    def commit(self) -> None:
        self._notify(Op.COMMIT)

    def rollback(self) -> None:
        self._notify(Op.ROLLBACK)

    def _notify(self, op: Op) -> None:
        """Session ends: nothing to tell a broken engine (it serves nothing any more)."""
        if self.broken is None:
            try:
                self._send(op)
            except HotswapError:
                pass

    def reset_tensors(self) -> None:
        self._send(Op.RESET)

    def release(self, tags: list[str], keep_weights_on_host: bool) -> None:
        self._send(Op.RELEASE, {"tags": tags, "keep_weights_on_host": keep_weights_on_host})

    def resume(self, tags: list[str]) -> None:
        self._send(Op.RESUME, {"tags": tags})

    # ---- reads -------------------------------------------------------------------------------------

    def gather(self, weight_map: WeightMap, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each named HF tensor whole, one at a time on rank 0's device: a replicated one as rank 0 holds it,
        a sharded one assembled from every rank's slice, a slice held by several ranks (k/v heads fewer than
        ranks) taken once (the workers send theirs in the same order)."""
        self._send(Op.GATHER, {"names": names})
        pending = iter(names)
        try:
            for name in pending:
                yield name, self._assemble(weight_map.slots[name])
        finally:  # a caller that stopped early: take the rest, so no worker is left sending
            if self.broken is None:
                for name in pending:
                    self._assemble(weight_map.slots[name])

    def _assemble(self, slot: WeightSlot) -> torch.Tensor:
        if slot.is_full:
            return slot.dest
        spec = slot.spec
        full = torch.empty(spec.hf_shape, dtype=slot.dtype, device=self.device)
        spec.src_view(full).copy_(slot.dest)
        for rank in range(1, self.size):
            start, length = spec.rank_slice(rank)
            if not length or not spec.gathered_from(rank):
                continue
            part = full.narrow(spec.src_dim, start, length)
            buf = part if part.is_contiguous() else torch.empty(part.shape, dtype=part.dtype, device=self.device)
            try:
                dist.recv(buf, src=rank, group=self.groups.device)
            except Exception as exc:
                raise self._fail(exc, f"gathering a tensor from worker rank {rank}", step=True) from exc
            if buf is not part:
                part.copy_(buf)
        return full

    # ---- a trainer's weights update group ----------------------------------------------------------

    def init_group(self, args: dict) -> str:
        """Tell every worker to join a trainer's group (each in a thread of its own); returns the store key
        under which they report, for `settle_join`."""
        self.joins += 1
        key = f"join/{self.joins}"
        self._send(Op.INIT_GROUP, dict(args, key=key))
        return key

    def settle_join(self, key: str, own_failure: str | None, timeout_s: float) -> str | None:
        """In rank 0's join thread (the control group belongs to the scheduler thread, so this goes through
        the store): wait for every worker's join, decide, and wait until each worker acted on the decision
        (kept its group, or left it). Returns None when every rank joined, else the first failure."""
        store, failure = self.groups.store, own_failure
        wait = timedelta(seconds=timeout_s + 30)
        for rank in range(1, self.size):
            try:
                store.wait([f"{key}/rank{rank}"], wait)
                msg = store.get(f"{key}/rank{rank}").decode()
            except Exception as exc:
                msg = f"no answer from the worker ({short_error(exc)})"
            if msg and failure is None:
                failure = f"tensor-parallel rank {rank}: {msg}"
        store.set(f"{key}/decision", "" if failure is None else "leave")
        for rank in range(1, self.size):
            try:
                store.wait([f"{key}/done{rank}"], wait)
            except Exception:
                pass
        return failure

    def destroy_group(self, group_name: str) -> None:
        self._send(Op.DESTROY_GROUP, {"group": group_name})


def _wait_for(store: dist.Store, procs: list, stage: str, timeout_s: float) -> None:
    """Until every worker set `{stage}/{rank}`; raises naming a worker that reported an error or died."""
    deadline = time.monotonic() + timeout_s
    pending = set(range(1, len(procs) + 1))
    while pending:
        for rank in sorted(pending):
            if store.check([f"{stage}/{rank}"]):
                pending.discard(rank)
                continue
            p = procs[rank - 1]
            if p.exitcode is not None or store.check([f"error/{rank}"]):
                why = store.get(f"error/{rank}").decode() if store.check([f"error/{rank}"]) else f"it exited with code {p.exitcode}"
                raise HotswapError(f"tensor-parallel worker rank {rank} failed to start: {why}")
        if pending and time.monotonic() > deadline:
            raise HotswapError(f"tensor-parallel worker rank(s) {sorted(pending)} did not start within {timeout_s:g} s")
        if pending:
            time.sleep(0.02)


def _timed_out(exc: BaseException) -> bool:
    """A collective that gave up waiting (gloo's "Timed out waiting", a work's wait timeout), not one that broke."""
    text = str(exc).lower()
    return "timed out" in text or "timeout" in text


def _stop(procs: list, grace_s: float) -> None:
    for p in procs:
        p.join(timeout=grace_s)
        if p.exitcode is None:
            p.kill()
            p.join(timeout=5)
