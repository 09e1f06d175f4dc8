"""The WeightUpdater component: the weight-update handlers, one per source, each
source -> session -> ranks -> commit.

A source module (`weights/sources/`) turns the request into what to copy or a refusal; the session
machine (`weights/session.py`) runs the call inside the open session or one of its own and commits or
rolls back; `weights/apply.py` copies on this rank, and `ranks` (a `WeightRanks`: `LocalRanks`, or
`TPPeers` under tensor parallelism) has every other rank do the same with its slices and agree on the
outcome. A weight update needs the weights resident, not the KV cache (SGLang's rule).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from hotswap import protocol as p
from hotswap.config import EngineConfig
from hotswap.errors import HotswapError
from hotswap.runner.model_runner import ModelRunner
from hotswap.scheduler.copy_replies import CopyReplies
from hotswap.weights.apply import apply_read, apply_tensors
from hotswap.weights.checkpoint_engine_receiver import BufferSource, ReceiveStats, find_address, refuse_exchange
from hotswap.weights.distributed import WeightsGroupError
from hotswap.weights.distributed_receiver import ShortBroadcast, plan_receive, receive_bucket
from hotswap.weights.fast_copy import MatchedTensors, TensorPlanCache
from hotswap.weights.fast_reader import ReaderOptions, ReadPlanCache, ReadStats
from hotswap.weights.ipc import CudaIpcMappings
from hotswap.weights.ranks import WeightRanks
from hotswap.weights.session import Sessions, UpdateFailed, UpdateSession, version_problem
from hotswap.weights.sources import checkpoint_engine, disk, distributed, tensor
from hotswap.wire.ipc import shm_block_prefix
from hotswap.wire.process_group import short_error


@dataclass(kw_only=True, slots=True)
class WeightUpdater:
    model_runner: ModelRunner
    config: EngineConfig
    sessions: Sessions
    ranks: WeightRanks
    weights_released: Callable[[], bool]
    abort_all: Callable[[str], int]
    groups: distributed.WeightGroups
    copies: CopyReplies  # tensor updates whose copies still run, their replies held (the scheduler's)
    tensor_plans: TensorPlanCache = field(default_factory=TensorPlanCache)  # names -> slots, for repeated tensor updates
    read_plans: ReadPlanCache = field(default_factory=ReadPlanCache)  # checkpoint layout -> validated read tasks
    ipc_mappings: CudaIpcMappings = field(init=False)  # CUDA IPC storages kept open between updates
    ipc_source: BufferSource = field(default_factory=BufferSource)  # checkpoint-engine's buffers: CUDA IPC (tests: a CPU stand-in)
    last_read: ReadStats | None = None  # how the last disk load read its checkpoint

    def __post_init__(self) -> None:
        self.ipc_mappings = CudaIpcMappings(self.config.cuda_ipc_cache_bytes)

    def close(self) -> None:
        """At engine shutdown: unmap kept IPC storages (they pin the producer's memory) and drop caches, and leave
        every trainer group (each is registered in this process's torch.distributed state under its name: left
        there, an Engine made later in the same process could never join that name again)."""
        for group in list(self.groups.groups.values()):
            group.destroy()
        self.groups.groups.clear()
        self.ipc_mappings = CudaIpcMappings(0)
        self.tensor_plans, self.read_plans = TensorPlanCache(), ReadPlanCache()
        self.sessions.session = None

    def _run(self, kind: str, req, apply: Callable[[UpdateSession], tuple[int, int]], *,
             abort_all_requests: bool = False, sync: bool = True) -> p.WeightUpdateOutput:
        """Run a call whose source passed its checks. `abort_all_requests` (SGLang's field) aborts every request
        here, once nothing refuses the call: an update refused for its input (a path, a payload, names, shapes, a
        version) aborts nothing, as it changes nothing."""
        if self.weights_released():
            return self.sessions.refuse(f"{kind} refused: the weights are released; resume_memory_occupation(['weights']) first")
        abort = (lambda: self.abort_all(f"aborted for a weight update ({kind})")) if abort_all_requests else None
        return self.sessions.run(kind, req.weight_version, apply, session_id=req.session_id, on_start=abort, sync=sync)

    def _load(self, session: UpdateSession, matched: MatchedTensors, *, source_can_fail: bool) -> int:
        return apply_tensors(matched, finite=self.config.check_weights_finite,
                             rollback=self.sessions.guard(session, source_can_fail=source_can_fail))

    # ---- sources ----------------------------------------------------------------------------------

    def update_weights_from_disk(self, req: p.UpdateWeightsFromDiskRequest) -> p.WeightUpdateOutput:
        options, timeout_s = ReaderOptions.from_config(self.config), self.config.weight_read_timeout_s
        try:
            disk.check_request(req)
            read = disk.plan_disk(req.model_path, self.model_runner.weight_map, self.read_plans, options, timeout_s)
        except HotswapError as exc:
            return self.sessions.refuse_update(f"update_weights_from_disk refused: {exc}; weights unchanged", req.session_id)

        def apply(session: UpdateSession) -> tuple[int, int]:
            self.ranks.apply_disk(req.model_path)  # every other rank reads its own slices meanwhile
            self.last_read = apply_read(read, options, rollback=self.sessions.guard(session, source_can_fail=True), timeout_s=timeout_s)
            return len(read.slots), self.last_read.nbytes

        return self._run("update_weights_from_disk", req, apply, abort_all_requests=req.abort_all_requests)

    def update_weights_from_tensor(self, req: p.UpdateWeightsFromTensorRequest) -> p.WeightUpdateOutput | Future:
        """On one GPU rank the call returns once its copies are launched: its reply (a Future) is sent when they ran, and
        the next call is taken meanwhile (scheduler/copy_replies.py). Any other call finds no copy held: only such calls
        hold one, and every other control request (ending a session among them) waited for them."""
        deferred = self.replies_after_copies()
        start = time.perf_counter()
        try:
            matched = tensor.match_tensors(req, self.model_runner.weight_map, self.ipc_mappings, self.tensor_plans,
                                           shm_prefix=shm_block_prefix(self.config.ipc_token))
        except HotswapError as exc:
            return self._in_order(self.sessions.refuse_update(f"update_weights_from_tensor refused: {exc}; weights unchanged",
                                                              req.session_id), start)
        validate_s = time.perf_counter() - start

        def apply(session: UpdateSession) -> tuple[int, int]:
            # the tensors are here only: the other ranks get them broadcast and take their slices
            self.ranks.relay([(name, t) for name, _, t in matched.items], self.config.weight_update_bucket_bytes)
            return len(matched.items), self._load(session, matched, source_can_fail=False)

        out = self._run("update_weights_from_tensor", req, apply, abort_all_requests=req.abort_all_requests, sync=not deferred)
        out.extra.validate_s = validate_s
        if deferred and out.success:
            return self.copies.defer(out, start, keep_alive=matched)
        return self._in_order(out, start)  # a failed call waited for what it launched (Sessions.run)

    def _in_order(self, out: p.WeightUpdateOutput, start: float) -> p.WeightUpdateOutput | Future:
        """A call that launched no copy of its own replies at once, unless earlier calls' replies are still held (only
        where replies wait for copies): then behind them, so a trainer hears of its buckets in the order it sent them."""
        return self.copies.defer(out, start, keep_alive=None) if self.copies.pending else out

    def replies_after_copies(self) -> bool:
        """A tensor update now may reply once its copies ran while the next call is taken: on one GPU rank, inside a
        session or not. Inside one a call first saves the originals it overwrites (weights/rollback.py: the copies
        wait for the saves on the device), and whatever rolls back (a later call failing, an abort, an expiry)
        synchronises before restoring, so a held reply means what it would have meant. Other ranks agree on each call,
        so there every call replies after a synchronisation."""
        return self.ranks.size == 1 and self.model_runner.device.type == "cuda"

    def update_weights_from_ipc(self, req: p.UpdateWeightsFromIPCRequest) -> p.WeightUpdateOutput:
        """checkpoint-engine's push: buckets arrive one by one over ZMQ; a failure in a later bucket rolls
        back the earlier ones."""
        device, timeout_s = self.model_runner.device, self.config.weight_session_timeout_s
        try:
            address = find_address(req.zmq_handles, self.ipc_source.device_key(device))
        except HotswapError as exc:
            return self.sessions.refuse_update(f"update_weights_from_ipc refused: {exc}; weights unchanged", req.session_id)
        try:
            checkpoint_engine.check_ranks(self.ranks.size)
        except HotswapError as exc:
            out = self.sessions.refuse_update(str(exc), req.session_id)
            refuse_exchange(address, out.message, timeout_s=timeout_s)
            return out
        received: list[ReceiveStats] = []
        took_part = []

        def apply(session: UpdateSession) -> tuple[int, int]:
            took_part.append(True)
            received.append(checkpoint_engine.receive(address, device, self.ipc_source, timeout_s, self.model_runner.weight_map,
                                                      self.tensor_plans, lambda m: self._load(session, m, source_can_fail=True)))
            return received[0].num_tensors, received[0].num_bytes

        out = self._run("update_weights_from_ipc", req, apply)
        if not took_part:  # refused before the exchange began
            refuse_exchange(address, out.message, timeout_s=timeout_s)
        if received:
            out.extra.buckets = received[0].num_buckets
        return out

    def init_weights_update_group(self, req: p.InitWeightsUpdateGroupRequest) -> p.ControlOutput | Future:
        return self.groups.init(req)

    def destroy_weights_update_group(self, req: p.DestroyWeightsUpdateGroupRequest) -> p.ControlOutput:
        return self.groups.destroy(req.group_name)

    def update_weights_from_distributed(self, req: p.UpdateWeightsFromDistributedRequest, *,
                                        refusal: str | None = None) -> p.WeightUpdateOutput:
        """Lockstep with the trainer: once the group exists and the metadata can be received, take part in
        every broadcast the request announces, then decide (session state, names, shapes, values): a call of a
        session that is not open receives its bucket too, then is refused; so is one given a `refusal` (the
        scheduler's, for an update that waited too long for a drain: the trainer broadcast it meanwhile). The
        output's `extra.received` tells the trainer whether lockstep held."""
        def refuse(message: str) -> p.WeightUpdateOutput:
            out = self.sessions.refuse_update(f"update_weights_from_distributed refused: {message}", req.session_id)
            out.extra.received = False
            return out

        if self.ranks.broken is not None:
            return refuse(self.ranks.broken)  # before receiving: the trainer learns at once that lockstep is gone
        group = None
        try:
            group = self.groups.get(req.group_name)
            # metadata that cannot be received at all is refused up front
            metas = plan_receive(req.names, req.dtypes, req.shapes, req.load_format, max_bytes=self.config.weight_update_bucket_bytes,
                                 max_numel=self.model_runner.weight_map.max_numel)
        except HotswapError as exc:
            if group is not None:
                # the trainer broadcasts the bucket meanwhile (SGLang's contract) and nothing here takes part: the
                # group's next receive would take that broadcast as its own bucket (another tensor's bytes loaded,
                # or a longer broadcast that aborts the process under gloo). Tear the group down: this frees the
                # trainer's broadcast with an error, and later calls are refused until the group is made again.
                group.mark_broken(f"a bucket was refused before receiving it, lockstep with the trainer is lost: {exc}")
            return refuse(str(exc))
        self.ranks.receive(req.group_name, req.names, req.dtypes, req.shapes, req.load_format)  # every rank is a member
        recv_error = refused = None
        try:
            received = receive_bucket(group, metas, req.load_format)
        except ShortBroadcast as exc:  # every broadcast completed (lockstep held), with less than announced
            received, refused = [], str(exc)
        except Exception as exc:  # a dead or hung trainer: the group is now broken
            received, recv_error = [], str(exc) if isinstance(exc, WeightsGroupError) else short_error(exc)
        other = self.ranks.agree(recv_error)
        # lockstep is lost on another rank: this group is unusable too (a short broadcast reaches every rank
        # alike: each refuses it, and lockstep holds)
        if recv_error is None and refused is None and other is not None:
            recv_error = other
            group.mark_broken(other)

        def apply(session: UpdateSession) -> tuple[int, int]:
            self.ranks.apply_received()
            if recv_error is not None:
                raise UpdateFailed(f"receiving the bucket failed: {recv_error}")
            if refused is not None:
                raise UpdateFailed(refused)
            if refusal is not None:
                raise UpdateFailed(refusal)
            matched = self.tensor_plans.match(self.model_runner.weight_map, list(zip([m.name for m in metas], received)))
            return len(matched.items), self._load(session, matched, source_can_fail=False)

        out = self._run("update_weights_from_distributed", req, apply, abort_all_requests=req.abort_all_requests)
        if recv_error is not None and recv_error not in out.message:
            out.message += f" (receiving the bucket also failed: {recv_error})"
        out.extra.received = recv_error is None
        return out

    # ---- explicit sessions and the version -------------------------------------------------------

    def begin_weight_update(self, req: p.BeginWeightUpdateRequest) -> p.BeginWeightUpdateOutput:
        if self.weights_released():
            return p.BeginWeightUpdateOutput(success=False, message="begin_weight_update refused: the weights are released; resume them first")
        return self.sessions.begin()

    def end_weight_update(self, req: p.EndWeightUpdateRequest) -> p.WeightUpdateOutput:
        return self.sessions.end(req.weight_version, req.abort, req.session_id)

    def post_process_weights(self, req: p.PostProcessWeightsRequest) -> p.ControlOutput:
        """Nothing to do, and it says so: every weight is held in the layout it is loaded in (no quantized or repacked
        weights to restore before an update or rebuild after it), as SGLang's hooks do nothing for unquantized layers."""
        asked = [name for name in ("restore_weights_before_load", "post_process_quantization") if getattr(req, name)]
        return p.ControlOutput(success=True, message=f"post_process_weights ({', '.join(asked) or 'nothing asked'}): no weight needs it, "
                                                     "every weight is held in the layout it is loaded in; weights unchanged")

    def update_weight_version(self, req: p.UpdateWeightVersionRequest) -> p.ControlOutput:
        bad_version = version_problem(req.new_version, "new_version")
        if bad_version is not None:
            return p.ControlOutput(success=False, message=f"update_weight_version refused: {bad_version}")
        if req.abort_all_requests:
            self.abort_all("aborted by update_weight_version")
        self.sessions.set_version(req.new_version)
        return p.ControlOutput(success=True, message=f"weight version is now {self.sessions.weight_version}")
