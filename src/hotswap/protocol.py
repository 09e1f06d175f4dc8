"""Every request the frontend sends the scheduler, and every output it gets back (SGLang's names and fields).

Control requests are answered with an output dataclass carrying `success` and `message`; generation
requests stream `GenerateOutput`s into their sink.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from hotswap.sampling_params import SamplingParams


@dataclass(kw_only=True, slots=True)
class GenerateOutput:
    """An incremental piece of one request's output (the whole of it when `finished`)."""

    rid: str
    new_token_ids: list[int]
    new_logprobs: list[float]
    new_top_logprobs: list[list[tuple[float, int]]]
    new_token_versions: list[str]
    text_delta: str
    finished: bool
    finish_reason: dict | None
    prompt_tokens: int
    cached_tokens: int
    weight_version: str
    # finished outputs of requests asking for them: int32 (little-endian) bytes ordered (token, layer, top-k slot), see
    # runner/routed_experts.py; the collector writes them as SGLang's base64
    routed_experts: bytes | None = None
    # SGLang's input_token_logprobs as (logprob or None, token id), and input_top_logprobs (None first):
    # sent once, with the request's first output, when it asked for logprobs
    input_token_logprobs: list[tuple[float | None, int]] | None = None
    input_top_logprobs: list[list[tuple[float, int]] | None] | None = None
    new_top_p_token_ids: list[list[int]] = field(default_factory=list)  # per new token: the ids its filters kept


def output_of_token_row(row: tuple) -> GenerateOutput:
    """The GenerateOutput a token row (`GenerateRequest.sink_token`) stands for: the one the full path sends. A row is
    (rid, token id, logprob or None when not asked, weight version, prompt tokens, cached tokens)."""
    rid, token_id, logprob, version, prompt_tokens, cached_tokens = row
    asked = logprob is not None
    return GenerateOutput(rid=rid, new_token_ids=[token_id], new_logprobs=[logprob] if asked else [], new_top_logprobs=[[]] if asked else [],
                          new_token_versions=[version], text_delta="", finished=False, finish_reason=None, prompt_tokens=prompt_tokens,
                          cached_tokens=cached_tokens, weight_version=version)


def aborted_output(rid: str, message: str, status_code: int, *, prompt_tokens: int = 0, cached_tokens: int = 0,
                   weight_version: str = "") -> GenerateOutput:
    """A request's last output when it ends without its tokens: aborted with `message` and the HTTP status its caller
    gets (503 the engine cannot serve it, 400 the request is refused, 500 it failed on the way)."""
    return GenerateOutput(rid=rid, new_token_ids=[], new_logprobs=[], new_top_logprobs=[], new_token_versions=[], text_delta="",
                          finished=True, finish_reason={"type": "abort", "message": message, "status_code": status_code},
                          prompt_tokens=prompt_tokens, cached_tokens=cached_tokens, weight_version=weight_version)


@dataclass(kw_only=True, slots=True)
class GenerateRequest:
    rid: str
    input_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    sink: Callable[[GenerateOutput], None]
    flush: Callable[[], None] | None = None  # called once per scheduler step after this step's outputs are sunk
    # a streamed request's consumer of plain next tokens (the front end process's pipe, engine/service.py): an output
    # that is one new token and nothing else new comes to it as a token row (`output_of_token_row`) instead of to `sink` as a
    # GenerateOutput, a third of the scheduler thread's cost per token; None: every output goes to `sink`
    sink_token: Callable[[tuple], None] | None = None
    stream: bool = False  # deliver an output per step (else only the finished one)
    stream_text: bool = False  # detokenize incrementally on the scheduler thread (stop strings need it)
    submitted_at: float = field(default_factory=time.monotonic)  # bounds how long it may wait while generation is held
    group: str | None = None  # one of n samples: the client's rid of its prompt, which aborts every sample (AbortRequest)


@dataclass(kw_only=True, slots=True)
class GenerateBatch:
    """Several requests submitted at once (one `generate` call over a list of prompts): the scheduler
    admits them together, so the first step prefills them all instead of whatever had arrived."""

    requests: list[GenerateRequest]


