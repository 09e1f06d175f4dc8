"""`EngineAPI`: the offline Python API (SGLang's shapes) over a scheduler. It tokenizes, fans requests out to
the scheduler through request objects, and assembles outputs; it never touches scheduler state directly.
Two engines share it: `Engine` (the scheduler thread in this process) and `RemoteEngine` (the scheduler in
another process, reached over a pipe: the HTTP front end of `hotswap serve`)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import os
import queue
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Protocol

import torch

import hotswap
from hotswap import protocol as p
from hotswap.cache.page_allocator import PoolCapacity
from hotswap.config import EngineConfig, ModelConfig
from hotswap.engine.collector import Collector
from hotswap.engine.delivery import CallInbox, Mailboxes
from hotswap.engine.request_prep import PreparedCall, RequestPrep
from hotswap.engine.tokenizer import SKIPPED_MESSAGE
from hotswap.engine.unserved import refuse_unserved_fields
from hotswap.engine.vllm_shims import VllmControl
from hotswap.errors import HotswapError, duplicate_rid_message
from hotswap.scheduler.detokenizer import IncrementalDetokenizer
from hotswap.sglang_server_args import NOT_COMPARABLE, SGLANG_DEFAULTS


@dataclass(kw_only=True, slots=True)
class _Call:
    """One generate call in flight: its requests' collectors, fed with outputs as they arrive."""

    collectors: list[Collector]
    single: bool
    stream: bool
    incremental: bool = False  # streamed chunks carry only their new tokens (SGLang's incremental_streaming_output)
    by_rid: dict[str, Collector] = dataclasses.field(init=False)
    remaining: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        self.by_rid = {c.rid: c for c in self.collectors}
        self.remaining = len(self.collectors)

    @property
    def done(self) -> bool:
        return self.remaining == 0

    def feed(self, outs: list[p.GenerateOutput]) -> list[dict]:
        """Take a batch of outputs; several for one request coalesce into one chunk (returned when streaming).
        Raises the refusal (EngineUnavailableError, or HotswapError for bad input) when the engine refused a request."""
        groups: dict[str, list[p.GenerateOutput]] = {}
        for out in outs:
            groups.setdefault(out.rid, []).append(out)
        chunks, refusals = [], []
        for rid, group in groups.items():
            c = self.by_rid[rid]
            since = len(c.output_ids)
            delta = c.add(group)
            if c.finished:
                self.remaining -= 1
                if (refused := c.refusal()) is not None:
                    refusals.append(refused)
            if self.stream:
                chunks.append(c.to_dict(delta, since if self.incremental else None))
        if refusals:  # raised once every output is taken: a refused request left unfinished would be aborted by its rid
            raise refusals[0]
        return chunks

    def result(self):
        results = [c.to_dict() for c in self.collectors]
        return results[0] if self.single else results


def fresh_rids(n: int) -> list[str]:
    """n request ids as `uuid.uuid4().hex` makes them (128 random bits, the version-4 and variant bits set), from one
    urandom read: a batch of 64 prompts took ~0.3 ms building a UUID object per id."""
    raw = bytearray(os.urandom(16 * n))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])  # version 4
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])  # RFC 4122 variant
    hexed = raw.hex()
    return [hexed[i : i + 32] for i in range(0, 32 * n, 32)]


def _take(q: queue.SimpleQueue) -> list[p.GenerateOutput]:
    """Everything in a thread queue (waits for at least one output). A SimpleQueue: the scheduler thread puts every
    output of a step into it, and `queue.Queue`'s lock and condition per put cost it about 2 us more each."""
    items = [q.get()]
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


class SchedulerPort(Protocol):
    """What the API needs of a scheduler: the Scheduler itself, or a proxy to one in another process."""

    dead: str | None  # why it stopped serving (an error in its loop, or the engine's process gone), or None

    def submit(self, request) -> Future: ...

    def capacity(self) -> PoolCapacity: ...


def context_length(config: EngineConfig, model_config: ModelConfig) -> int:
    """The context length model_config_for settled (max_context_len, else the model's)."""
    return model_config.context_len or config.max_context_len or model_config.max_position_embeddings


