"""The WeightUpdater component: every weight-lifecycle request, atomic, against the live parameters.

An update is a session: opened explicitly (`begin_weight_update`, `pause_generation`) or implicitly by a
single update call. Inside a session no batch runs; every call is validated whole before its first live
byte changes; slices are saved (RollbackBuffer) before they are overwritten when a later failure could
otherwise leave a mixture; the version advances once, when the session commits.

Under tensor parallelism (`peers`, rank 0 only) every op is sent to the workers too; each rank validates
and loads its own slices, and the ranks agree on the outcome before rank 0 commits or rolls back, and tells
the workers which. Reads (get_weights_by_name, checksums, saves) see whole HF tensors, gathered to rank 0.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from hotswap import protocol as p
from hotswap.config import EngineConfig
from hotswap.errors import HotswapError
from hotswap.runner.model_runner import ModelRunner
from hotswap.weights import saver
from hotswap.weights.checkpoint_engine_payloads import BucketEntry
from hotswap.weights.checkpoint_engine_receiver import BufferSource, ReceiveStats, find_address, receive_buckets, refuse_exchange
from hotswap.weights.checksum import manifest_digest, tensor_sha256
from hotswap.weights.distributed import (WeightsGroup, WeightsGroupError, destroy_custom_process_group, init_custom_process_group,
                                         short_error)
from hotswap.weights.fast_copy import MatchedTensors, TensorPlanCache, check_finite, copy_into
from hotswap.weights.fast_reader import ReaderOptions, ReadPlanCache, run_read
from hotswap.weights.ipc import CudaIpcMappings
from hotswap.weights.ipc_grouped import resolve_grouped
from hotswap.weights.mapping import WeightSlot
from hotswap.weights.rollback import HostArena, RollbackBuffer

if TYPE_CHECKING:
    from collections.abc import Iterator

    from hotswap.runner.tp_peers import TPPeers

log = logging.getLogger(__name__)


class UpdateFailed(HotswapError):
    """An update failed after validation began; the session rolls back."""


@dataclass(kw_only=True, slots=True)
class UpdateSession:
    explicit: bool  # opened by begin_weight_update / pause_generation (else: one call)
    rollback: RollbackBuffer
    opened_by: str
    started: float = field(default_factory=time.monotonic)
    last_activity: float = field(default_factory=time.monotonic)
    begun: bool = False  # begin_weight_update inside a pause-opened session
    version: str | None = None
    failure: str | None = None
    num_tensors: int = 0
    num_bytes: int = 0
    changed: bool = False


@dataclass(kw_only=True, slots=True)
class WeightUpdater:
    model_runner: ModelRunner
    config: EngineConfig
    flush_cache: Callable[[], bool]
    is_idle: Callable[[], bool]
    abort_all: Callable[[str], int]
    retract_all: Callable[[], None]
    memory_released: Callable[[], bool]
    peers: TPPeers | None = None  # the tensor-parallel workers (rank 0 of a TP engine)
    weight_version: str = "default"
    update_count: int = 0
    session: UpdateSession | None = None
    paused: bool = False
    expired_message: str | None = None
    groups: dict[str, WeightsGroup] = field(default_factory=dict)
    pending_groups: set[str] = field(default_factory=set)  # rendezvous under way in a helper thread
    snapshot: dict[str, torch.Tensor] | None = None
    tensor_plans: TensorPlanCache = field(default_factory=TensorPlanCache)  # names -> slots, for repeated tensor updates
    read_plans: ReadPlanCache = field(default_factory=ReadPlanCache)  # checkpoint layout -> validated read tasks
    ipc_mappings: CudaIpcMappings = field(init=False)  # CUDA IPC storages kept open between updates
    rollback_arena: HostArena = field(default_factory=HostArena)  # pinned host for saved originals, kept across sessions
    ipc_source: BufferSource = field(default_factory=BufferSource)  # checkpoint-engine's buffers: CUDA IPC (tests: a CPU stand-in)
    last_read: object = None  # fast_reader.ReadStats of the last disk load

    def __post_init__(self) -> None:
        self.ipc_mappings = CudaIpcMappings(self.config.cuda_ipc_cache_bytes)

    def close(self) -> None:
        """At engine shutdown: unmap kept IPC storages (they pin the producer's memory) and drop snapshots."""
        self.ipc_mappings = CudaIpcMappings(0)
        self.tensor_plans, self.read_plans = TensorPlanCache(), ReadPlanCache()
        self.snapshot = None
        self.session = None

    # ---- session state the scheduler reads -------------------------------------------------------

    @property
    def session_open(self) -> bool:
        return self.session is not None and self.session.explicit

    @property
    def generation_held(self) -> bool:
        """No batch may run: generation is paused or an explicit update session is open."""
        return self.paused or self.session_open

    def expire_session(self) -> None:
        """Roll back and close a session whose trainer went silent (died or hung)."""
        s = self.session
        if s is None or not s.explicit:
            return
        if s.opened_by == "pause_generation" and not s.begun and not s.changed:
            return  # a pause holding no updates has nothing to roll back: it lasts until continue_generation
        idle = time.monotonic() - s.last_activity
        if idle < self.config.weight_session_timeout_s:
            return
        restored = self._roll_back(s)
        self.expired_message = (
            f"the weight-update session opened by {s.opened_by} expired after {idle:.0f} s without a call; "
            f"{restored} tensor(s) were rolled back and serving resumed"
        )
        log.warning(self.expired_message)
        self.session = None
        self.paused = False

    def _take_expired(self) -> str | None:
        msg, self.expired_message = self.expired_message, None
        return msg

    # ---- the session machinery -------------------------------------------------------------------

    def _open_implicit(self) -> UpdateSession | None:
        if self.session is None:
            self.session = UpdateSession(explicit=False, opened_by="a single update", rollback=self._new_buffer())
            return self.session
        return None

    def _new_buffer(self) -> RollbackBuffer:
        return RollbackBuffer(device_budget_bytes=self.config.rollback_device_budget_bytes, arena=self.rollback_arena)

    def _run_update(self, kind: str, weight_version: str | None, flush: bool, apply: Callable[[UpdateSession], tuple[int, int]]) -> p.WeightUpdateOutput:
        """Run one update call inside the open session or one of its own; commit or roll back."""
        expired = self._take_expired()
        if expired is not None:
            return self._refuse(f"{kind} refused: {expired}")
        if self.memory_released():
            return self._refuse(f"{kind} refused: weights or KV cache are released; resume memory first")
        if self.session is not None and self.session.failure is not None:
            return self._refuse(f"{kind} refused: this weight-update session already failed: {self.session.failure}")
        implicit = self._open_implicit()
        session = self.session
        start = time.perf_counter()
        reason = None
        try:
            n, nbytes = apply(session)
            if self.model_runner.device.type == "cuda":
                torch.cuda.synchronize(self.model_runner.device)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, HotswapError) else f"{type(exc).__name__}: {exc}"
        if self.peers is not None:
            reason = self.peers.agree(reason)  # every rank loads its slices; any failure fails them all
        if reason is not None:
            restored = self._roll_back(session)
            if implicit is not None:
                self.session = None
            else:
                session.failure = reason
            log.warning("%s failed: %s (rolled back %d tensors)", kind, reason, restored)
            where = "" if implicit is not None else " The session is marked failed; end it with end_weight_update."
            return p.WeightUpdateOutput(success=False, message=f"{kind} failed: {reason}; weights unchanged.{where}",
                                        weight_version=self.weight_version, rolled_back=restored > 0)
        session.last_activity = time.monotonic()
        session.num_tensors += n
        session.num_bytes += nbytes
        session.changed = True
        if weight_version is not None:
            session.version = weight_version
        elapsed = time.perf_counter() - start
        if implicit is not None:
            msg = self._commit(flush)
            return p.WeightUpdateOutput(success=True, message=f"{kind}: updated {n} tensor(s); {msg}", weight_version=self.weight_version,
                                        num_tensors=n, num_bytes=nbytes, elapsed_s=elapsed)
        return p.WeightUpdateOutput(success=True, message=f"{kind}: applied {n} tensor(s) inside the open session",
                                    weight_version=self.weight_version, num_tensors=n, num_bytes=nbytes, elapsed_s=elapsed)

    def _commit(self, flush: bool = True) -> str:
        s = self.session
        self.session = None
        s.rollback.clear()
        if self.peers is not None:
            self.peers.commit()
        if not s.changed and s.version is None:
            return "nothing to commit"
        self.update_count += 1
        self.weight_version = s.version if s.version is not None else str(self.update_count)
        flushed = self.flush_cache() if flush else False
        return f"weight version {self.weight_version}" + (", prefix cache flushed" if flushed else "")

    def _roll_back(self, s: UpdateSession) -> int:
        """Restore the session's saved originals here and on every tensor-parallel worker."""
        if self.peers is not None:
            self.peers.rollback()
        return s.rollback.restore()

    def _refuse(self, message: str) -> p.WeightUpdateOutput:
        return p.WeightUpdateOutput(success=False, message=message, weight_version=self.weight_version)

    def _refuse_update(self, message: str) -> p.WeightUpdateOutput:
        """Refuse an update call; inside an explicit session the refused bucket fails the session (rolled
        back now, closed by end_weight_update), so ending it can never commit the other buckets alone."""
        s = self.session
        rolled_back = False
        if s is not None and s.explicit and s.failure is None:
            rolled_back = self._roll_back(s) > 0
            s.failure = message
            message += "; the open session is marked failed and rolled back: end it with end_weight_update"
        out = self._refuse(message)
        out.rolled_back = rolled_back
        return out

    def _guard_rollback(self, session: UpdateSession, slots: list[WeightSlot], *, source_can_fail: bool, overlap: bool = False) -> dict | None:
        """Save originals when a later failure could strand these copies: inside an explicit session, when
        this call's own source can still fail after the first copy (streaming reads, later IPC buckets), or
        when another tensor-parallel rank can still fail. With `overlap` the saves run alongside the load:
        returns per-slot events the writer waits on; otherwise they are done when this returns."""
        if self.config.enable_rollback and (session.explicit or source_can_fail or self.peers is not None):
            return session.rollback.protect_many(slots, overlap=overlap)
        return None

    def _load_matched(self, session: UpdateSession, matched: MatchedTensors, *, source_can_fail: bool) -> int:
        """Copy matched source tensors into their parameters (finite check first, originals saved when a
        later failure could strand them); returns the bytes copied."""
        if self.config.check_weights_finite:
            check_finite(matched.items)
        self._guard_rollback(session, [target.slot for _, target, _ in matched.items], source_can_fail=source_can_fail)
        return copy_into(matched)

    # ---- update from disk --------------------------------------------------------------------------

    def update_weights_from_disk(self, req: p.UpdateWeightsFromDiskRequest) -> p.WeightUpdateOutput:
        if req.load_format not in (None, "auto", "safetensors"):
            return self._refuse_update(f"unsupported load_format {req.load_format!r}; hotswap loads safetensors")
        options = ReaderOptions.from_config(self.config)
        try:
            read = self.read_plans.prepare(self.model_runner.weight_map, req.model_path, options)  # validated; cached by layout
        except HotswapError as exc:
            return self._refuse_update(f"update_weights_from_disk refused: {exc}; weights unchanged")

        def apply(session: UpdateSession) -> tuple[int, int]:
            if self.peers is not None:
                self.peers.apply_disk(req.model_path)  # every worker reads its own slices meanwhile
            saved = self._guard_rollback(session, read.slots, source_can_fail=True, overlap=True)
            self.last_read = run_read(read, options, wait_for=saved)
            return len(read.slots), self.last_read.nbytes

        return self._run_update("update_weights_from_disk", req.weight_version, req.flush_cache, apply)

    # ---- update from tensors (in process, CUDA IPC, shared memory) ---------------------------------

    def update_weights_from_tensor(self, req: p.UpdateWeightsFromTensorRequest) -> p.WeightUpdateOutput:
        if req.load_format not in (None, "direct"):
            return self._refuse_update(f"unsupported load_format {req.load_format!r}")
        try:
            start = time.perf_counter()
            named = resolve_grouped(req.named_tensors, self.model_runner.device, self.ipc_mappings)  # one open per shared IPC storage
            matched = self._match_sources(named)
            validate_s = time.perf_counter() - start
        except HotswapError as exc:
            return self._refuse_update(f"update_weights_from_tensor refused: {exc}; weights unchanged")

        def apply(session: UpdateSession) -> tuple[int, int]:
            if self.peers is not None:  # the tensors are here only: broadcast them, each worker takes its slices
                self.peers.relay([(name, t) for name, _, t in matched.items], self.config.weight_update_bucket_bytes)
            return len(matched.items), self._load_matched(session, matched, source_can_fail=False)

        out = self._run_update("update_weights_from_tensor", req.weight_version, req.flush_cache, apply)
        out.extra["validate_s"] = validate_s
        return out

    def _match_sources(self, named: list[tuple[str, torch.Tensor]]) -> MatchedTensors:
        """Match by metadata (cached by names). Views of remembered IPC descriptors are the engine's own and
        cannot change: their call keeps its match, and a repeat of it skips every per-tensor check."""
        wm, call = self.model_runner.weight_map, self.ipc_mappings.last_call
        if call is None or call.resolved is not named:
            return self.tensor_plans.match(wm, named)
        if not self.tensor_plans.current(call.matched, wm):
            call.matched = self.tensor_plans.match(wm, named, trusted=True)
        return call.matched

    def update_weights_from_ipc(self, req: p.UpdateWeightsFromIPCRequest) -> p.WeightUpdateOutput:
        """checkpoint-engine's push (weights/checkpoint_engine_receiver.py): buckets arrive one by one over
        ZMQ; each is checked against the model before its first byte lands, and a failure in any later
        bucket rolls back the earlier ones. Once this device's socket is known the exchange always runs,
        even for a refused update, so the parameter server fails instead of waiting for a peer."""
        device = self.model_runner.device
        try:
            address = find_address(req.zmq_handles, self.ipc_source.device_key(device))
        except HotswapError as exc:
            return self._refuse_update(f"update_weights_from_ipc refused: {exc}; weights unchanged")
        timeout_s = self.config.weight_session_timeout_s
        if self.peers is not None:  # each rank would have to take its own device's socket: not built yet
            out = self._refuse_update("update_weights_from_ipc (checkpoint-engine) is not supported with tensor_parallel_size > 1 yet; "
                                      "push with update_weights_from_distributed, _from_tensor or _from_disk")
            refuse_exchange(address, out.message, timeout_s=timeout_s)
            return out
        took_part = False
        received: list[ReceiveStats] = []

        def apply(session: UpdateSession) -> tuple[int, int]:
            nonlocal took_part
            took_part = True
            received.append(receive_buckets(address, device=device, source=self.ipc_source, timeout_s=timeout_s,
                                            load_bucket=partial(self._load_ipc_bucket, session)))
            return received[0].num_tensors, received[0].num_bytes

        out = self._run_update("update_weights_from_ipc", req.weight_version, req.flush_cache, apply)
        if not took_part:  # refused before the exchange began
            refuse_exchange(address, out.message, timeout_s=timeout_s)
        if received:
            out.extra["buckets"] = received[0].num_buckets
        return out

    def _load_ipc_bucket(self, session: UpdateSession, views: list[tuple[BucketEntry, torch.Tensor]]) -> None:
        matched = self.tensor_plans.match(self.model_runner.weight_map, [(e.name, t) for e, t in views])
        self._load_matched(session, matched, source_can_fail=True)

    # ---- update from a trainer over torch.distributed ----------------------------------------------

    def init_weights_update_group(self, req: p.InitWeightsUpdateGroupRequest) -> p.ControlOutput | Future:
        """Validate, then rendezvous in a helper thread (it blocks until the trainer and every other rank
        arrive, up to `timeout_s`) so the engine keeps serving meanwhile; the returned Future carries the
        output, and the group is registered before it resolves. Tensor-parallel rank r joins as
        rank_offset + r; the group is kept only if every rank joined."""
        name = req.group_name
        if name in self.groups or name in self.pending_groups:
            state = "is still being set up" if name in self.pending_groups else "already exists"
            return p.ControlOutput(success=False, message=f"weights update group {name!r} {state}; destroy it or use another group_name")
        device = self.model_runner.device
        backend = req.backend or ("nccl" if device.type == "cuda" else "gloo")
        if backend not in ("gloo", "nccl"):
            return p.ControlOutput(success=False, message=f"unsupported backend {backend!r}; use 'nccl' (CUDA) or 'gloo'")
        if backend == "nccl" and device.type != "cuda":
            return p.ControlOutput(success=False, message="backend 'nccl' needs a CUDA engine; use 'gloo' on the CPU")
        rank, last = req.rank_offset, req.rank_offset + self.model_runner.tp.size - 1
        if not 0 < rank <= last < req.world_size:
            ranks = f"engine rank {rank}" if rank == last else f"engine ranks {rank}..{last} (one per tensor-parallel rank)"
            return p.ControlOutput(success=False, message=f"{ranks} (rank_offset {req.rank_offset}) must be in 1..world_size-1={req.world_size - 1}")
        if not req.timeout_s or req.timeout_s <= 0:
            return p.ControlOutput(success=False, message=f"timeout_s must be positive, got {req.timeout_s!r}")
        where = f"tcp://{req.master_address}:{req.master_port}"
        key = None
        if self.peers is not None:  # the workers join in threads of their own, from now
            key = self.peers.init_group({"group_name": name, "init_method": where, "world_size": req.world_size, "rank_offset": rank,
                                         "backend": backend, "timeout_s": req.timeout_s})
        self.pending_groups.add(name)
        fut: Future = Future()

        def join() -> None:
            pg, failure = None, None
            try:
                pg = init_custom_process_group(backend=backend, init_method=where, world_size=req.world_size, rank=rank,
                                               group_name=name, timeout=timedelta(seconds=req.timeout_s))
            except Exception as exc:
                failure = short_error(exc)
            if key is not None:
                failure = self.peers.settle_join(key, failure, req.timeout_s)
                if failure is not None and pg is not None:
                    destroy_custom_process_group(pg)
            if failure is None:
                # one dict store, atomic under the GIL; the scheduler thread only reads this dict
                self.groups[name] = WeightsGroup(name, pg, rank, req.world_size, backend, device,
                                                 op_timeout_s=self.config.weight_session_timeout_s)
                ranks = f"rank {rank}" if rank == last else f"ranks {rank}..{last}"
                out = p.ControlOutput(success=True, message=f"joined group {name!r} as {ranks} of {req.world_size} ({backend})")
            else:
                out = p.ControlOutput(success=False, message=(
                    f"failed to join weights update group {name!r} at {where} as rank {rank} of {req.world_size} within "
                    f"{req.timeout_s:g} s (the trainer must create it as rank 0 there, with every other rank joining): {failure}"))
            self.pending_groups.discard(name)
            fut.set_result(out)

        threading.Thread(target=join, name=f"hotswap-join-{name}", daemon=True).start()
        return fut

    def destroy_weights_update_group(self, req: p.DestroyWeightsUpdateGroupRequest) -> p.ControlOutput:
        group = self.groups.pop(req.group_name, None)
        if group is None:
            pending = " (it is still being set up)" if req.group_name in self.pending_groups else ""
            return p.ControlOutput(success=False, message=f"no weights update group named {req.group_name!r}{pending}")
        if self.peers is not None:
            self.peers.destroy_group(req.group_name)
        note = group.destroy()  # a dead peer can make teardown complain; the group is gone either way
        extra = "".join(f" ({x})" for x in (f"it was broken: {group.broken}" if group.broken else None, note) if x)
        return p.ControlOutput(success=True, message=f"group {req.group_name!r} destroyed{extra}")

    def update_weights_from_distributed(self, req: p.UpdateWeightsFromDistributedRequest) -> p.WeightUpdateOutput:
        """Lockstep with the trainer: once the group exists and the metadata can be received, take part in
        every broadcast the request announces, then decide (session state, names, shapes, values). The
        output's `extra["received"]` tells the trainer whether lockstep held."""
        from hotswap.weights.distributed_receiver import plan_receive, receive_bucket

        def refuse(message: str) -> p.WeightUpdateOutput:
            out = self._refuse_update(f"update_weights_from_distributed refused: {message}")
            out.extra["received"] = False
            return out

        if self.peers is not None and self.peers.broken is not None:
            return refuse(self.peers.broken)  # before receiving: the trainer learns at once that lockstep is gone
        group = self.groups.get(req.group_name)
        if group is None:
            pending = " (it is still being set up)" if req.group_name in self.pending_groups else ""
            return refuse(f"no weights update group {req.group_name!r}{pending}; call init_weights_update_group first")
        if group.broken is not None:
            return refuse(f"weights update group {req.group_name!r} is broken ({group.broken}); destroy it and init a new one")
        try:
            metas = plan_receive(req.names, req.dtypes, req.shapes, req.load_format, max_bytes=self.config.weight_update_bucket_bytes)
        except HotswapError as exc:
            # metadata that cannot be received at all: refuse up front; the group's timeout frees the trainer
            return refuse(str(exc))
        if self.peers is not None:  # every rank is a member of the group: each receives the whole bucket
            self.peers.receive(req.group_name, req.names, req.dtypes, req.shapes, req.load_format)
        recv_error = None
        try:
            received = receive_bucket(group, metas, req.load_format)
        except Exception as exc:  # a dead or hung trainer: the group is now broken
            received, recv_error = [], str(exc) if isinstance(exc, WeightsGroupError) else short_error(exc)
        if self.peers is not None:
            other = self.peers.agree(recv_error)
            if recv_error is None and other is not None:  # lockstep is lost on another rank: this group is unusable too
                recv_error = other
                group.mark_broken(other)

        def apply(session: UpdateSession) -> tuple[int, int]:
            if self.peers is not None:
                self.peers.apply_received()
            if recv_error is not None:
                raise UpdateFailed(f"receiving the bucket failed: {recv_error}")
            matched = self.tensor_plans.match(self.model_runner.weight_map, list(zip([m.name for m in metas], received)))
            return len(matched.items), self._load_matched(session, matched, source_can_fail=False)

        out = self._run_update("update_weights_from_distributed", req.weight_version, req.flush_cache, apply)
        if recv_error is not None and recv_error not in out.message:
            out.message += f" (receiving the bucket also failed: {recv_error})"
        out.extra["received"] = recv_error is None
        return out

    # ---- explicit sessions and pausing -------------------------------------------------------------

    def begin_weight_update(self, req: p.BeginWeightUpdateRequest) -> p.ControlOutput:
        self._take_expired()
        if self.memory_released():
            return p.ControlOutput(success=False, message="begin_weight_update refused: memory is released; resume it first")
        if self.session is not None:
            if self.session.opened_by == "pause_generation" and not self.session.begun:
                self.session.begun = True
                return p.ControlOutput(success=True, message="weight-update session begun inside the paused generation")
            return p.ControlOutput(success=False, message=f"begin_weight_update refused: a session opened by {self.session.opened_by} is already open")
        self.session = UpdateSession(explicit=True, opened_by="begin_weight_update", rollback=self._new_buffer(), begun=True)
        return p.ControlOutput(success=True, message="weight-update session open; generation holds until end_weight_update")

    def end_weight_update(self, req: p.EndWeightUpdateRequest) -> p.WeightUpdateOutput:
        expired = self._take_expired()
        if expired is not None:
            return self._refuse(f"end_weight_update: {expired}")
        s = self.session
        if s is None or not s.begun:
            return self._refuse("end_weight_update refused: no weight-update session is open")
        if req.weight_version is not None:
            s.version = req.weight_version
        if req.abort or s.failure is not None:
            self._roll_back(s)
            self._close_after(s)
            why = "aborted by the caller" + (f" after a failure: {s.failure}" if s.failure else "") if req.abort else f"rolled back: {s.failure}"
            return p.WeightUpdateOutput(success=req.abort, rolled_back=True, weight_version=self.weight_version,
                                        message=f"session {why}; weights are as before begin_weight_update")
        n, nbytes = s.num_tensors, s.num_bytes
        elapsed = time.monotonic() - s.started
        if s.opened_by == "pause_generation":  # commit the updates, stay paused until continue_generation
            msg = self._commit()
            self.session = UpdateSession(explicit=True, opened_by="pause_generation", rollback=self._new_buffer())
        else:
            msg = self._commit()
        return p.WeightUpdateOutput(success=True, message=f"session committed {n} tensor(s); {msg}", weight_version=self.weight_version,
                                    num_tensors=n, num_bytes=nbytes, elapsed_s=elapsed)

    def _close_after(self, s: UpdateSession) -> None:
        self.session = UpdateSession(explicit=True, opened_by="pause_generation", rollback=self._new_buffer()) if s.opened_by == "pause_generation" else None

    def pause_generation(self, req: p.PauseGenerationRequest) -> p.ControlOutput:
        if req.mode not in ("abort", "retract", "in_place"):
            return p.ControlOutput(success=False, message=f"unknown pause mode {req.mode!r}; use abort, retract or in_place")
        if self.paused:
            return p.ControlOutput(success=False, message="generation is already paused")
        if self.session is not None:
            return p.ControlOutput(success=False, message=f"pause_generation refused: a session opened by {self.session.opened_by} is open")
        if req.mode == "abort":
            self.abort_all("aborted by pause_generation")
        elif req.mode == "retract":
            self.retract_all()
        self.paused = True
        self.session = UpdateSession(explicit=True, opened_by="pause_generation", rollback=self._new_buffer())
        return p.ControlOutput(success=True, message=f"generation paused ({req.mode})")

    def continue_generation(self, req: p.ContinueGenerationRequest) -> p.ControlOutput:
        if not self.paused:
            return p.ControlOutput(success=False, message="generation is not paused")
        s = self.session
        msg = "generation continues"
        if s is not None:
            if s.failure is not None:
                self._roll_back(s)
                msg += f"; the failed session was rolled back ({s.failure})"
                self.session = None
            else:
                msg += "; " + self._commit()
        self.paused = False
        return p.ControlOutput(success=True, message=msg)

    def update_weight_version(self, req: p.UpdateWeightVersionRequest) -> p.ControlOutput:
        if req.abort_all_requests:
            self.abort_all("aborted by update_weight_version")
        self.weight_version = str(req.new_version)
        return p.ControlOutput(success=True, message=f"weight version is now {self.weight_version}")

    # ---- reads and checks --------------------------------------------------------------------------

    def get_weights_by_name(self, req: p.GetWeightsByNameRequest) -> p.GetWeightsByNameOutput:
        slot = self.model_runner.weight_map.resolve(req.name)
        if slot is None:
            return p.GetWeightsByNameOutput(success=False, message=f"unknown parameter {req.name!r}")
        if self.memory_released():
            return p.GetWeightsByNameOutput(success=False, message="weights are released; resume memory first")
        whole_name = self.model_runner.weight_map.part_of.get(slot.hf_name, slot.hf_name)
        _, t = next(iter(self._whole([whole_name])))
        if whole_name != slot.hf_name:
            t = slot.spec.dest_view(t)  # one expert's tensor inside the stacked parameter
        part = t[: req.truncate_size] if req.truncate_size and req.truncate_size > 0 else t
        return p.GetWeightsByNameOutput(success=True, parameter=part.float().cpu().tolist(), dtype=str(t.dtype).removeprefix("torch."),
                                        shape=list(t.shape))

    def _whole(self, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
        """Each named HF tensor whole, one at a time: this rank's slot, or under tensor parallelism gathered
        from every rank's slice (so reads, checksums and saves look the same at every TP size)."""
        wm = self.model_runner.weight_map
        if self.peers is not None:
            return self.peers.gather(wm, names)
        return ((name, wm.slots[name].dest) for name in names)

    def check_weights(self, req: p.CheckWeightsRequest) -> p.CheckWeightsOutput:
        """`checksum` hashes whole HF tensors (gathered under tensor parallelism): the manifest equals a
        trainer's `state_dict_manifest` of the same weights whatever the engine's TP size."""
        wm = self.model_runner.weight_map
        if self.memory_released():
            return p.CheckWeightsOutput(success=False, message="weights are released; resume memory first")
        if req.action == "checksum":
            sums = {name: tensor_sha256(t) for name, t in self._whole(wm.names)}
            digest = manifest_digest(sums)
            if req.expected is not None:
                mism = sorted(n for n in set(sums) | set(req.expected) if sums.get(n) != req.expected.get(n))
                return p.CheckWeightsOutput(success=not mism, checksums=sums, digest=digest, mismatches=mism,
                                            message="all checksums match" if not mism else f"{len(mism)} parameter(s) differ, e.g. {mism[:3]}")
            return p.CheckWeightsOutput(success=True, checksums=sums, digest=digest, message=f"{len(sums)} checksums")
        if req.action == "snapshot":
            self.snapshot = {name: t.detach().to("cpu", copy=True) for name, t in self._whole(wm.names)}
            return p.CheckWeightsOutput(success=True, message=f"snapshot of {len(self.snapshot)} tensors")
        if req.action == "compare":
            if self.snapshot is None:
                return p.CheckWeightsOutput(success=False, message="no snapshot to compare against; call check_weights('snapshot') first")
            mism = [n for n, t in self._whole(wm.names) if not torch.equal(t.cpu(), self.snapshot[n])]
            return p.CheckWeightsOutput(success=not mism, mismatches=mism,
                                        message="weights equal the snapshot" if not mism else f"{len(mism)} tensor(s) differ from the snapshot")
        if req.action == "reset_tensors":
            if not self.is_idle():
                return p.CheckWeightsOutput(success=False, message="reset_tensors refused while requests are running")
            if self.peers is not None:
                self.peers.reset_tensors()
            for name in wm.names:
                wm.slots[name].dest.zero_()
            self.flush_cache()
            failure = self.peers.agree(None) if self.peers is not None else None
            if failure is not None:
                return p.CheckWeightsOutput(success=False, message=f"reset_tensors failed: {failure}")
            return p.CheckWeightsOutput(success=True, message=f"zeroed {len(wm.names)} tensors")
        return p.CheckWeightsOutput(success=False, message=f"unknown check_weights action {req.action!r}; use snapshot, compare, reset_tensors or checksum")

    # ---- saving ------------------------------------------------------------------------------------

    def save_sharded_model(self, req: p.SaveShardedModelRequest) -> p.ControlOutput:
        if self.memory_released():
            return p.ControlOutput(success=False, message="weights are released; resume memory first")
        try:
            files = saver.save_sharded(self.model_runner.weight_map, self._whole, Path(req.path), self.config.model_path,
                                       pattern=req.pattern, max_size=req.max_size)
        except (HotswapError, OSError) as exc:
            return p.ControlOutput(success=False, message=f"save_sharded_model failed: {exc}")
        return p.ControlOutput(success=True, message=f"saved {len(files)} file(s) to {req.path}")

    def save_remote_model(self, req: p.SaveRemoteModelRequest) -> p.ControlOutput:
        if self.memory_released():
            return p.ControlOutput(success=False, message="weights are released; resume memory first")
        try:
            saver.save_remote(self.model_runner.weight_map, self._whole, req.url, self.config.model_path)
        except (HotswapError, OSError, ValueError, ImportError) as exc:
            return p.ControlOutput(success=False, message=f"save_remote_model failed: {exc}")
        return p.ControlOutput(success=True, message=f"saved to {req.url}")