@dataclass(kw_only=True, slots=True)
class AbortRequest:
    rid: str | None = None  # None aborts every request; a prompt's rid given with n > 1 aborts all its samples
    message: str = "aborted by request"


@dataclass(kw_only=True, slots=True)
class ControlOutput(dict):
    """Reads as an object (`out.success`), a mapping (`out["message"]`, `json.dumps(out)`: it is a dict of
    its fields) or SGLang's `(success, message)` tuple (`ok, msg = out`, `out[0]`), as ported SGLang tests
    and frameworks use the Engine's replies."""

    success: bool
    message: str = ""

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        dict.__setitem__(self, name, value)  # the mapping view follows every field

    def astuple(self) -> tuple:
        """SGLang's tuple form of this reply: `(success, message)`."""
        return (self.success, self.message)

    def __iter__(self):
        return iter(self.astuple())

    def __getitem__(self, key):
        return dict.__getitem__(self, key) if isinstance(key, str) else self.astuple()[key]

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(kw_only=True, slots=True)
class FlushCacheRequest:
    # vLLM's reset_prefix_cache(reset_running_requests=True): running requests give their pages back first and are
    # recomputed from their tokens when they run again (SkyRL resets so while a keep-pause freezes them)
    reset_running_requests: bool = False
    # SGLang's /flush_cache?timeout=: with requests running, wait up to this many seconds for them to finish (0: refuse at once)
    timeout_s: float = 0.0


@dataclass(kw_only=True, slots=True)
class GetLoadRequest:
    pass


@dataclass(kw_only=True, slots=True)
class LoadOutput(ControlOutput):
    num_running: int = 0
    num_waiting: int = 0
    kv_pages_used: int = 0
    kv_pages_total: int = 0
    weight_version: str = ""
    paused: bool = False
    memory_released: list[str] = field(default_factory=list)  # tags released now (vLLM: sleeping)
    num_preemptions: int = 0  # running requests preempted for KV space so far (recomputed later)
    num_steps: int = 0  # forward steps processed so far: it grows while the engine makes progress (/health_generate)
    num_waiting_tokens: int = 0  # tokens the waiting requests have still to prefill (SGLang's pending prefill tokens)
    num_retracted: int = 0  # waiting requests that had run (preempted or retracted): they recompute their KV when readmitted
    max_running_requests: int = 0  # the batcher's limit on running requests
    gen_throughput: float = 0.0  # tokens a second over the latest steps; 0 while idle (SGLang's /v1/loads field)
    cache_hit_rate: float = 0.0  # prefix-cache share of the latest admitted prompts (SGLang's /v1/loads field)
    utilization: float = 0.0  # max(running / max_running_requests, KV usage / 0.9) (SGLang's /v1/loads field)


@dataclass(kw_only=True, slots=True)
class CheckInvariantsRequest:
    pass


@dataclass(kw_only=True, slots=True)
class StartProfileRequest:
    """SGLang's ProfileReqInput (scheduler/profiler.py)."""

    output_dir: str | None = None  # None: SGLANG_TORCH_PROFILER_DIR, else /tmp
    start_step: int | None = None  # the step count at which to start (None: now)
    num_steps: int | None = None  # stop by itself after this many steps (None: at stop_profile)
    activities: list[str] | None = None  # CPU, GPU, MEM, CUDA_PROFILER (None: CPU and GPU)
    with_stack: bool | None = None
    record_shapes: bool | None = None
    profile_by_stage: bool = False
    merge_profiles: bool = False  # one trace per engine here (rank 0's): nothing to merge
    profile_prefix: str | None = None


@dataclass(kw_only=True, slots=True)
class StopProfileRequest:
    pass


@dataclass(kw_only=True, slots=True)
class FreezeGCRequest:
    """SGLang's freeze_gc: objects alive now leave the garbage collector's scans (gc.freeze) in the engine's process."""


# ---- weight lifecycle (WeightUpdater) -------------------------------------------------------------


