"""`Engine`: the offline Python API (SGLang's shapes). It tokenizes, fans requests out to the scheduler
thread through request objects, and assembles outputs; it never touches scheduler state directly."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import queue
import random
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import torch
from transformers import AutoTokenizer

from hotswap import protocol as p
from hotswap.config import EngineConfig, model_config_for
from hotswap.errors import HotswapError
from hotswap.runner.model_runner import ModelRunner
from hotswap.runner.tp_peers import TPPeers
from hotswap.sampling_params import SamplingParams
from hotswap.scheduler.scheduler import Scheduler

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}


@dataclass(slots=True)
class _Collector:
    """Accumulates one request's streamed pieces into SGLang's output dict."""

    rid: str
    return_logprob: bool
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    last: p.GenerateOutput | None = None

    def add(self, out: p.GenerateOutput) -> None:
        self.text += out.text_delta
        self.output_ids += out.new_token_ids
        self.logprobs += out.new_logprobs
        self.top_logprobs += out.new_top_logprobs
        self.versions += out.new_token_versions
        self.last = out

    def to_dict(self, delta: p.GenerateOutput | None = None) -> dict:
        out = self.last
        meta = {
            "id": self.rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": out.cached_tokens,
            "finish_reason": out.finish_reason,
            "weight_version": out.weight_version,
        }
        if len(set(self.versions)) > 1:
            meta["weight_versions"] = list(self.versions)
        if out.routed_experts is not None:
            meta["routed_experts"] = out.routed_experts
        if self.return_logprob:
            meta["output_token_logprobs"] = [(lp, tid, None) for lp, tid in zip(self.logprobs, self.output_ids)]
            if any(self.top_logprobs):
                meta["output_top_logprobs"] = [[(lp, tid, None) for lp, tid in top] for top in self.top_logprobs]
        result = {"text": self.text, "output_ids": list(self.output_ids), "meta_info": meta}
        if delta is not None:
            result["delta_text"] = delta.text_delta
            result["delta_output_ids"] = list(delta.new_token_ids)
        return result


class Engine:
    """An inference engine on one model replica.

    `Engine(model_path, dtype="auto", device="auto", **engine_args)` where engine_args are EngineConfig
    fields (page_size, num_pages, max_running_requests, ...). Usable as a context manager.

    `tensor_parallel_size=N` spawns N-1 worker processes (so a script that builds one needs the usual
    `if __name__ == "__main__":` guard); this process is rank 0 and schedules for all of them.
    """

    def __init__(self, model_path: str, dtype: str = "auto", device: str = "auto", **engine_args):
        unknown = sorted(set(engine_args) - _CONFIG_FIELDS)
        if unknown:
            raise HotswapError(f"unknown engine argument(s): {', '.join(unknown)}")
        self.config = EngineConfig(model_path=str(model_path), dtype=dtype, device=device, **engine_args)
        self.device = self.config.resolved_device()
        self.model_config = model_config_for(self.config)
        tp_size = self.config.tensor_parallel_size
        if self.device.type == "cuda" and (self.device.index or 0) + tp_size > torch.cuda.device_count():
            raise HotswapError(f"tensor_parallel_size {tp_size} from {self.device} needs GPUs up to cuda:{(self.device.index or 0) + tp_size - 1}; "
                               f"{torch.cuda.device_count()} visible")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as exc:
            raise HotswapError(f"cannot load a tokenizer from {model_path!r}: {exc}") from exc
        self.max_context_len = self.config.max_context_len or self.model_config.max_position_embeddings
        eos = list(self.model_config.eos_token_ids)
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        self.eos_token_ids = eos
        self.tp_peers: TPPeers | None = None
        # the runner captures CUDA graphs on its device; the caller's current device is left as it was
        with torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext():
            self.model_runner = self._start_runner()
        self.scheduler = Scheduler(self.config, self.model_runner, self.tokenizer, eos, self.max_context_len)
        self._rng = random.Random(self.config.seed)
        self._rng_lock = threading.Lock()
        self.scheduler.start()
        self._closed = False

    def _start_runner(self) -> ModelRunner:
        """This process's ModelRunner; under tensor parallelism the workers are spawned first and build
        theirs meanwhile (a worker's startup error is raised here, naming it)."""
        if self.config.tensor_parallel_size == 1:
            return ModelRunner(self.config, self.model_config, self.device)
        peers = self.tp_peers = TPPeers.launch(self.config, self.device)
        try:
            runner = ModelRunner(self.config, self.model_config, self.device, peers.info, tp_peers=peers)
            peers.wait_ready()
        except BaseException as exc:
            peers.shutdown()
            reason = None if isinstance(exc, HotswapError) else peers.worker_error()  # a collective failed: say why
            if reason is None:
                raise
            raise HotswapError(reason) from exc
        return runner

    # ---- lifecycle ---------------------------------------------------------------------------------

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()

    def shutdown(self) -> None:
        if not self._closed:
            self._closed = True
            self.scheduler.submit(p.AbortRequest(message="engine shutting down"))
            self.scheduler.stop()
            if self.tp_peers is not None:
                self.tp_peers.shutdown()
            if not self.scheduler.thread.is_alive():  # a stuck step keeps its state rather than crash under it
                self.scheduler.weight_updater.close()
                self.model_runner.close()

    # ---- generation --------------------------------------------------------------------------------

    def _prepare(self, prompt, sampling_params, input_ids, return_logprob: bool, top_logprobs_num: int, stream: bool,
                 return_routed_experts: bool = False):
        """Validate everything up front and build (request args, collector) per output; raises on bad input."""
        if (prompt is None) == (input_ids is None):
            raise HotswapError("give exactly one of prompt or input_ids")
        single = isinstance(prompt, str) or (input_ids is not None and (not input_ids or isinstance(input_ids[0], int)))
        if prompt is not None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            if not all(isinstance(x, str) for x in prompts):
                raise HotswapError("prompt must be a string or a list of strings")
            id_lists = [self.tokenizer.encode(x, add_special_tokens=False) if x else [] for x in prompts]
        else:
            id_lists = [list(input_ids)] if single else [list(x) for x in input_ids]
        if isinstance(sampling_params, list):
            if len(sampling_params) != len(id_lists):
                raise HotswapError(f"{len(sampling_params)} sampling_params for {len(id_lists)} prompts")
            sps = [SamplingParams.from_dict(sp) for sp in sampling_params]
        else:
            sp = SamplingParams.from_dict(dict(sampling_params) if isinstance(sampling_params, dict) else sampling_params)
            sps = [sp] * len(id_lists)
        if return_logprob or top_logprobs_num:
            sps = [dataclasses.replace(sp, return_logprob=True, top_logprobs_num=max(sp.top_logprobs_num, top_logprobs_num)) for sp in sps]
        if return_routed_experts:
            sps = [dataclasses.replace(sp, return_routed_experts=True) for sp in sps]
        if any(sp.return_routed_experts for sp in sps) and not self.config.enable_return_routed_experts:
            raise HotswapError("return_routed_experts needs an engine started with enable_return_routed_experts=True")
        vocab = self.model_config.vocab_size
        for i, ids in enumerate(id_lists):
            if not ids:
                raise HotswapError(f"prompt {i} is empty")
            if any((not isinstance(t, int)) or t < 0 or t >= vocab for t in ids):
                raise HotswapError(f"prompt {i} holds token ids outside the vocabulary [0, {vocab})")
            if len(ids) >= self.max_context_len:
                raise HotswapError(f"prompt {i} has {len(ids)} tokens; the context length is {self.max_context_len}")
        jobs = []
        for ids, sp in zip(id_lists, sps):
            for k in range(sp.n):
                seed = sp.seed + k if sp.seed is not None else self._draw_seed()
                jobs.append((ids, sp, seed))
        if stream and len(jobs) != 1:
            raise HotswapError("stream=True takes one prompt with n=1")
        return single and jobs and sps[0].n == 1, jobs

    def _draw_seed(self) -> int:
        with self._rng_lock:
            return self._rng.getrandbits(62)

    @staticmethod
    def _request(ids: list[int], sp: SamplingParams, seed: int, sink, stream: bool = False) -> p.GenerateRequest:
        return p.GenerateRequest(rid=uuid.uuid4().hex, input_ids=ids, sampling_params=sp, seed=seed, sink=sink,
                                 stream=stream, stream_text=stream or bool(sp.stop))

    def _submit(self, ids: list[int], sp: SamplingParams, seed: int, sink, stream: bool = False) -> _Collector:
        req = self._request(ids, sp, seed, sink, stream)
        self.scheduler.submit(req)
        return _Collector(rid=req.rid, return_logprob=sp.return_logprob)

    def _submit_all(self, jobs: list, sink_for) -> list[_Collector]:
        """All of one call's requests in one message; `sink_for(i)` is the i-th request's sink."""
        reqs = [self._request(ids, sp, seed, sink_for(i)) for i, (ids, sp, seed) in enumerate(jobs)]
        self.scheduler.submit(p.GenerateBatch(requests=reqs))
        return [_Collector(rid=r.rid, return_logprob=r.sampling_params.return_logprob) for r in reqs]

    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob: bool = False,
                 top_logprobs_num: int = 0, stream: bool = False, return_routed_experts: bool = False):
        """One prompt -> one dict; a list (or n > 1) -> a list of dicts; stream=True -> an iterator of dicts."""
        self._check_open()
        single, jobs = self._prepare(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, stream, return_routed_experts)
        if stream:
            return self._stream(*jobs[0])
        q: queue.Queue = queue.Queue()
        collectors = self._submit_all(jobs, lambda i: lambda out: q.put((i, out)))
        remaining = len(collectors)
        while remaining:
            i, out = q.get()
            collectors[i].add(out)
            remaining -= out.finished
        results = [c.to_dict() for c in collectors]
        return results[0] if single else results

    def _stream(self, ids, sp, seed) -> Iterator[dict]:
        q: queue.Queue = queue.Queue()
        c = self._submit(ids, sp, seed, q.put, stream=True)
        try:
            while True:
                out = q.get()
                c.add(out)
                yield c.to_dict(delta=out)
                if out.finished:
                    return
        finally:
            if c.last is None or not c.last.finished:  # the consumer stopped early: free the request
                self.scheduler.submit(p.AbortRequest(rid=c.rid, message="stream closed by the client"))

    async def async_generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob: bool = False,
                             top_logprobs_num: int = 0, stream: bool = False, return_routed_experts: bool = False):
        """Awaitable generate; with stream=True returns an async iterator of dicts."""
        self._check_open()
        single, jobs = self._prepare(prompt, sampling_params, input_ids, return_logprob, top_logprobs_num, stream, return_routed_experts)
        if stream:
            return self._astream(*jobs[0])
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        collectors = self._submit_all(jobs, lambda i: lambda out: loop.call_soon_threadsafe(q.put_nowait, (i, out)))
        remaining = len(collectors)
        try:
            while remaining:
                i, out = await q.get()
                collectors[i].add(out)
                remaining -= out.finished
        except asyncio.CancelledError:
            for c in collectors:
                if c.last is None or not c.last.finished:
                    self.scheduler.submit(p.AbortRequest(rid=c.rid, message="client cancelled"))
            raise
        results = [c.to_dict() for c in collectors]
        return results[0] if single else results

    async def _astream(self, ids, sp, seed) -> AsyncIterator[dict]:
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()
        c = self._submit(ids, sp, seed, lambda out: loop.call_soon_threadsafe(q.put_nowait, out), stream=True)
        try:
            while True:
                out = await q.get()
                c.add(out)
                yield c.to_dict(delta=out)
                if out.finished:
                    return
        finally:
            if c.last is None or not c.last.finished:
                self.scheduler.submit(p.AbortRequest(rid=c.rid, message="stream closed by the client"))

    def abort_request(self, rid: str | None = None) -> p.ControlOutput:
        return self._call(p.AbortRequest(rid=rid))

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

    def flush_cache(self) -> p.ControlOutput:
        return self._call(p.FlushCacheRequest())

    def get_load(self) -> p.LoadOutput:
        return self._call(p.GetLoadRequest())

    def check_invariants(self) -> p.ControlOutput:
        return self._call(p.CheckInvariantsRequest())

    @property
    def weight_version(self) -> str:
        return self.get_load().weight_version

    def update_weights_from_disk(self, model_path: str, load_format: str | None = None, weight_version: str | None = None,
                                 flush_cache: bool = True, abort_all_requests: bool = False) -> p.WeightUpdateOutput:
        return self._call(p.UpdateWeightsFromDiskRequest(model_path=str(model_path), load_format=load_format, weight_version=weight_version,
                                                         flush_cache=flush_cache, abort_all_requests=abort_all_requests))

    def update_weights_from_tensor(self, named_tensors, load_format: str | None = None, flush_cache: bool = True,
                                   weight_version: str | None = None, abort_all_requests: bool = False) -> p.WeightUpdateOutput:
        if isinstance(named_tensors, dict):
            named_tensors = list(named_tensors.items())
        return self._call(p.UpdateWeightsFromTensorRequest(named_tensors=list(named_tensors), load_format=load_format, flush_cache=flush_cache,
                                                           weight_version=weight_version, abort_all_requests=abort_all_requests))

    def update_weights_from_ipc(self, zmq_handles: dict[str, str], flush_cache: bool = True, weight_version: str | None = None) -> p.WeightUpdateOutput:
        return self._call(p.UpdateWeightsFromIPCRequest(zmq_handles=zmq_handles, flush_cache=flush_cache, weight_version=weight_version))

    def init_weights_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                                  group_name: str = "weight_update_group", backend: str | None = None, timeout_s: float = 600.0) -> p.ControlOutput:
        return self._call(p.InitWeightsUpdateGroupRequest(master_address=master_address, master_port=int(master_port), rank_offset=rank_offset,
                                                          world_size=world_size, group_name=group_name, backend=backend, timeout_s=timeout_s))

    def update_weights_from_distributed(self, names: list[str], dtypes: list, shapes: list, group_name: str = "weight_update_group",
                                        flush_cache: bool = True, weight_version: str | None = None, load_format: str | None = None,
                                        abort_all_requests: bool = False) -> p.WeightUpdateOutput:
        dtypes = [str(d).removeprefix("torch.") for d in dtypes]
        return self._call(p.UpdateWeightsFromDistributedRequest(names=list(names), dtypes=dtypes, shapes=[list(s) for s in shapes],
                                                                group_name=group_name, flush_cache=flush_cache, weight_version=weight_version,
                                                                load_format=load_format, abort_all_requests=abort_all_requests))

    def destroy_weights_update_group(self, group_name: str = "weight_update_group") -> p.ControlOutput:
        return self._call(p.DestroyWeightsUpdateGroupRequest(group_name=group_name))

    def get_weights_by_name(self, name: str, truncate_size: int = 100) -> p.GetWeightsByNameOutput:
        return self._call(p.GetWeightsByNameRequest(name=name, truncate_size=truncate_size))

    def check_weights(self, action: str, expected: dict[str, str] | None = None) -> p.CheckWeightsOutput:
        return self._call(p.CheckWeightsRequest(action=action, expected=expected))

    def release_memory_occupation(self, tags: list[str] | None = None, keep_weights_on_host: bool = True) -> p.ControlOutput:
        return self._call(p.ReleaseMemoryOccupationRequest(tags=tags, keep_weights_on_host=keep_weights_on_host))

    def resume_memory_occupation(self, tags: list[str] | None = None) -> p.ControlOutput:
        return self._call(p.ResumeMemoryOccupationRequest(tags=tags))

    def save_sharded_model(self, path: str, pattern: str | None = None, max_size: int = 5 * 1024**3) -> p.ControlOutput:
        return self._call(p.SaveShardedModelRequest(path=str(path), pattern=pattern, max_size=max_size))

    def save_remote_model(self, url: str) -> p.ControlOutput:
        return self._call(p.SaveRemoteModelRequest(url=url))

    def pause_generation(self, mode: str = "abort") -> p.ControlOutput:
        return self._call(p.PauseGenerationRequest(mode=mode))

    def continue_generation(self) -> p.ControlOutput:
        return self._call(p.ContinueGenerationRequest())

    def update_weight_version(self, new_version: str, abort_all_requests: bool = False) -> p.ControlOutput:
        return self._call(p.UpdateWeightVersionRequest(new_version=str(new_version), abort_all_requests=abort_all_requests))

    def begin_weight_update(self) -> p.ControlOutput:
        return self._call(p.BeginWeightUpdateRequest())

    def end_weight_update(self, weight_version: str | None = None, abort: bool = False) -> p.WeightUpdateOutput:
        return self._call(p.EndWeightUpdateRequest(weight_version=weight_version, abort=abort))

    def submit(self, request):
        """Send any protocol request and wait for its output (the HTTP server's single entry point)."""
        return self._call(request)

    async def asubmit(self, request):
        return await self._acall(request)

    def model_info(self) -> dict:
        mc = self.model_config
        return {"model_path": self.config.model_path, "architecture": mc.architecture, "dtype": str(mc.torch_dtype).removeprefix("torch."),
                "device": str(self.device), "max_context_len": self.max_context_len, "vocab_size": mc.vocab_size,
                "num_layers": mc.num_layers, "hidden_size": mc.hidden_size, "tensor_parallel_size": self.config.tensor_parallel_size,
                "is_generation": True}
