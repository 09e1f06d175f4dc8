"""A tensor-parallel worker (ranks 1..N-1): no scheduler, no cache bookkeeping, no sampling. It receives a
command from rank 0, runs it on its own slices, and waits for the next (`runner/tp_protocol.py`).

A failed weight op is remembered and reported at the next AGREE, so rank 0 can roll every rank back. A
failure inside a collective (a batch, a gather, a relay) leaves the ranks out of step: the worker exits,
which closes its sockets, so rank 0's next collective fails at once instead of hanging.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import threading
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from hotswap.config import EngineConfig, model_config_for
from hotswap.errors import HotswapError
from hotswap.runner.device_memory import DeviceMemory
from hotswap.runner.host_batch import HostBatch
from hotswap.runner.model_runner import ModelRunner
from hotswap.runner.tp_group import TPGroups
from hotswap.runner.tp_protocol import Op, decode_json, decode_step, exchange, recv_command
from hotswap.runner.tp_step_codec import StepMode, StepReplica
from hotswap.weights.apply import apply_read, apply_tensors
from hotswap.weights.distributed import WeightsGroup
from hotswap.weights.distributed_receiver import plan_receive, receive_bucket
from hotswap.weights.fast_copy import TensorPlanCache
from hotswap.weights.fast_reader import ReaderOptions, ReadPlanCache
from hotswap.weights.rollback import HostArena, RollbackBuffer
from hotswap.weights.sources.disk import plan_disk
from hotswap.wire.process_group import init_custom_process_group, short_error

log = logging.getLogger(__name__)


@dataclass(kw_only=True, slots=True)
class TPWorker:
    groups: TPGroups
    runner: ModelRunner
    config: EngineConfig
    relay_group: WeightsGroup  # the device group, receiving rank 0's weight relays
    memory: DeviceMemory
    rollback: RollbackBuffer  # originals saved by the open update session, until COMMIT or ROLLBACK
    tensor_plans: TensorPlanCache = field(default_factory=TensorPlanCache)
    read_plans: ReadPlanCache = field(default_factory=ReadPlanCache)  # as rank 0's: a trainer's new folder each step is planned once
    weights_groups: dict[str, WeightsGroup] = field(default_factory=dict)  # trainers' groups this rank joined
    received: list[tuple[str, torch.Tensor]] | None = None  # the last RECEIVE's bucket, for APPLY_RECEIVED
    failure: str | None = None  # the first failure since the last AGREE
    prev_token_ids: torch.Tensor | None = None  # the last batch's sampled ids, as rank 0 sent them
    replica: StepReplica = field(default_factory=StepReplica)  # the last batch, which the next ADVANCE continues

    def serve(self) -> None:
        local = {  # ops whose failure is only reported: the ranks stay in step
            Op.COMMIT: self.commit, Op.ROLLBACK: self.roll_back, Op.APPLY_DISK: self.apply_disk, Op.RECEIVE: self.receive,
            Op.APPLY_RECEIVED: self.apply_received, Op.INIT_GROUP: self.init_group, Op.DESTROY_GROUP: self.destroy_group,
            Op.RESET: self.reset, Op.RELEASE: self.release, Op.RESUME: self.resume,
        }
        collective = {Op.AGREE: self.agree, Op.RELAY: self.relay, Op.GATHER: self.gather}
        while True:
            op, args, payload = recv_command(self.groups.control)
            if op is Op.SHUTDOWN:
                return
            if op not in (Op.AGREE, Op.APPLY_RECEIVED):  # a bucket rank 0 refused before applying it
                self.received = None
            if op in (Op.STEP, Op.ADVANCE):
                self.step(*decode_step(self.replica, op, args, payload, self.runner.kv_cache.page_size))
            elif op in collective:
                collective[op](decode_json(args, payload))
            else:
                try:
                    local[op](decode_json(args, payload))
                except Exception as exc:
                    self.note_failure(exc)

    def note_failure(self, exc: BaseException, prefix: str = "") -> None:
        if self.failure is None:
            self.failure = prefix + (str(exc) if isinstance(exc, HotswapError) else f"{type(exc).__name__}: {exc}")

    # ---- batches -----------------------------------------------------------------------------------

    def step(self, hb: HostBatch, fix: np.ndarray | None, mode: StepMode) -> None:
        """The batch rank 0 runs now, the way it runs it: a decode graph's sampled ids arrive inside the
        graph; otherwise they follow on the device group when the batch samples."""
        graphs = self.runner.cuda_graphs
        if mode is not StepMode.EAGER and (graphs is None or not graphs.captured):
            raise HotswapError(f"rank 0 replays a CUDA graph ({mode.name}) that this rank has not captured")
        if mode is StepMode.DECODE_GRAPH:
            _, (ids, _, _) = graphs.replay(hb, fix, None, self.prev_token_ids)
            self.prev_token_ids = ids
            return
        if mode is StepMode.EXTEND_GRAPH:
            logits = graphs.run_extend(hb, fix, self.prev_token_ids)
        else:
            logits = self.runner.forward(hb, fix, self.prev_token_ids)
        if logits is not None and len(hb.logits_indices):  # rank 0 sampled: its ids follow
            ids = torch.empty(len(hb.logits_indices), dtype=torch.int64, device=self.runner.device)
            dist.broadcast(ids, src=0, group=self.groups.device)
            self.prev_token_ids = ids

    # ---- weight ops --------------------------------------------------------------------------------

    def agree(self, args: dict) -> None:
        if self.runner.device.type == "cuda":
            try:
                torch.cuda.synchronize(self.runner.device)  # a copy that failed on the device fails here
            except Exception as exc:
                self.note_failure(exc)
        failure, self.failure = self.failure, None
        exchange(self.groups.control, self.groups.size, {"failure": failure}, None)

    def commit(self, args: dict) -> None:
        self.rollback.clear()

    def roll_back(self, args: dict) -> None:
        self.rollback.restore()

    def _guard(self) -> RollbackBuffer | None:
        """Another rank can always fail after this one copied: originals are saved whenever rollback is on."""
        return self.rollback if self.config.enable_rollback else None

    def apply_disk(self, args: dict) -> None:
        options, timeout_s = ReaderOptions.from_config(self.config), self.config.weight_read_timeout_s
        read = plan_disk(args["model_path"], self.runner.weight_map, self.read_plans, options, timeout_s)
        apply_read(read, options, rollback=self._guard(), timeout_s=timeout_s)

    def relay(self, args: dict) -> None:
        metas = plan_receive(args["names"], args["dtypes"], args["shapes"], "flattened_bucket", max_bytes=1 << 62, max_numel=1 << 62)
        tensors = receive_bucket(self.relay_group, metas, "flattened_bucket")
        try:
            self.load(list(zip(args["names"], tensors)))
        except Exception as exc:
            self.note_failure(exc)

    def receive(self, args: dict) -> None:
        """Take part in a trainer's broadcast even when this rank will refuse the bucket (lockstep)."""
        try:
            group = self.weights_groups.get(args["group"])
            if group is None:
                raise HotswapError(f"this rank has no weights update group {args['group']!r}")
            metas = plan_receive(args["names"], args["dtypes"], args["shapes"], args["load_format"], max_bytes=self.config.weight_update_bucket_bytes,
                                 max_numel=self.runner.weight_map.max_numel)
            self.received = list(zip(args["names"], receive_bucket(group, metas, args["load_format"])))
        except Exception as exc:
            self.note_failure(exc, "receiving the bucket failed: ")

    def apply_received(self, args: dict) -> None:
        named, self.received = self.received, None
        if named is None:
            raise HotswapError("this rank holds no received bucket to apply")
        self.load(named)

    def load(self, named: list[tuple[str, torch.Tensor]]) -> None:
        """This rank's slices of HF-named tensors, after the same checks rank 0 makes on its own."""
        if self.failure is not None:
            return  # this update already failed here: it will be rolled back
        apply_tensors(self.tensor_plans.match(self.runner.weight_map, named), finite=self.config.check_weights_finite, rollback=self._guard())

    def reset(self, args: dict) -> None:
        for slot in self.runner.weight_map.slots.values():
            slot.dest.zero_()

    def release(self, args: dict) -> None:
        self.memory.release(args["tags"], args["keep_weights_on_host"])

    def resume(self, args: dict) -> None:
        self.memory.resume(args["tags"])

    # ---- reads -------------------------------------------------------------------------------------

    def gather(self, args: dict) -> None:
        slots = self.runner.weight_map.slots
        for name in args["names"]:
            slot = slots[name]
            if not slot.is_full and slot.dest.numel() and slot.spec.gathered_from(self.groups.rank):
                dist.send(slot.dest.contiguous(), dst=0, group=self.groups.device)

    # ---- a trainer's weights update group ----------------------------------------------------------

    def init_group(self, args: dict) -> None:
        threading.Thread(target=self.join_group, args=(args,), name=f"hotswap-join-{args['group_name']}", daemon=True).start()

    def join_group(self, args: dict) -> None:
        """Join as rank rank_offset + tp_rank, report through the store, then keep or leave the group as
        rank 0 decides (it keeps it only when every rank joined)."""
        name, key, rank = args["group_name"], args["key"], args["rank_offset"] + self.groups.rank
        store, me = self.groups.store, self.groups.rank
        failure = ""
        try:
            pg = init_custom_process_group(backend=args["backend"], init_method=args["init_method"], world_size=args["world_size"], rank=rank,
                                           group_name=name, timeout=timedelta(seconds=args["timeout_s"]))
            self.weights_groups[name] = WeightsGroup(name, pg, rank, args["world_size"], args["backend"], self.runner.device,
                                                     op_timeout_s=self.config.weight_session_timeout_s)
        except Exception as exc:
            failure = f"failed to join as rank {rank}: {short_error(exc)}"
        store.set(f"{key}/rank{me}", failure)
        try:
            store.wait([f"{key}/decision"], timedelta(seconds=args["timeout_s"] + 60))
            leave = store.get(f"{key}/decision") != b""
        except Exception:
            leave = True
        if leave and not failure:
            group = self.weights_groups.pop(name, None)
            if group is not None:
                group.destroy()
        store.set(f"{key}/done{me}", "")

    def destroy_group(self, args: dict) -> None:
        group = self.weights_groups.pop(args["group"], None)
        if group is not None:
            group.destroy()