@dataclass(kw_only=True, slots=True)
class UpdateWeightsFromDiskRequest:
    """SGLang's UpdateWeightFromDiskReqInput. Of its newer fields, `keep_pause` leaves generation paused in place after
    a successful update (until continue_generation) and `torch_empty_cache` hands the allocator's cached blocks back
    after it; `recapture_cuda_graph` asks nothing here (the graphs read the weights where the update writes them) and
    `token_step` is the trainer's step, taken as given. `is_async` and `manifest` are refused when set
    (weights/sources/disk.check_request): nothing here would honour them."""

    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False
    session_id: str | None = None  # the begin_weight_update session this call belongs to (see weights/session.py); None: as SGLang
    keep_pause: bool = False
    torch_empty_cache: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0
    is_async: bool = False
    manifest: dict | None = None


@dataclass(kw_only=True, slots=True)
class UpdateWeightsFromTensorRequest:
    """`named_tensors`: list of (HF name, tensor) in process, or plain-data handle descriptors
    (see hotswap.wire.ipc) when the tensors live in another process; or, instead, SGLang's
    `serialized_named_tensors` (one MultiprocessingSerializer payload per TP rank, read by the restricted
    decoder weights/sglang_payloads.py) with load_format None, "direct" or "flattened_bucket"."""

    named_tensors: list[tuple[str, Any]] | list[dict] | None = None
    serialized_named_tensors: list[str | bytes] | None = None
    load_format: str | None = None
    flush_cache: bool = True
    weight_version: str | None = None
    abort_all_requests: bool = False
    session_id: str | None = None  # the begin_weight_update session this call belongs to (see weights/session.py); None: as SGLang


@dataclass(kw_only=True, slots=True)
class UpdateWeightsFromIPCRequest:
    """checkpoint-engine's push: a ZMQ socket address per device UUID; buckets arrive over ZMQ."""

    zmq_handles: dict[str, str]
    flush_cache: bool = True
    weight_version: str | None = None
    session_id: str | None = None  # the begin_weight_update session this call belongs to (see weights/session.py); None: as SGLang


@dataclass(kw_only=True, slots=True)
class InitWeightsUpdateGroupRequest:
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str | None = None  # None: nccl on CUDA, gloo on CPU
    timeout_s: float = 600.0


@dataclass(kw_only=True, slots=True)
class UpdateWeightsFromDistributedRequest:
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    flush_cache: bool = True
    weight_version: str | None = None
    load_format: str | None = None  # None: one broadcast per tensor; "flattened_bucket": one per call
    abort_all_requests: bool = False
    session_id: str | None = None  # the begin_weight_update session this call belongs to (see weights/session.py); None: as SGLang


@dataclass(kw_only=True, slots=True)
class DestroyWeightsUpdateGroupRequest:
    group_name: str = "weight_update_group"


@dataclass(kw_only=True, slots=True)
class GetWeightsByNameRequest:
    name: str
    truncate_size: int = 100


@dataclass(kw_only=True, slots=True)
class GetWeightsByNameOutput(ControlOutput):
    parameter: list | None = None
    dtype: str | None = None
    shape: list[int] | None = None


@dataclass(kw_only=True, slots=True)
class CheckWeightsRequest:
    action: str  # snapshot | compare | reset_tensors | checksum
    expected: dict[str, str] | None = None  # for checksum: a manifest to compare against
    skip_tensor_list: list[str] | None = None  # SGLang's: parameters left out of checksum and compare
    allow_quant_error: bool = False  # SGLang's: hotswap serves no quantized weights, so equality is exact either way


@dataclass(kw_only=True, slots=True)
class CheckWeightsOutput(ControlOutput):
    checksums: dict[str, str] | None = None
    digest: str | None = None
    mismatches: list[str] | None = None
    ranks: list[dict] | None = None  # SGLang's checksum reply: one entry per GPU rank


@dataclass(kw_only=True, slots=True)
class ReleaseMemoryOccupationRequest:
    tags: list[str] | None = None
    keep_weights_on_host: bool = True  # False: the caller will reload weights after resume


