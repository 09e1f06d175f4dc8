"""A trainer's torch.distributed group: joining and leaving it (a push's buckets: `weights.distributed_receiver`).

Joining blocks until the trainer and every other rank arrive, so it runs on a helper thread and answers
through a Future; the answer comes within `timeout_s` (plus a short grace) even when the rendezvous
itself never returns (a master that accepts TCP and never answers): the attempt is then given up, its
name is free again (destroy answers, a retry may reuse it), and a join that completes later is left at
once. Under tensor parallelism rank r joins as rank_offset + r and the group is kept only if every rank
joined (`WeightRanks.settle_join`)."""

from __future__ import annotations

import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import timedelta

import torch

from hotswap import protocol as p
from hotswap.errors import HotswapError, shown
from hotswap.weights.distributed import WeightsGroup
from hotswap.weights.ranks import WeightRanks
from hotswap.wire.process_group import (
    destroy_custom_process_group,
    forget_reservation,
    init_custom_process_group,
    short_error,
    tcp_init_method,
)

_MAX_WORLD_SIZE = 2**31 - 1  # torch.distributed ranks are 32-bit
MAX_TIMEOUT_S = 86400.0  # a group's timeout bounds every wait on it: a day at most (time_t and timedelta overflow far beyond)


def join_deadline_s(timeout_s: float) -> float:
    """When a join is given up: torch's rendezvous and the group's setup each honour timeout_s, give or take
    (under load they overshoot by seconds); a rendezvous that never returns is answered at this point."""
    return timeout_s + 2.0 + 0.25 * timeout_s


@dataclass(slots=True)
class _Join:
    future: Future
    lock: threading.Lock = field(default_factory=threading.Lock)
    settled: bool = False  # the join thread decided (under the lock)
    abandoned: bool = False  # the deadline answered first (under the lock)