def eos_token_ids(model_config: ModelConfig, tokenizer) -> list[int]:
    """The ids that end a sequence (and that min_new_tokens masks): the model's (config.json and generation_config.json)
    and the tokenizer's eos, as SGLang's Req._check_token_based_finish stops at `eos_token_ids` and
    `tokenizer.eos_token_id` both (a fine-tuned tokenizer often names <|im_end|> where the config kept <|endoftext|>).
    Ids outside the model's vocabulary can never be sampled."""
    eos = set(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:  # None: skip_tokenizer_init, the model's eos only
        eos.add(tokenizer.eos_token_id)
    return sorted(t for t in eos if t < model_config.vocab_size)


class EngineAPI(VllmControl):
    """The engine's public methods over `scheduler` (generation, weights, memory, pause, introspection); vLLM's names
    for the same controls come from VllmControl."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device, tokenizer, scheduler: SchedulerPort,
                 detokenizer: Callable[[bool, list[int]], IncrementalDetokenizer]):
        self.config = config
        self.model_path = config.model_path  # the folder the served weights came from (follows disk updates)
        self.device = device
        # the GPU's name (SGLang's /v1/loads `accelerator`); asked by the engine's process, which runs CUDA
        self.accelerator: str | None = None
        self.model_config = model_config
        self.tokenizer = tokenizer
        self.max_context_len = context_length(config, model_config)
        self.eos_token_ids = eos_token_ids(model_config, tokenizer)
        self.scheduler = scheduler
        self._detokenizer = detokenizer  # (skip_special_tokens, prompt ids) -> the detokenizer of one streamed request
        self.prep = RequestPrep(encode=self.encode, has_tokenizer=tokenizer is not None, vocab_size=model_config.vocab_size,
                                max_context_len=self.max_context_len,
                                seed=config.seed, routed_experts_enabled=config.enable_return_routed_experts,
                                allow_auto_truncate=config.allow_auto_truncate)
        self._live_rids: set[str] = set()  # request ids of calls in flight (a client rid may not run twice)
        self._live_lock = threading.Lock()
        self._mailboxes = Mailboxes(abort=lambda rid: self.scheduler.submit(p.AbortRequest(rid=rid, message="the consumer's event loop closed")))
        self._closed = False

    def failure(self) -> str | None:
        """Why this engine can serve nothing any more, or None: its scheduler stopped (behind a front end process:
        the engine's process is gone); the in-process Engine adds its own checks."""
        return self.scheduler.dead

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """The one tokenization of text (the Engine, /generate, OpenAI and vLLM routes): as the tokenizer's own
        settings say (a Llama tokenizer prepends BOS), as SGLang does, so the rollout sees the tokens the
        trainer's tokenizer gives; a rendered chat template already holds its special tokens
        (add_special_tokens=False). An empty text is no tokens (not a lone BOS): an empty prompt is refused.
        SGLang's Engine.encode is another thing (embeddings of an embedding model): a non-text is refused by name."""
        if not isinstance(text, str):
            raise HotswapError(f"encode tokenizes one text, got {type(text).__name__} (SGLang's Engine.encode computes embeddings, "
                               "which hotswap does not serve)")
        if self.tokenizer is None:
            raise HotswapError(SKIPPED_MESSAGE)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens) if text else []

    # ---- lifecycle ---------------------------------------------------------------------------------

    def __repr__(self) -> str:
        return f"Engine(model_path={getattr(self, 'model_path', None)!r})"  # trainer errors name engines by it

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        raise NotImplementedError

    # ---- generation: one core (prepare -> submit -> feed outputs), thin sync / async / stream wrappers ----

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob: bool | list[bool] | None = False,
                 top_logprobs_num: int | list[int] | None = 0, stream: bool = False, return_routed_experts: bool = False,
                 logprob_start_len: int | list[int] | None = None, routed_experts_start_len: int = 0, rid: str | list[str] | None = None,
                 image_data=None, custom_logit_processor: str | None = None, lora_path: str | None = None,
                 incremental_streaming_output: bool | None = None, audio_data=None, video_data=None, token_ids_logprob=None,
                 return_hidden_states: bool = False, bootstrap_host=None, bootstrap_port=None, bootstrap_room=None,
                 data_parallel_rank: int | None = None, external_trace_header: dict | None = None, mm_hashes=None, mm_content_hashes=None,
                 session_params=None, session_id=None, require_reasoning: bool = False, priority: int | None = None,
                 routed_dp_rank: int | None = None, disagg_prefill_dp_rank: int | None = None, kv_router_hint=None, *,
                 cache_salt: str | None = None):
        """One prompt -> one dict; a list (or n > 1) -> a list of dicts; stream=True -> an iterator of dicts
        (each with an `index` when the call fans out to several requests). `routed_experts_start_len`: the
        routing returned starts at that absolute position (SGLang's field; at most the prompt's length).
        `rid`: the client's request id (`meta_info.id`, `abort_request(rid)`). SGLang's other arguments
        (`image_data`, `lora_path`, `data_parallel_rank`, ...) are taken as engine/unserved.py says; None for
        `return_logprob` / `top_logprobs_num` is SGLang's unset (False / 0). `return_logprob`, `top_logprobs_num` and
        `logprob_start_len` take one value for every prompt or, as SGLang's do, a list of one per prompt (n == 1).
        `incremental_streaming_output`: a streamed chunk's text, output_ids and output logprobs hold only its new
        tokens, not everything so far (None: the engine's `incremental_streaming_output`, SGLang's server flag)."""
        self._check_open()
        refuse_unserved_fields(locals())
        return_logprob, top_logprobs_num = return_logprob or False, top_logprobs_num or 0
        prepared = self.prep.prepare(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num,
                                     return_routed_experts=return_routed_experts, logprob_start_len=logprob_start_len,
                                     routed_experts_start_len=routed_experts_start_len, rid=rid)
        if stream:
            return self._stream(prepared, self._incremental(incremental_streaming_output))
        q: queue.SimpleQueue = queue.SimpleQueue()
        call = self._start(prepared, stream=False, sink=q.put, flush=None)
        with self._aborting_unfinished(call, "generate interrupted"):
            while not call.done:
                call.feed(_take(q))
        return call.result()

    def _incremental(self, asked: bool | None) -> bool:
        return self.config.incremental_streaming_output if asked is None else bool(asked)

    def _stream(self, prepared: PreparedCall, incremental: bool) -> Iterator[dict]:
        q: queue.SimpleQueue = queue.SimpleQueue()
        call = self._start(prepared, stream=True, sink=q.put, flush=None, incremental=incremental)
        with self._aborting_unfinished(call, "stream closed by the client"):
            while not call.done:
                yield from call.feed(_take(q))

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None,
                             return_logprob: bool | list[bool] | None = False, top_logprobs_num: int | list[int] | None = 0,
                             stream: bool = False, return_routed_experts: bool = False, logprob_start_len: int | list[int] | None = None,
                             routed_experts_start_len: int = 0, rid: str | list[str] | None = None, image_data=None,
                             custom_logit_processor: str | None = None, lora_path: str | None = None,
                             incremental_streaming_output: bool | None = None, audio_data=None, video_data=None, token_ids_logprob=None,
                             return_hidden_states: bool = False, bootstrap_host=None, bootstrap_port=None, bootstrap_room=None,
                             data_parallel_rank: int | None = None, external_trace_header: dict | None = None, mm_hashes=None,
                             mm_content_hashes=None, session_params=None, session_id=None, require_reasoning: bool = False,
                             priority: int | None = None, routed_dp_rank: int | None = None, disagg_prefill_dp_rank: int | None = None,
                             kv_router_hint=None, *, cache_salt: str | None = None):
        """Awaitable generate (arguments as `generate`); with stream=True returns an async iterator of dicts. Tokenization and
        validation run in a worker thread, never on the event loop."""
        self._check_open()
        refuse_unserved_fields(locals())
        return_logprob, top_logprobs_num = return_logprob or False, top_logprobs_num or 0
        prepared = await asyncio.to_thread(functools.partial(
            self.prep.prepare, prompt, sampling_params, input_ids, return_logprob, top_logprobs_num,
            return_routed_experts=return_routed_experts, logprob_start_len=logprob_start_len,
            routed_experts_start_len=routed_experts_start_len, rid=rid))
        if stream:
            return self._astream(prepared, self._incremental(incremental_streaming_output))
        inbox = CallInbox()
        box = self._mailboxes.for_running_loop()
        call = self._start(prepared, stream=False, sink=box.sink(inbox), flush=box.flush)
        with self._aborting_unfinished(call, "client cancelled"):
            while not call.done:
                call.feed(await inbox.take())
        return call.result()

    async def _astream(self, prepared: PreparedCall, incremental: bool) -> AsyncIterator[dict]:
        inbox = CallInbox()
        box = self._mailboxes.for_running_loop()
        call = self._start(prepared, stream=True, sink=box.sink(inbox), flush=box.flush, incremental=incremental)
        with self._aborting_unfinished(call, "stream closed by the client"):
            while not call.done:
                for chunk in call.feed(await inbox.take()):
                    yield chunk

    def _start(self, prepared: PreparedCall, *, stream: bool, sink, flush, incremental: bool = False) -> _Call:
        """Submit every request of a call in one message; outputs reach `sink`, `flush` once per step.
        A client rid already running is refused (SGLang's duplicate-rid check)."""
        reqs, collectors = [], []
        multi = not prepared.single  # a batch (one prompt in a list included) or n > 1: SGLang's chunks then carry `index`
        fresh = iter(fresh_rids(sum(not r.rid for r in prepared.requests)))
        rids = [r.rid or next(fresh) for r in prepared.requests]
        with self._live_lock:
            taken = sorted(set(rids) & self._live_rids)
            if taken:
                raise HotswapError(duplicate_rid_message(taken))
            self._live_rids.update(rids)
        for i, (r, rid) in enumerate(zip(prepared.requests, rids)):
            sp = r.sampling_params
            # streamed text is detokenized by the consumer unless stop strings need it on the scheduler
            detok = self._detokenizer(sp.skip_special_tokens, r.input_ids) if stream and not sp.stop and self.tokenizer is not None else None
            req = p.GenerateRequest(rid=rid, input_ids=r.input_ids, sampling_params=sp, seed=r.seed, sink=sink,
                                    flush=flush, stream=stream, stream_text=bool(sp.stop), group=r.group)
            reqs.append(req)
            collectors.append(Collector(rid=req.rid, return_logprob=sp.return_logprob, top_logprobs=sp.top_logprobs_num > 0,
                                        index=i if multi else None, detok=detok, with_text=self.tokenizer is not None,
                                        keep_stop_token=sp.keeps_stop_text,
                                        routed_experts_start_len=sp.routed_experts_start_len))
        call = _Call(collectors=collectors, single=prepared.single, stream=stream, incremental=incremental)
        self.scheduler.submit(p.GenerateBatch(requests=reqs))
        return call

    @contextlib.contextmanager
    def _aborting_unfinished(self, call: _Call, message: str):
        """However the consumer leaves (done, cancelled, closed early, refused), free what still runs."""
        try:
            yield
        finally:
            for c in call.collectors:
                if not c.finished:
                    self.scheduler.submit(p.AbortRequest(rid=c.rid, message=message))
            with self._live_lock:
                self._live_rids.difference_update(call.by_rid)

    def abort_request(self, rid: str = "", abort_all: bool = False) -> p.ControlOutput:
        """SGLang's abort: the request `rid` (its tokens so far come back with finish reason abort), or
        every request with abort_all=True. An empty rid without abort_all aborts nothing."""
        if abort_all:
            return self._call(p.AbortRequest(rid=None, message="aborted by abort_request(abort_all=True)"))
        if not rid:
            return p.ControlOutput(success=False, message="nothing to abort: give a rid or abort_all=True")
        return self._call(p.AbortRequest(rid=rid, message="aborted by abort_request"))

    # ---- control requests --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise HotswapError("the engine is shut down")

    def _call(self, request, timeout: float | None = None):
        self._check_open()
        return self.scheduler.submit(request).result(timeout=timeout)

    async def _acall(self, request):
        self._check_open()
        # shielded: cancelling the awaiting task must not cancel the scheduler's Future (its set_result would
        # then raise InvalidStateError in the scheduler thread and end it); the request completes regardless
        return await asyncio.shield(asyncio.wrap_future(self.scheduler.submit(request)))

    def flush_cache(self, timeout_s: float = 0.0) -> p.ControlOutput:
        """SGLang's flush_cache; `timeout_s` (its HTTP route's `timeout`) waits that long for running requests to finish
        instead of refusing the flush at once (scheduler/cache_flush.py)."""
        return self._call(p.FlushCacheRequest(timeout_s=timeout_s))

    def get_load(self) -> p.LoadOutput:
        return self._call(p.GetLoadRequest())

    def check_invariants(self) -> p.ControlOutput:
        return self._call(p.CheckInvariantsRequest())

    def start_profile(self, output_dir: str | None = None, start_step: int | None = None, num_steps: int | None = None,
                      activities: list[str] | None = None, with_stack: bool | None = None, record_shapes: bool | None = None,
                      profile_by_stage: bool = False, merge_profiles: bool = False, profile_prefix: str | None = None) -> p.ControlOutput:
        """SGLang's start_profile: a torch.profiler trace of the engine's steps, written to `output_dir` at stop_profile
        or after `num_steps` steps (scheduler/profiler.py)."""
        return self._call(p.StartProfileRequest(output_dir=output_dir, start_step=start_step, num_steps=num_steps, activities=activities,
                                                with_stack=with_stack, record_shapes=record_shapes, profile_by_stage=profile_by_stage,
                                                merge_profiles=merge_profiles, profile_prefix=profile_prefix))

    def stop_profile(self) -> p.ControlOutput:
        return self._call(p.StopProfileRequest())

    def freeze_gc(self) -> p.ControlOutput:
        """SGLang's freeze_gc, after warm-up: the objects alive now leave the garbage collector's scans, in the engine's
        process and in this one (the same process unless this is a RemoteEngine), so its pauses get shorter."""
        out = self._call(p.FreezeGCRequest())
        gc.freeze()
        return out

    def capacity(self) -> PoolCapacity:
        """The KV cache's size: pages, tokens per page, and the tokens it holds in all."""
        return self.scheduler.capacity()

    @property
    def weight_version(self) -> str:
        return self.get_load().weight_version

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                                 flush_cache: bool = True, abort_all_requests: bool = False, session_id: str | None = None, *,
                                 keep_pause: bool = False, torch_empty_cache: bool = False, recapture_cuda_graph: bool = False,
                                 token_step: int = 0, is_async: bool = False, manifest: dict | None = None) -> p.DiskUpdateOutput:
        """As SGLang's Engine: unpacks as `(success, message, num_paused_requests)`. `session_id` (every weight
        update method takes it): run only inside that begin_weight_update session, refused once it ended. SGLang's
        newer fields as protocol.UpdateWeightsFromDiskRequest takes them."""
        out = self.submit(p.UpdateWeightsFromDiskRequest(
            model_path=str(model_path), load_format=load_format, weight_version=weight_version, flush_cache=flush_cache,
            abort_all_requests=abort_all_requests, session_id=session_id, keep_pause=keep_pause, torch_empty_cache=torch_empty_cache,
            recapture_cuda_graph=recapture_cuda_graph, token_step=token_step, is_async=is_async, manifest=manifest))
        return p.DiskUpdateOutput.of(out)

    def update_weights_from_tensor(self, named_tensors=None, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None, abort_all_requests: bool = False,
                                   serialized_named_tensors: list[str | bytes] | None = None, session_id: str | None = None) -> p.WeightUpdateOutput:
        """`named_tensors`: (name, tensor) pairs (or a dict) in process, or plain-data handle descriptors.
        As SGLang's Engine: with load_format "flattened_bucket" `named_tensors` is the per-TP-rank list of
        serialized payloads; `serialized_named_tensors` gives such a list for any load_format."""
        if isinstance(named_tensors, dict):
            named_tensors = list(named_tensors.items())
        if serialized_named_tensors is None and load_format == "flattened_bucket":
            named_tensors, serialized_named_tensors = None, named_tensors
        return self._call(p.UpdateWeightsFromTensorRequest(
            named_tensors=None if named_tensors is None else list(named_tensors),
            serialized_named_tensors=None if serialized_named_tensors is None else list(serialized_named_tensors),
            load_format=load_format, flush_cache=flush_cache, weight_version=weight_version, abort_all_requests=abort_all_requests,
            session_id=session_id))

    def update_weights_from_ipc(self, zmq_handles: dict[str, str], flush_cache: bool = True, weight_version: str | None = None,
                                session_id: str | None = None) -> p.WeightUpdateOutput:
        return self._call(p.UpdateWeightsFromIPCRequest(zmq_handles=zmq_handles, flush_cache=flush_cache, weight_version=weight_version,
                                                        session_id=session_id))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None, timeout_s: float = 600.0) -> p.ControlOutput:
        return self._call(p.InitWeightsUpdateGroupRequest(master_address=master_address, master_port=int(master_port), rank_offset=rank_offset,
                                                          world_size=world_size, group_name=group_name, backend=backend, timeout_s=timeout_s))

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list, group_name: str = "weight_update_group",
                                        flush_cache: bool = True, load_format: str | None = None, weight_version: str | None = None,
                                        abort_all_requests: bool = False, session_id: str | None = None) -> p.WeightUpdateOutput:
        """SGLang's positional order (names, dtypes, shapes, group_name, flush_cache, load_format); the rest by name."""
        dtypes = [str(d).removeprefix("torch.") for d in dtypes]
        return self._call(p.UpdateWeightsFromDistributedRequest(names=list(names), dtypes=dtypes, shapes=[list(s) for s in shapes],
                                                                group_name=group_name, flush_cache=flush_cache, weight_version=weight_version,
                                                                load_format=load_format, abort_all_requests=abort_all_requests,
                                                                session_id=session_id))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> p.ControlOutput:
        return self._call(p.DestroyWeightsUpdateGroupRequest(group_name=group_name))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> list:
        """SGLang's reply: the parameter's first `truncate_size` rows as a nested list (float). Raises
        HotswapError naming why when it cannot be read (an unknown name, weights released)."""
        out = self._call(p.GetWeightsByNameRequest(name=name, truncate_size=truncate_size))
        if not out.success:
            raise HotswapError(f"get_weights_by_name failed: {out.message}")
        return out.parameter

    def check_weights(self, action: str, expected: dict[str, str] | None = None, skip_tensor_list: list[str] | None = None,
                      allow_quant_error: bool = False) -> p.CheckWeightsOutput:
        """hotswap's checks and SGLang's weights_checker actions (its `ranks` checksum reply, `skip_tensor_list`)."""
        return self._call(p.CheckWeightsRequest(action=action, expected=expected, skip_tensor_list=skip_tensor_list,
                                                allow_quant_error=allow_quant_error))

    def release_memory_occupation(self, tags: list[str] | None = None, keep_weights_on_host: bool = True) -> p.ControlOutput:
        return self._call(p.ReleaseMemoryOccupationRequest(tags=tags, keep_weights_on_host=keep_weights_on_host))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> p.ControlOutput:
        return self._call(p.ResumeMemoryOccupationRequest(tags=tags))

    def save_sharded_model(self, path: str, pattern: str | None = None, max_size: int = 5 * 1024**3, overwrite: bool = False) -> p.ControlOutput:
        return self._call(p.SaveShardedModelRequest(path=str(path), pattern=pattern, max_size=max_size, overwrite=overwrite))

    def get_ipc_token(self) -> str:
        """The token a trainer names its shared-memory blocks with (`SharedMemoryBucket(..., token=...)`):
        update_weights_from_tensor opens no other block."""
        return self.config.ipc_token

    def save_remote_model(self, url: str, overwrite: bool = False) -> p.ControlOutput:
        return self._call(p.SaveRemoteModelRequest(url=url, overwrite=overwrite))

    def pause_generation(self, mode: str = "abort") -> p.ControlOutput:
        return self._call(p.PauseGenerationRequest(mode=mode))

    def continue_generation(self) -> p.ControlOutput:
        return self._call(p.ContinueGenerationRequest())

    def update_weight_version(self, new_version: str, abort_all_requests: bool = True) -> p.ControlOutput:
        return self._call(p.UpdateWeightVersionRequest(new_version=str(new_version), abort_all_requests=abort_all_requests))

    def post_process_weights(self, restore_weights_before_load: bool = False, post_process_quantization: bool = False) -> p.ControlOutput:
        """SGLang's hook around an update of quantized weights (slime, miles); hotswap holds every weight in the layout
        it is loaded in, so it changes nothing and answers success."""
        return self._call(p.PostProcessWeightsRequest(restore_weights_before_load=restore_weights_before_load,
                                                      post_process_quantization=post_process_quantization))

    def begin_weight_update(self) -> p.BeginWeightUpdateOutput:
        """Open a multi-call update session; the reply's `session_id` is what its calls and its end give."""
        return self._call(p.BeginWeightUpdateRequest())

    def end_weight_update(self, weight_version: str | None = None, abort: bool = False, session_id: str | None = None) -> p.WeightUpdateOutput:
        """Commit (or `abort`) the open session; with `session_id`, only that one (see weights/session.py)."""
        return self._call(p.EndWeightUpdateRequest(weight_version=weight_version, abort=abort, session_id=session_id))

    def submit(self, request):
        """Send any protocol request and wait for its output (the HTTP server's single entry point)."""
        return self._observe(request, self._call(request))

    async def asubmit(self, request):
        return self._observe(request, await self._acall(request))

    def _observe(self, request, out):
        """The model path follows a successful update from another folder (SGLang's model_info does)."""
        if isinstance(request, p.UpdateWeightsFromDiskRequest) and out.success:
            self.model_path = request.model_path
        return out

    def model_info(self) -> dict:
        mc = self.model_config
        return {"model_path": self.model_path, "architecture": mc.architecture, "dtype": str(mc.torch_dtype).removeprefix("torch."),
                "device": str(self.device), "max_context_len": self.max_context_len, "vocab_size": mc.vocab_size,
                "num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "tensor_parallel_size": self.config.tensor_parallel_size,
                "is_generation": True}

    def get_model_info(self) -> dict:
        """SGLang's model info: model_info() with the tokenizer path, the current weight version and the keys
        SGLang's /model_info carries."""
        version = self.weight_version  # first: behind a front end process, a disk update another front end made is
        # announced down this pipe before any reply that follows it, so the path read after this reply is the new one
        info = self.model_info()
        info.update({"tokenizer_path": self.config.tokenizer_path or self.model_path, "weight_version": version,
                     "preferred_sampling_params": None, "model_type": self.model_config.model_type, "architectures": [info["architecture"]],
                     "has_image_understanding": False, "has_audio_understanding": False})
        return info

    def get_server_info(self) -> dict:
        """SGLang's server info: every ServerArgs field (SGLang's default where hotswap has no setting of its own, the
        value given where one was taken at launch), every EngineConfig field, and the ServerArgs names frameworks read
        filled from ours. slime and miles compare fields with their launch arguments before using an external engine
        (`_init_external`: `enable_memory_saver` as launched, the parallel sizes, `base_gpu_id`; miles also `port`,
        which the HTTP route fills from the address it serves on, and every override it launched with, such as
        `skip_tokenizer_init` or `cuda_graph_max_bs`)."""
        cfg = self.config
        load = self.get_load()
        capacity = self.capacity()
        info = {name: value for name, value in SGLANG_DEFAULTS.items() if value is not NOT_COMPARABLE}  # every ServerArgs field
        info.update(dataclasses.asdict(cfg))
        info.update(info.pop("sglang_settings"))
        info.update({
            "model_path": self.model_path, "tokenizer_path": cfg.tokenizer_path or self.model_path,
            "tp_size": cfg.tensor_parallel_size, "dp_size": 1, "pp_size": 1, "ep_size": 1, "nnodes": 1, "node_rank": 0,
            "page_size": capacity.page_size, "max_running_requests": cfg.max_running_requests,
            "max_total_num_tokens": capacity.max_total_tokens, "max_req_input_len": min(self.max_context_len, capacity.max_total_tokens) - 1,
            "context_length": self.max_context_len,
            "mem_fraction_static": cfg.kv_cache_memory_fraction if cfg.mem_fraction_static is None else cfg.mem_fraction_static,
            "disable_radix_cache": not cfg.enable_prefix_cache, "random_seed": cfg.seed, "chunked_prefill_size": cfg.chunked_prefill_size,
            "watchdog_timeout": cfg.step_timeout_s,
            "disable_cuda_graph": not cfg.enable_cuda_graph,
            "base_gpu_id": self.device.index if self.device.type == "cuda" and self.device.index is not None else cfg.base_gpu_id,
            "gpu_id_step": cfg.gpu_id_step,
            "weight_version": load.weight_version, "disaggregation_mode": "null", "disaggregation_bootstrap_port": None,
            "encoder_only": False, "enable_lora": False, "enable_dp_attention": False, "num_gpus": cfg.tensor_parallel_size,
            "version": hotswap.__version__, "internal_states": [load.to_dict()],
        })
        return info