@dataclass(kw_only=True, slots=True)
class ResumeMemoryOccupationRequest:
    tags: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class SaveShardedModelRequest:
    path: str
    pattern: str | None = None  # shard names from {rank}, {part}, {total}; plain file names only
    max_size: int = 5 * 1024**3
    overwrite: bool = False  # replace weight/config/tokenizer files already in `path` (refused otherwise)


@dataclass(kw_only=True, slots=True)
class SaveRemoteModelRequest:
    url: str
    overwrite: bool = False  # replace a checkpoint already at `url` (refused otherwise)


@dataclass(kw_only=True, slots=True)
class PauseGenerationRequest:
    mode: str = "abort"  # abort | retract | in_place | wait


@dataclass(kw_only=True, slots=True)
class ContinueGenerationRequest:
    pass


@dataclass(kw_only=True, slots=True)
class UpdateWeightVersionRequest:
    new_version: str
    abort_all_requests: bool = True  # SGLang's UpdateWeightVersionReqInput default: requests of the old version end


@dataclass(kw_only=True, slots=True)
class PostProcessWeightsRequest:
    """SGLang's (slime's and miles' builds): around a weight update of a quantized model, restore the loadable layout
    before it (`restore_weights_before_load`) and rebuild the runtime one after it (`post_process_quantization`)."""

    restore_weights_before_load: bool = False
    post_process_quantization: bool = False


@dataclass(kw_only=True, slots=True)
class BeginWeightUpdateRequest:
    pass


@dataclass(kw_only=True, slots=True)
class EndWeightUpdateRequest:
    weight_version: str | None = None
    abort: bool = False  # roll back every update of the session instead of committing (a trainer-side failure)
    session_id: str | None = None  # end only this session (a stale id leaves the open one alone); None: whichever is open


@dataclass(kw_only=True, slots=True)
class BeginWeightUpdateOutput(ControlOutput):
    """Unpacks as `(success, message)`; `session_id` names the opened session ("" when refused): calls that
    give it run only inside that session, so a late call of an ended session can never land in another."""

    session_id: str = ""


@dataclass(kw_only=True, slots=True)
class WeightUpdateExtra(dict):
    """hotswap's facts about one update, beside SGLang's fields: the reply's `extra` object, which holds only the
    facts set (in the order set), as trainers read it (`extra.get("received")`)."""

    validate_s: float | None = None  # seconds spent checking the new tensors before applying them
    buckets: int | None = None  # checkpoint-engine buckets received
    received: bool | None = None  # update_weights_from_distributed: this engine took part in the broadcasts (lockstep held)
    session: str | None = None  # how the update session a stale call named had ended (weights/session.py)

    def __setattr__(self, name: str, value: Any) -> None:
        object.__setattr__(self, name, value)
        if value is None:
            dict.pop(self, name, None)
        else:
            dict.__setitem__(self, name, value)


@dataclass(kw_only=True, slots=True)
class WeightUpdateOutput(ControlOutput):
    weight_version: str = ""
    num_tensors: int = 0
    num_bytes: int = 0
    elapsed_s: float = 0.0
    rolled_back: bool = False
    num_paused_requests: int = 0  # SGLang's: started requests held (paused in place or retracted) across the update
    extra: WeightUpdateExtra = field(default_factory=WeightUpdateExtra)


@dataclass(kw_only=True, slots=True)
class DiskUpdateOutput(WeightUpdateOutput):
    """`Engine.update_weights_from_disk`'s reply. SGLang's Engine returns the tokenizer manager's 3-tuple
    there (entrypoints/engine.py -> tokenizer_manager.py `_wait_for_model_update_from_disk`), so ported code
    unpacks `ok, msg, num_paused = ...`; its other weight methods return `(success, message)`."""

    @classmethod
    def of(cls, out: ControlOutput) -> DiskUpdateOutput:
        return cls(**{f.name: getattr(out, f.name) for f in fields(WeightUpdateOutput) if hasattr(out, f.name)})

    def astuple(self) -> tuple:
        return (self.success, self.message, self.num_paused_requests)