@dataclass(kw_only=True, slots=True)
class WeightGroups:
    ranks: WeightRanks
    device: torch.device
    op_timeout_s: float  # a collective in a joined group
    groups: dict[str, WeightsGroup] = field(default_factory=dict)
    pending: dict[str, _Join] = field(default_factory=dict)  # rendezvous under way in a helper thread

    def _check(self, req: p.InitWeightsUpdateGroupRequest) -> tuple[str, str] | str:
        """(backend, init_method), or why the request is refused."""
        name = req.group_name
        if name in self.groups or name in self.pending:
            state = "is still being set up" if name in self.pending else "already exists"
            return f"weights update group {shown(name)} {state}; destroy it or use another group_name"
        backend = req.backend or ("nccl" if self.device.type == "cuda" else "gloo")
        if backend not in ("gloo", "nccl"):
            return f"unsupported backend {shown(backend)}; use 'nccl' (CUDA) or 'gloo'"
        if backend == "nccl" and self.device.type != "cuda":
            return "backend 'nccl' needs a CUDA engine; use 'gloo' on the CPU"
        for key in ("master_port", "rank_offset", "world_size"):
            if not isinstance(getattr(req, key), int) or isinstance(getattr(req, key), bool):
                return f"{key} must be an integer, got {shown(getattr(req, key))}"
        if not 0 < req.master_port < 65536:
            return f"master_port must be a TCP port (1..65535), got {req.master_port}"
        if req.world_size > _MAX_WORLD_SIZE:  # torch.distributed ranks are 32-bit
            return f"world_size must be at most {_MAX_WORLD_SIZE}, got {req.world_size}"
        rank, last = req.rank_offset, req.rank_offset + self.ranks.size - 1
        if not 0 < rank <= last < req.world_size:
            ranks = f"engine rank {rank}" if rank == last else f"engine ranks {rank}..{last} (one per tensor-parallel rank)"
            return f"{ranks} (rank_offset {req.rank_offset}) must be in 1..world_size-1={req.world_size - 1}"
        if isinstance(req.timeout_s, bool) or not isinstance(req.timeout_s, (int, float)) or not 0 < req.timeout_s <= MAX_TIMEOUT_S:
            return f"timeout_s must be positive and at most {MAX_TIMEOUT_S:g} s, got {shown(req.timeout_s)}"  # NaN and inf included
        return backend, tcp_init_method(str(req.master_address), req.master_port)

    def init(self, req: p.InitWeightsUpdateGroupRequest) -> p.ControlOutput | Future:
        checked = self._check(req)
        if isinstance(checked, str):
            return p.ControlOutput(success=False, message=checked)
        backend, where = checked
        name, rank, last = req.group_name, req.rank_offset, req.rank_offset + self.ranks.size - 1
        ranks = f"rank {rank}" if rank == last else f"ranks {rank}..{last}"
        key = self.ranks.init_group({"group_name": name, "init_method": where, "world_size": req.world_size, "rank_offset": rank,
                                     "backend": backend, "timeout_s": req.timeout_s})  # the workers join in threads of their own
        attempt = self.pending[name] = _Join(future=Future())

        def failed(why: str) -> p.ControlOutput:
            return p.ControlOutput(success=False, message=(
                f"failed to join weights update group {shown(name)} at {where} as {ranks} of {req.world_size} within {req.timeout_s:g} s "
                f"(the trainer must create it as rank 0 there, with every other rank joining): {why}"))

        def join() -> None:
            pg, failure = None, None
            try:
                pg = init_custom_process_group(backend=backend, init_method=where, world_size=req.world_size, rank=rank,
                                               group_name=name, timeout=timedelta(seconds=req.timeout_s))
            except Exception as exc:
                failure = short_error(exc)
            if failure is None and attempt.abandoned:
                failure = "given up at the deadline"
            failure = self.ranks.settle_join(key, failure, req.timeout_s)
            with attempt.lock:
                keep = failure is None and not attempt.abandoned
                attempt.settled = True
            if not keep:
                if pg is not None:
                    destroy_custom_process_group(pg)
                if attempt.abandoned:
                    return  # already answered
                out = failed(failure)
            else:
                # one dict store, atomic under the GIL; the scheduler thread only reads this dict
                self.groups[name] = WeightsGroup(name, pg, rank, req.world_size, backend, self.device, op_timeout_s=self.op_timeout_s)
                out = p.ControlOutput(success=True, message=f"joined group {shown(name)} as {ranks} of {req.world_size} ({backend})")
            self.pending.pop(name, None)
            attempt.future.set_result(out)

        def give_up() -> None:
            with attempt.lock:
                if attempt.settled:
                    return
                attempt.abandoned = True
            if self.pending.get(name) is attempt:
                del self.pending[name]
            forget_reservation(name)
            attempt.future.set_result(failed("timed out: no answer from the rendezvous; the attempt was given up and the name is free again"))

        threading.Thread(target=join, name=f"hotswap-join-{name}", daemon=True).start()
        timer = threading.Timer(join_deadline_s(req.timeout_s), give_up)
        timer.daemon = True
        timer.start()
        attempt.future.add_done_callback(lambda _f: timer.cancel())
        return attempt.future

    def destroy(self, name: str) -> p.ControlOutput:
        group = self.groups.pop(name, None)
        if group is None:
            pending = " (it is still being set up)" if name in self.pending else ""
            return p.ControlOutput(success=False, message=f"no weights update group named {shown(name)}{pending}")
        self.ranks.destroy_group(name)
        note = group.destroy()  # a dead peer can make teardown complain; the group is gone either way
        extra = "".join(f" ({x})" for x in (f"it was broken: {group.broken}" if group.broken else None, note) if x)
        return p.ControlOutput(success=True, message=f"group {shown(name)} destroyed{extra}")

    def get(self, name: str) -> WeightsGroup:
        """The usable group of that name; raises HotswapError saying why there is none."""
        group = self.groups.get(name)
        if group is None:
            pending = " (it is still being set up)" if name in self.pending else ""
            raise HotswapError(f"no weights update group {shown(name)}{pending}; call init_weights_update_group first")
        if group.broken is not None:
            raise HotswapError(f"weights update group {shown(name)} is broken ({group.broken}); destroy it and init a new one")
        return group

