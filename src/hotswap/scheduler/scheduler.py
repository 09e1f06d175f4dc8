"""The scheduler: owns all device state, runs in one thread, and reads top to bottom:
receive requests -> dispatch control requests through one table -> schedule a batch -> run it ->
process and stream its outputs.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from functools import partial

import torch

from hotswap import protocol as p
from hotswap.cache.page_allocator import PageAllocator, PoolCapacity
from hotswap.cache.radix_cache import RadixPrefixCache
from hotswap.config import EngineConfig
from hotswap.errors import BatchRowError, shown
from hotswap.runner.device_memory import DeviceMemory
from hotswap.runner.model_runner import ModelRunner
from hotswap.scheduler.batcher import Batcher, ScheduledBatch
from hotswap.scheduler.cache_flush import CacheFlush
from hotswap.scheduler.copy_replies import CopyReplies
from hotswap.scheduler.invariant_checker import InvariantChecker
from hotswap.scheduler.load_stats import LoadStats, cache_hit_rate, utilization
from hotswap.scheduler.memory_manager import MemoryManager
from hotswap.scheduler.output_streamer import OutputStreamer
from hotswap.scheduler.overlap import InFlight, mark_sample_rows, must_drain_before, sampled_on_device, undo_launch
from hotswap.scheduler.pause import GenerationPause
from hotswap.scheduler.profiler import StepProfiler
from hotswap.scheduler.sequence import Sequence, Status
from hotswap.scheduler.step_output import hand_out
from hotswap.scheduler.watchdog import StepWatchdog
from hotswap.scheduler.weight_reads import WeightReads
from hotswap.scheduler.weight_updater import WeightUpdater
from hotswap.weights.ranks import LocalRanks
from hotswap.weights.session import Sessions
from hotswap.weights.sources.distributed import WeightGroups

log = logging.getLogger(__name__)


_GENERATE = (p.GenerateBatch, p.GenerateRequest)  # taken with a step in flight; every other request drains it first
# taken while tensor updates' copies still run (scheduler/copy_replies.py): generation, the next such call, and /get_load
# (routers poll it; it reads counters and the version committed); every other request waits for the copies first
_BESIDE_COPIES = (*_GENERATE, p.UpdateWeightsFromTensorRequest, p.GetLoadRequest)

# Weight-changing requests wait for running requests to finish on the old weights (SGLang's default),
# unless generation is paused, a weight-update session is open, or the request aborts everything.
_DRAIN_FIRST = (
    p.UpdateWeightsFromDiskRequest,
    p.UpdateWeightsFromTensorRequest,
    p.UpdateWeightsFromDistributedRequest,
    p.UpdateWeightsFromIPCRequest,
    p.BeginWeightUpdateRequest,
)


def _abort_reason(seq: Sequence, message: str) -> dict:
    """An aborted request's finish_reason. One aborted before its prefill began says so first, as SGLang's
    tokenizer manager does (`_handle_abort_req`: "Abort before prefill"; AReaL's parse_generation_response
    reads that prefix as "no tokens, send it again")."""
    ran = seq.admitted or seq.output_ids  # a preempted request back in the queue has run
    return {"type": "abort", "message": message if ran else f"Abort before prefill: {message}"}


class Scheduler:
    def __init__(self, config: EngineConfig, model_runner: ModelRunner, tokenizer, eos_token_ids: list[int], max_context_len: int):
        self.config = config
        self.model_runner = model_runner
        kv = model_runner.kv_cache  # the scheduler owns the page bookkeeping; the runner only the storage
        self.allocator = PageAllocator(num_pages=kv.num_pages, page_size=kv.page_size)
        self.prefix_cache = RadixPrefixCache(self.allocator) if config.enable_prefix_cache else None
        self.batcher = Batcher(
            allocator=self.allocator,
            prefix_cache=self.prefix_cache,
            fail=lambda seq, message: self.finish(seq, {"type": "abort", "message": message}),
            max_running_requests=config.max_running_requests,
            max_num_batched_tokens=config.max_num_batched_tokens,
            chunked_prefill_size=config.chunked_prefill_size if config.chunked_prefill_size > 0 else config.max_num_batched_tokens,
            max_context_len=max_context_len,
            eos_token_ids=frozenset(eos_token_ids),
        )
        self.streamer = OutputStreamer(tokenizer=tokenizer, eos_token_ids=frozenset(eos_token_ids), max_context_len=max_context_len,
                                       stream_interval=config.stream_interval)
        self.invariants = InvariantChecker(allocator=self.allocator, prefix_cache=self.prefix_cache)
        self.cache_flush = CacheFlush(num_running=lambda: len(self.batcher.running), invalidate_cache=self.batcher.invalidate_cache,
                                      retract_all=self.batcher.retract_all)
        ranks = model_runner.tp_peers or LocalRanks()
        self.sessions = Sessions(
            ranks=ranks,
            device_budget_bytes=config.rollback_device_budget_bytes,
            invalidate_cache=self.batcher.invalidate_cache,
            timeout_s=config.weight_session_timeout_s,
            synchronize=self._synchronize,
            enable_rollback=config.enable_rollback,
            lend_scratch=self.lend_kv_pool,
        )
        self.memory = MemoryManager(device_memory=DeviceMemory(runner=model_runner), why_not_release=self.why_memory_may_not_change,
                                    reset_prefix_cache=self.cache_flush.flush, weights_discarded=lambda: self.sessions.mark("discarded"),
                                    peers=model_runner.tp_peers)
        self.pause = GenerationPause(sessions=self.sessions, abort_all=self.abort_all, retract_all=self.batcher.retract_all)
        self.copies = CopyReplies()
        self.weight_updater = WeightUpdater(
            model_runner=model_runner,
            config=config,
            sessions=self.sessions,
            ranks=ranks,
            weights_released=self.memory.weights_released,
            abort_all=self.abort_all,
            groups=WeightGroups(ranks=ranks, device=model_runner.device, op_timeout_s=config.weight_session_timeout_s),
            copies=self.copies,
        )
        self.weight_reads = WeightReads(model_runner=model_runner, config=config, ranks=ranks, weights_released=self.memory.weights_released,
                                        is_idle=self.is_idle, flush_cache=self.cache_flush.flush, mark_version=self.sessions.mark)
        self.profiler = StepProfiler(device=model_runner.device, steps=lambda: self.num_steps)
        self.handlers = {
            p.GenerateRequest: self.add_request,
            p.GenerateBatch: self.add_requests,
            p.AbortRequest: self.abort,
            p.FlushCacheRequest: self.cache_flush.handle,
            p.GetLoadRequest: self.get_load,
            p.CheckInvariantsRequest: self.check_invariants,
            p.StartProfileRequest: self.profiler.start_profile,
            p.StopProfileRequest: self.profiler.stop_profile,
            p.FreezeGCRequest: self.freeze_gc,
            p.UpdateWeightsFromDiskRequest: self.update_weights_from_disk,
            p.UpdateWeightsFromTensorRequest: self.weight_updater.update_weights_from_tensor,
            p.UpdateWeightsFromIPCRequest: self.weight_updater.update_weights_from_ipc,
            p.InitWeightsUpdateGroupRequest: self.weight_updater.init_weights_update_group,
            p.UpdateWeightsFromDistributedRequest: self.weight_updater.update_weights_from_distributed,
            p.DestroyWeightsUpdateGroupRequest: self.weight_updater.destroy_weights_update_group,
            p.GetWeightsByNameRequest: self.weight_reads.get_weights_by_name,
            p.CheckWeightsRequest: self.weight_reads.check_weights,
            p.SaveShardedModelRequest: self.weight_reads.save_sharded_model,
            p.SaveRemoteModelRequest: self.weight_reads.save_remote_model,
            p.PauseGenerationRequest: self.pause.pause_generation,
            p.ContinueGenerationRequest: self.pause.continue_generation,
            p.UpdateWeightVersionRequest: self.weight_updater.update_weight_version,
            p.PostProcessWeightsRequest: self.weight_updater.post_process_weights,
            p.BeginWeightUpdateRequest: self.weight_updater.begin_weight_update,
            p.EndWeightUpdateRequest: self.weight_updater.end_weight_update,
            p.ReleaseMemoryOccupationRequest: self.memory.release_memory_occupation,
            p.ResumeMemoryOccupationRequest: self.memory.resume_memory_occupation,
        }
        self.inbox: queue.Queue[tuple[object, Future | None]] = queue.Queue()
        # control requests in the inbox: the step in flight is read back before one is taken; new generate requests
        # are taken beside it (their admission waits for the next schedule anyway), so arrivals keep the overlap
        self._controls_queued = 0
        self._controls_lock = threading.Lock()
        self._held: tuple[object, Future | None] | None = None  # a control request taken behind generate ones, mid-step
        self.deferred: deque[tuple[object, Future, float]] = deque()  # weight updates waiting for a drain, with their deadline
        self.num_steps = 0  # steps read back: profiling runs count them, /get_load reports them
        self.load_stats = LoadStats()  # /v1/loads' gen_throughput
        self._stop = threading.Event()
        self.dead: str | None = None  # why the loop stopped on an error: every request fails with it from then on
        self.thread = threading.Thread(target=self._run, name="hotswap-scheduler", daemon=True)
        self.watchdog = StepWatchdog(timeout_s=config.step_timeout_s)  # a step that hangs fails the engine (Engine.failure)

    # ---- the loop --------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()
        self.watchdog.start()

    def stop(self) -> None:
        """Stop the loop; whatever it had not answered (deferred or still queued requests) fails with the
        reason, so no caller waits on a loop that is gone."""
        self._stop.set()
        self.watchdog.stop()
        self.inbox.put((None, None))
        self.thread.join(timeout=30)
        if self.thread.is_alive():  # a stuck step: its state stays with it
            return
        if self.dead is None:
            self.dead = "the engine was shut down"
        # the loop may stop before it takes the shutdown's AbortRequest: end what runs or waits here, or the
        # callers waiting on those requests (other threads, a front end) wait forever
        self.abort_all(self.dead)
        self._fail_deferred()
        self._fail_queued()

    def submit(self, request) -> Future:
        fut: Future = Future()
        if not isinstance(request, _GENERATE):
            with self._controls_lock:
                self._controls_queued += 1
        self.inbox.put((request, fut))
        if self.dead is not None:  # nothing takes it any more: fail it (and anything queued beside it) now
            self._fail_queued()
        return fut

    def _run(self) -> None:
        """The loop. Should it ever raise, what it holds and whatever is sent later fails with the reason,
        rather than leaving every caller waiting on a thread that is gone."""
        try:
            self.loop()
        except BaseException as exc:
            log.exception("the scheduler loop stopped")
            self.dead = f"the engine's scheduler stopped on an error: {type(exc).__name__}: {exc}"
            try:
                self.abort_all(self.dead)
            except Exception:
                log.exception("aborting the running requests failed too")
            self._fail_deferred()
            self._fail_queued()

    def _fail_deferred(self) -> None:
        deferred, self.deferred = [(r, f) for r, f, _ in self.deferred], deque()
        self._fail(deferred)
        self.cache_flush.fail_waiting(self.dead)
        try:  # copies launched before the loop stopped: their callers get the outcome when the device can say it
            self.copies.settle_all()
        except Exception:
            log.exception("waiting for the tensor updates' copies failed")
        self.copies.fail_all(self.dead)

    def _fail_queued(self) -> None:
        items = [self._held] if self._held is not None and self._held[0] is not None else []
        self._held = None
        while True:
            try:
                items.append(self._took(self.inbox.get_nowait()))
            except queue.Empty:
                return self._fail(items)

    def _fail(self, items: list[tuple[object, Future | None]]) -> None:
        """Answer requests the loop will never take: a generate request gets an aborted output, a control
        request a failed ControlOutput, both saying why."""
        for request, fut in items:
            reqs = request.requests if isinstance(request, p.GenerateBatch) else [request] if isinstance(request, p.GenerateRequest) else []
            for req in reqs:
                seq = Sequence(req=req, finish_reason={"type": "abort", "message": self.dead})
                self.streamer.emit_finished([seq], self.sessions.weight_version)
            if fut is not None:
                _reply(fut, None if reqs else p.ControlOutput(success=False, message=f"{type(request).__name__} not run: {self.dead}"))
        self.streamer.flush()

    def loop(self) -> None:
        """One step stays in flight: the next batch is scheduled and launched (its decode inputs taken
        from the in-flight step's sampled ids on the device) before the in-flight step's outputs are read
        back and processed, so host work overlaps device work. Control requests see no step in flight."""
        if self.model_runner.device.type == "cuda":  # kernels launch on the thread's current device (Triton checks it)
            # the weights' device is indexed even for an engine on plain "cuda" (set_device refuses an unindexed one)
            torch.cuda.set_device(next(self.model_runner.model.parameters()).device)
        inflight: InFlight | None = None
        while not self._stop.is_set():
            control_waiting = self._controls_queued > 0 or self._held is not None
            if must_drain_before(inflight, control_waiting=control_waiting, update_ready=bool(self.deferred) and self.update_may_run()):
                self.process(inflight)
                inflight = None
            idle = self.nothing_to_run() and inflight is None
            if idle and self.copies.pending:  # the copies' replies, unless a request (the next bucket) comes first
                with self.watchdog.watching("a tensor update's copy"):
                    self.copies.wait_oldest(interrupted=lambda: self._held is not None or not self.inbox.empty())
            self.receive(block=idle and not self.copies.pending, step_in_flight=inflight is not None)
            self.copies.settle()
            self.run_deferred()
            self.expire_deferred()
            self.cache_flush.settle()
            self.pause.expire()
            self.expire_held()
            self.refuse_queued_while_released()
            batch = self.schedule()
            launched = self.launch(batch, inflight) if batch is not None else None
            if inflight is not None:
                self.process(inflight)
            inflight = launched
            self.streamer.flush()
            if inflight is None and self.config.check_invariants_when_idle and not self.batcher.has_work:
                self.log_broken_invariants()

    def nothing_to_run(self) -> bool:
        """No step can be scheduled until a request arrives: the loop may block on its inbox."""
        return self.pause.held or self.memory.any_released() or not (self.batcher.has_work or self.deferred)

    def log_broken_invariants(self) -> None:
        problems = self.invariants.check_idle()
        if problems:
            log.error("KV page accounting broken: %s", "; ".join(problems))

    def launch(self, batch: ScheduledBatch, inflight: InFlight | None) -> InFlight | None:
        mark_sample_rows(batch.seqs, batch.entries)
        try:
            with self.watchdog.watching("launching a forward step"):
                result = self.model_runner.run(batch.entries, sampled_on_device(inflight))
        except BatchRowError as exc:  # one request cannot run (found before the forward): it fails alone
            rest = self.drop_row(batch, exc)
            return self.launch(rest, inflight) if rest is not None else None
        except Exception as exc:  # a device fault must not hang clients: fail the batch cleanly
            log.exception("batch failed")
            # undone first: a sequence that stops in the step in flight is cached when it is read back, and must
            # not count the positions only this failed step would have written
            undo_launch(batch.seqs, batch.entries)
            if inflight is not None:
                self.process(inflight)
            for seq in batch.seqs:
                if seq.status is not Status.FINISHED:
                    self.finish(seq, {"type": "abort", "message": f"internal error: {exc}"})
            return None
        return InFlight(seqs=batch.seqs, entries=batch.entries, result=result, version=self.sessions.weight_version)

    def drop_row(self, batch: ScheduledBatch, exc: BatchRowError) -> ScheduledBatch | None:
        """Fail the request of the row `exc` names, undoing its share of the launch; the rest of the batch,
        or None when nothing is left."""
        k = next(k for k, entry in enumerate(batch.entries) if entry is exc.entry)
        seq, entry = batch.seqs[k], batch.entries[k]
        log.warning("request %s failed alone: %s", seq.rid, exc)
        seq.pending -= entry.sample  # a token of the step in flight may still be pending: keep its count
        seq.num_computed = entry.start_pos
        self.finish(seq, {"type": "abort", "message": str(exc)})
        seqs, entries = batch.seqs[:k] + batch.seqs[k + 1:], batch.entries[:k] + batch.entries[k + 1:]
        return ScheduledBatch(seqs=seqs, entries=entries) if entries else None

    def receive(self, block: bool, step_in_flight: bool = False) -> None:
        """Take what the inbox holds, in order. With a step in flight only generate requests are taken: a control
        request met behind them is held (`_held`) until the loop has read the step back."""
        # sessions, queued requests, deferred updates and a flush waiting for running requests expire
        timeout = 0.5 if self.pause.held or self.deferred or self.cache_flush.waiting else None
        if self._held is not None:
            if step_in_flight:
                return
            item, self._held = self._held, None
        else:
            try:
                item = self._took(self.inbox.get(block=block, timeout=timeout if block else None))
            except queue.Empty:
                return
        while item is not None:
            if step_in_flight and not isinstance(item[0], _GENERATE):
                self._held = item
                return
            self.dispatch(*item)
            try:
                item = self._took(self.inbox.get_nowait())
            except queue.Empty:
                item = None

    def _took(self, item: tuple[object, Future | None]) -> tuple[object, Future | None]:
        """An item just taken from the inbox (counted out when it is a control request)."""
        request = item[0]
        if request is not None and not isinstance(request, _GENERATE):
            with self._controls_lock:
                self._controls_queued -= 1
        return item

    def dispatch(self, request, fut: Future | None) -> None:
        if request is None:
            return
        waits_for_drain = isinstance(request, p.PauseGenerationRequest) and request.mode == "wait"  # vLLM's wait mode
        # an update of a session that is not open is refused at once: it waits for nothing; one that aborts every
        # request (abort_all_requests) runs at once too, and aborts them once its input passed its checks (WeightUpdater._run)
        if isinstance(request, _DRAIN_FIRST) and self.sessions.stale(getattr(request, "session_id", None)) is None:
            waits_for_drain = not getattr(request, "abort_all_requests", False)
        if waits_for_drain and not self.update_may_run():  # started requests finish first, for a bounded time
            self.deferred.append((request, fut, time.monotonic() + self.config.weight_update_drain_timeout_s))
            return
        self._handle(request, fut)

    def _handle(self, request, fut: Future, handler: Callable | None = None) -> None:
        """Run `request` through its handler in the table (or `handler`) and reply."""
        handler = handler or self.handlers.get(type(request))
        if not isinstance(request, _BESIDE_COPIES):
            self.copies.settle_all()
        try:
            out = handler(request) if handler else p.ControlOutput(success=False, message=f"unknown request {type(request).__name__}")
        except Exception as exc:  # handlers return refusals; this is the last guard so the engine survives
            log.exception("handler failed")
            out = p.ControlOutput(success=False, message=f"{type(request).__name__} failed: {exc}")
        # SGLang's num_paused_requests: started requests held across the update (a pause in place or retracted); 0 when
        # the update drained them or aborted them
        paused = self.batcher.num_started if isinstance(request, _DRAIN_FIRST) else None

        def answer(result) -> None:
            if paused is not None and isinstance(result, p.WeightUpdateOutput):
                result.num_paused_requests = paused
            _reply(fut, result)

        if isinstance(out, Future):  # finished later (a group rendezvous off this thread, a tensor update's copies)
            out.add_done_callback(lambda done: answer(done.result()))
            return
        answer(out)

    def update_may_run(self) -> bool:
        """A weight update runs once every started request has finished on the old weights (SGLang's
        default), including requests preempted for KV space and waiting to resume: resumed under new
        weights, their outputs would match neither policy. A pause or an open session runs it at once."""
        return not self.batcher.has_started or self.pause.held

    def run_deferred(self) -> None:
        while self.deferred and self.update_may_run():
            request, fut, _ = self.deferred.popleft()
            self._handle(request, fut)

    def expire_deferred(self) -> None:
        """A weight update waits for started requests to finish only `weight_update_drain_timeout_s`: then it
        is refused, weights unchanged, and new requests are admitted again (a request may run for a long
        time, or memory released under a started request may keep it from ever finishing)."""
        now = time.monotonic()
        while self.deferred and self.deferred[0][2] <= now:
            request, fut, _ = self.deferred.popleft()
            message = (f"{type(request).__name__} refused: {self.batcher.num_started} started request(s) did not finish within "
                       f"{self.config.weight_update_drain_timeout_s:g} s (weight_update_drain_timeout_s); pause_generation first or pass "
                       "abort_all_requests=true")
            if isinstance(request, p.UpdateWeightsFromDistributedRequest):
                # the trainer broadcast this bucket meanwhile: take part in it, then refuse, so the group's next
                # broadcast is not received as the next call's bucket
                self._handle(request, fut, partial(self.weight_updater.update_weights_from_distributed, refusal=message))
            else:
                _reply(fut, self.sessions.refuse(message + "; weights unchanged"))

    def schedule(self) -> ScheduledBatch | None:
        if self.pause.held or self.memory.any_released():
            return None
        # while a weight update waits for running requests to drain, admit nothing new
        return self.batcher.schedule(admit_new=not self.deferred)

    def process(self, step: InFlight) -> None:
        """Read back a step's sampled tokens and hand them to their sequences."""
        self.num_steps += 1
        if self.profiler.run is not None:
            self.profiler.after_step(self.num_steps)
        if step.result is None:
            return
        with self.watchdog.watching("reading back a forward step"):  # the device sync: where a hung kernel shows
            tokens = step.result.to_lists()
        done, generated = hand_out(step, tokens, self.streamer)
        if done:
            self.finish_all(done, settled=True)
        self.load_stats.on_step(generated, busy=self.batcher.has_work)

    # ---- request handlers owned by the scheduler itself ------------------------------------------

    def add_requests(self, batch: p.GenerateBatch) -> None:
        for req in batch.requests:
            self.add_request(req)

    def add_request(self, req: p.GenerateRequest) -> None:
        seq = Sequence(req=req)
        # nothing can run until a resume, which may never come: refuse now. While generation is held (paused,
        # a weight-update session) a request queues like any other, as behind SGLang's pause gate (tokenizer
        # manager: every generate waits for continue before anything else); if memory is still released when
        # the hold ends, refuse_queued_while_released refuses it then.
        if self.memory.any_released() and not self.pause.held:
            self.finish(seq, self._released_refusal())
            return
        if req.sampling_params.max_new_tokens == 0 and seq.prompt_logprobs_owed >= seq.prompt_len - 1:
            self.finish(seq, {"type": "length", "length": 0})  # nothing to sample, no prompt position to score
            return
        if self.allocator.pages_for(len(req.input_ids) + 1) > self.allocator.num_pages:
            self.finish(seq, {"type": "abort", "message": f"prompt of {len(req.input_ids)} tokens does not fit the KV cache"})
            return
        self._clamp_to_kv_cache(req)
        self.batcher.add(seq)

    def _clamp_to_kv_cache(self, req: p.GenerateRequest) -> None:
        """SGLang's init_req_max_new_tokens: max_new_tokens is cut to what the whole KV cache holds beside the prompt
        (max_req_len = max_total_num_tokens - 1, less the prompt and one), so a request longer than the cache finishes
        with "length" at that point instead of being aborted there (an abort AReaL re-sends, as prompt + output,
        forever: that prompt no longer fits)."""
        sp = req.sampling_params
        limit = max(1, self.allocator.num_pages * self.allocator.page_size - 2 - len(req.input_ids))
        if sp.max_new_tokens > limit:
            req.sampling_params = dataclasses.replace(sp, max_new_tokens=limit, min_new_tokens=min(sp.min_new_tokens, limit))

    def _released_refusal(self) -> dict:
        return {"type": "abort", "status_code": 503,
                "message": f"generation is unavailable: memory is released ({', '.join(sorted(self.memory.released))}); "
                           "resume_memory_occupation first"}

    def refuse_queued_while_released(self) -> None:
        """Requests that queued during a pause may outlive it while memory stays released (continue before
        resume, vLLM's sleep): nothing can run them, so they get the refusal a new request gets."""
        if self.pause.held or not self.batcher.waiting or not self.memory.any_released():
            return
        queued = list(self.batcher.waiting)
        for seq in queued:
            seq.finish_reason = self._released_refusal()
        self.finish_all(queued)

    def expire_held(self) -> None:
        """While generation is held (paused, or a weight-update session is open) new requests queue, as in
        SGLang, but only for `max_queue_wait_s`: then they are refused, saying why."""
        if not self.pause.held or not self.batcher.waiting:
            return
        limit = self.config.max_queue_wait_s
        deadline = time.monotonic() - limit
        expired = [s for s in self.batcher.waiting if not s.output_ids and s.req.submitted_at < deadline]
        if expired:
            why = "generation is paused" if self.pause.paused else "a weight-update session is open"  # a pause holds a session too
            for seq in expired:
                seq.finish_reason = {"type": "abort", "status_code": 503,
                                     "message": f"generation is unavailable: {why}; the request waited {limit:g} s (max_queue_wait_s)"}
            self.finish_all(expired)

    def finish(self, seq: Sequence, reason: dict) -> None:
        seq.finish_reason = reason
        self.finish_all([seq])

    def finish_all(self, seqs: list[Sequence], settled: bool = False) -> None:
        """Release finished sequences (their reasons set) and send their last outputs. `settled`: they finish as
        a step is read back, so every position they forwarded was written by a step already complete (the one
        in flight forwards at most their last sampled token, which is not read): their routing is read without
        waiting for it. Otherwise (a row dropped at launch, say) the step in flight may still be writing theirs."""
        table = self.model_runner.routed_experts
        # a request that forwarded nothing (aborted while queued) has no routing: its meta_info leaves the key out, as
        # SGLang's abort of a queued request does (slime reshapes whatever it finds there to prompt + output - 1 rows)
        asking = [s for s in seqs if s.req.sampling_params.return_routed_experts and s.num_computed] if table is not None else []
        # every forwarded position from the asked start (the last sampled token never was), read before the pages go
        spans = [(s.pages, s.req.sampling_params.routed_experts_start_len, min(s.num_computed, s.num_tokens - 1)) for s in asking]
        for seq, routed in zip(asking, table.read_many(spans, settled=settled) if asking else []):
            seq.routed_experts = routed
        for seq in seqs:
            self.batcher.finish(seq)
        self.streamer.emit_finished(seqs, self.sessions.weight_version)

    def abort(self, req: p.AbortRequest) -> p.ControlOutput:
        if req.rid is None:
            n = self.abort_all(req.message)
            return p.ControlOutput(success=True, message=f"aborted {n} request(s)")
        seqs = self.batcher.find(req.rid)
        if not seqs:
            return p.ControlOutput(success=False, message=f"no running or waiting request with id {shown(req.rid)}")
        self.abort_seqs(seqs, req.message)
        return p.ControlOutput(success=True, message=f"aborted {req.rid}" + (f" ({len(seqs)} samples)" if len(seqs) > 1 else ""))

    def abort_all(self, message: str = "aborted") -> int:
        seqs = self.batcher.all_seqs()
        self.abort_seqs(seqs, message)
        return len(seqs)

    def abort_seqs(self, seqs: list[Sequence], message: str) -> None:
        """End `seqs` with finish reason abort and their tokens so far."""
        for seq in seqs:
            seq.finish_reason = _abort_reason(seq, message)
        self.finish_all(seqs)

    def is_idle(self) -> bool:
        return not self.batcher.has_work

    def close_weights(self) -> None:
        """At engine shutdown, after the loop stopped: kept IPC mappings, plan caches, snapshots go."""
        self.weight_updater.close()
        self.weight_reads.snapshot = None

    def why_memory_may_not_change(self) -> str | None:
        """Memory moves when no request has started (one queued while generation is paused holds no page and can
        wait for the resume: AReaL releases right after its pause while rollouts keep arriving) and no update is
        uncommitted (its saved originals point into the weights); else, why not."""
        if self.batcher.has_started:
            return f"{self.batcher.num_started} request(s) are running or were started and wait to resume"
        if self.sessions.holds_changes:
            return "a weight-update session holds uncommitted updates; end it (or continue_generation) first"
        return None

    def _synchronize(self) -> None:
        if self.model_runner.device.type == "cuda":
            torch.cuda.synchronize(self.model_runner.device)

    def lend_kv_pool(self) -> torch.Tensor | None:
        """The KV pool's bytes, as scratch for an update session's saved originals (weights/rollback.py), when no
        request holds a page: a large model's originals then copy on the device instead of to pinned host memory (61 GB
        took 1.1 s that way on an H100). The prefix cache is emptied first: its KV is about to be overwritten (an update
        flushes it anyway; an update rolled back loses it). No step runs while the scratch is lent: an update runs
        between steps, and an open session holds generation. None when requests hold pages (paused in place)."""
        kv = self.model_runner.kv_cache
        if self.batcher.running or not kv.has_storage:
            return None
        self.batcher.invalidate_cache()
        if self.allocator.num_free != self.allocator.num_pages:
            return None
        return kv.kv.view(-1).view(torch.uint8)

    def update_weights_from_disk(self, req: p.UpdateWeightsFromDiskRequest) -> p.WeightUpdateOutput:
        """The weight updater's disk update, then what SGLang's newer fields ask after a successful one: `keep_pause`
        holds generation in place until continue_generation, `torch_empty_cache` returns the allocator's cached
        blocks."""
        out = self.weight_updater.update_weights_from_disk(req)
        if out.success:
            self.weight_reads.loaded_from = req.model_path  # a save's config and tokenizer files come from there
        if out.success and req.torch_empty_cache and self.model_runner.device.type == "cuda":
            torch.cuda.empty_cache()
        if out.success and req.keep_pause:
            held = self.pause.pause_generation(p.PauseGenerationRequest(mode="in_place"))
            out.message += f"; {held.message} (keep_pause): continue_generation resumes it"
        return out

    def get_load(self, req: p.GetLoadRequest) -> p.LoadOutput:
        running, max_running = len(self.batcher.running), self.batcher.max_running_requests
        kv_usage = self.allocator.num_used / self.allocator.num_pages if self.allocator.num_pages else 0.0
        return p.LoadOutput(
            success=True,
            num_running=running,
            num_waiting=len(self.batcher.waiting) + len(self.deferred),
            kv_pages_used=self.allocator.num_used,
            kv_pages_total=self.allocator.num_pages,
            weight_version=self.sessions.weight_version,
            paused=self.pause.held,
            memory_released=sorted(self.memory.released),
            num_preemptions=self.batcher.num_preemptions,
            num_steps=self.num_steps,
            num_waiting_tokens=sum(s.num_tokens - s.num_computed for s in self.batcher.waiting),
            num_retracted=sum(1 for s in self.batcher.waiting if s.admitted),
            max_running_requests=max_running,
            gen_throughput=self.load_stats.gen_throughput(),
            cache_hit_rate=cache_hit_rate(*self.batcher.last_admission),
            utilization=utilization(running, max_running, kv_usage),
        )

    def freeze_gc(self, req: p.FreezeGCRequest) -> p.ControlOutput:
        """SGLang's freeze_gc: what is alive now (the model's modules, the tokenizer, warmed-up caches) is left
        out of every later collection, so the collector's pauses on this thread stop scanning it."""
        gc.freeze()
        return p.ControlOutput(success=True, message=f"Garbage collection frozen ({gc.get_freeze_count()} objects).")

    def capacity(self) -> PoolCapacity:
        """The KV cache's size (fixed for the engine's life; read without a trip through the loop)."""
        return self.allocator.capacity

    def check_invariants(self, req: p.CheckInvariantsRequest) -> p.ControlOutput:
        if not self.is_idle():
            return p.ControlOutput(success=False, message="invariants are checked only when idle")
        problems = self.invariants.check_idle()
        return p.ControlOutput(success=not problems, message="; ".join(problems) or "ok")


def _reply(fut: Future, out) -> None:
    """Answer a caller unless it gave up (cancelled its future); never raise into the scheduler loop."""
    if fut.set_running_or_notify_cancel():
        fut.set_result(out)