def worker_main(spec_json: str) -> None:
    """Entry point of a spawned worker: join the groups, build the model runner, serve until SHUTDOWN."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole process group: rank 0 decides when workers stop
    spec = json.loads(spec_json)
    rank = spec["rank"]
    config = EngineConfig(**spec["config"])
    store = dist.TCPStore("127.0.0.1", spec["port"], spec["size"], False, timeout=timedelta(seconds=config.tp_timeout_s))
    try:
        device = torch.device(spec["device"])
        if device.type == "cuda":
            torch.cuda.set_device(device)
        else:  # the ranks share the host's cores: one rank's idle threads must not spin on the others'
            torch.set_num_threads(max(1, torch.get_num_threads() // spec["size"]))
        store.set(f"hello/{rank}", str(os.getpid()))
        groups = TPGroups.create(store=store, rank=rank, size=spec["size"], prefix=spec["prefix"], backend=spec["backend"],
                                 timeout_s=config.tp_timeout_s)
        runner = ModelRunner(config, model_config_for(config), device, groups.info)
        worker = TPWorker(groups=groups, runner=runner, config=config, memory=DeviceMemory(runner=runner),
                          relay_group=WeightsGroup("tensor-parallel relay", groups.device, rank, groups.size, groups.backend, device,
                                                   op_timeout_s=config.step_timeout_s),
                          rollback=RollbackBuffer(device_budget_bytes=config.rollback_device_budget_bytes, arena=HostArena()))
        groups.bound_steps(config.step_timeout_s)  # a rank 0 hung mid-step ends this worker as a hung worker ends rank 0's step
        store.set(f"ready/{rank}", "")
    except BaseException as exc:
        store.set(f"error/{rank}", f"{type(exc).__name__}: {exc}")
        os._exit(1)
    try:
        worker.serve()
    except BaseException:
        log.exception("tensor-parallel worker rank %d failed; exiting (rank 0 sees the closed connection)", rank)
        os._exit(1)
    os._exit(0)  # skip tearing the groups down: rank 0 may already be gone
