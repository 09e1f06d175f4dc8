"""Configs: what the checkpoint says (ModelConfig) and how the engine runs it (EngineConfig)."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch

from hotswap.errors import CheckpointError, HotswapError, UnsupportedModelError
from hotswap.sglang_server_args import (
    LORA_ONLY,
    NOT_COMPARABLE,
    REASONING_PARSERS,
    RUN_ONLY,
    SGLANG_DEFAULTS,
    TOOL_CALL_PARSERS,
)
from hotswap.wire.dtypes import DTYPES_BY_NAME
from hotswap.wire.ipc import new_ipc_token, shm_block_prefix

# architecture name in config.json -> (the config key switching the q/k/v bias (None: transformers always has one),
# its default, RMSNorm on q and k per head). `attention_bias` also biases o_proj (transformers' Llama and Qwen3).
SUPPORTED_ARCHITECTURES = {
    "LlamaForCausalLM": ("attention_bias", False, False),
    "Qwen2ForCausalLM": (None, True, False),  # Qwen2Attention's q/k/v always have a bias, whatever the config says
    "Qwen3ForCausalLM": ("attention_bias", False, True),
    "Qwen3MoeForCausalLM": ("attention_bias", False, True),
    "Qwen2MoeForCausalLM": ("qkv_bias", True, False),  # q/k/v only (o_proj has none); a gated shared expert
}
# the rope types served (models/rope.py), transformers' names
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3")

# the dtypes a model is served in, by the names requests use (SGLang's --dtype "float" / "half" among them): float64 is not one
_DTYPES = {name: dtype for name, dtype in DTYPES_BY_NAME.items() if dtype is not torch.float64}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in _DTYPES:
        raise HotswapError(f"unsupported dtype {name!r}; expected one of {sorted(_DTYPES)} or 'auto'")
    return _DTYPES[name]


@dataclass(kw_only=True, slots=True)
class ModelConfig:
    """The architecture facts the engine needs, read from a HF config.json."""

    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    attention_bias: bool  # on q/k/v
    qk_norm: bool
    o_proj_bias: bool = False  # Llama's and Qwen3's attention_bias
    mlp_bias: bool = False  # Llama's mlp_bias: gate, up and down projections
    torch_dtype: torch.dtype
    eos_token_ids: list[int] = field(default_factory=list)
    # mixture of experts (Qwen3-MoE); num_experts == 0: every layer is dense
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: list[int] = field(default_factory=list)
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE: an always-on expert scaled by sigmoid(shared_expert_gate)
    # the context length the engine serves (model_config_for sets it; 0: not yet). The rotary table and the widest page
    # table cover max(context_len, max_position_embeddings) positions (`max_positions`)
    context_len: int = 0
    model_type: str = ""  # config.json's model_type ("qwen3", "qwen3_moe", ...), as SGLang's /model_info reports it
    # generation_config.json's sampling values (GENERATION_SAMPLING_FIELDS it sets): a chat completion that leaves
    # one unset samples with it, as SGLang's chat does (sampling_defaults="model")
    sampling_defaults: dict[str, float] = field(default_factory=dict)

    def is_moe_layer(self, layer_id: int) -> bool:
        """HF's rule (Qwen3MoeDecoderLayer): sparse unless listed in mlp_only_layers or off the sparse step."""
        return (self.num_experts > 0 and layer_id not in self.mlp_only_layers
                and (layer_id + 1) % self.decoder_sparse_step == 0)

    @property
    def max_positions(self) -> int:
        return max(self.context_len, self.max_position_embeddings)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    @classmethod
    def from_pretrained(cls, model_path: str | Path) -> ModelConfig:
        path = Path(model_path)
        if not path.is_dir():
            raise CheckpointError(f"model path {str(path)!r} is not a directory")
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise CheckpointError(f"{str(path)!r} is not a checkpoint folder: no config.json")
        try:
            raw = json.loads(cfg_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg_file} is not valid JSON: {exc}") from exc
        archs = raw.get("architectures") or []
        arch = next((a for a in archs if a in SUPPORTED_ARCHITECTURES), None)
        if arch is None:
            raise UnsupportedModelError(
                f"unsupported architecture {archs or raw.get('model_type')!r}; "
                f"hotswap serves {sorted(SUPPORTED_ARCHITECTURES)}"
            )
        bias_key, bias_default, qk_norm = SUPPORTED_ARCHITECTURES[arch]
        _check_layers(raw, arch)
        heads = raw["num_attention_heads"]
        dtype_name = raw.get("torch_dtype") or raw.get("dtype") or "float32"
        rope_theta, rope_scaling = _rope(raw)
        attention_bias = bool(raw.get(bias_key, bias_default)) if bias_key else bias_default
        cfg = cls(
            architecture=arch,
            model_type=str(raw.get("model_type") or ""),
            vocab_size=raw["vocab_size"],
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_layers=raw["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=raw.get("num_key_value_heads") or heads,
            head_dim=raw.get("head_dim") or raw["hidden_size"] // heads,
            rms_norm_eps=raw.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=raw.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=attention_bias,
            o_proj_bias=attention_bias and bias_key == "attention_bias",
            mlp_bias=bool(raw.get("mlp_bias")) and arch == "LlamaForCausalLM",
            qk_norm=qk_norm,
            torch_dtype=parse_dtype(dtype_name if dtype_name in _DTYPES else "float32"),
            eos_token_ids=_eos_ids(raw.get("eos_token_id")),
            **_moe_fields(raw),
        )
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            gen = json.loads(gen_file.read_text())
            cfg.eos_token_ids = sorted(set(cfg.eos_token_ids) | set(_eos_ids(gen.get("eos_token_id"))))
            cfg.sampling_defaults = {k: gen[k] for k in GENERATION_SAMPLING_FIELDS
                                     if isinstance(gen.get(k), (int, float)) and not isinstance(gen[k], bool)}
        if cfg.num_heads % cfg.num_kv_heads:
            raise CheckpointError(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {cfg.num_kv_heads}")
        return cfg


def _rope(raw: dict) -> tuple[float, dict | None]:
    """(rope_theta, the rope scaling with its `rope_type`, None for plain rotary) as transformers reads them
    (RotaryEmbeddingConfigMixin.convert_rope_params_to_dict, standardize_rope_params): transformers 4's `rope_scaling`
    (old ones say `type`) wins over transformers 5's `rope_parameters`, a theta inside the dict over the top-level
    `rope_theta`, and llama3's original_max_position_embeddings defaults to max_position_embeddings (yarn's too, in
    models/rope.py: whether the config gives it decides the derived context length, `_context_len`)."""
    params = raw.get("rope_parameters") if isinstance(raw.get("rope_parameters"), dict) else {}
    scaling = raw.get("rope_scaling") or params
    theta = float(scaling.get("rope_theta") or raw.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModelError(f"unsupported rope type {kind!r} (rope_scaling {scaling!r}); hotswap implements {list(ROPE_TYPES)}")
    if kind == "default":
        return theta, None
    scaling = {k: v for k, v in scaling.items() if k not in ("type", "rope_theta")} | {"rope_type": kind}
    if kind == "llama3":
        scaling.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
    return theta, scaling


def _check_layers(raw: dict, arch: str) -> None:
    """Refuse what the decoder does not compute, instead of serving other logits than transformers': sliding-window
    layers (Qwen2's use_sliding_window past max_window_layers, transformers 5's layer_types) and activations
    other than SiLU (SGLang's LlamaMLP refuses those too)."""
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        raise UnsupportedModelError(f"hidden_act {act!r} is not supported; hotswap's {arch} computes SiLU (silu) only")
    if not (raw.get("use_sliding_window") and raw.get("sliding_window")):
        return  # transformers' Qwen2Config / Qwen3Config drop the window then: every layer attends fully
    types = raw.get("layer_types") or ["sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
                                       for i in range(raw["num_hidden_layers"])]
    sliding = [i for i, t in enumerate(types) if t != "full_attention"]
    if sliding:
        raise UnsupportedModelError(f"layers {sliding} use sliding-window attention (use_sliding_window, sliding_window "
                                    f"{raw.get('sliding_window')}, layer_types); hotswap computes full attention only")


# the generation_config.json fields SGLang's chat takes as defaults (ModelConfig.get_default_sampling_params)
GENERATION_SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def _moe_fields(raw: dict) -> dict:
    """The MoE keys of a config.json (transformers 5 writes `num_local_experts` for `num_experts`)."""
    experts = raw.get("num_experts") or raw.get("num_local_experts") or 0
    if not experts:
        return {}
    fields = {
        "num_experts": int(experts),
        "num_experts_per_tok": int(raw["num_experts_per_tok"]),
        "moe_intermediate_size": int(raw["moe_intermediate_size"]),
        "norm_topk_prob": bool(raw.get("norm_topk_prob", False)),
        "decoder_sparse_step": int(raw.get("decoder_sparse_step") or 1),
        "mlp_only_layers": [int(i) for i in raw.get("mlp_only_layers") or []],
        "shared_expert_intermediate_size": int(raw.get("shared_expert_intermediate_size") or 0),
    }
    if not 0 < fields["num_experts_per_tok"] <= fields["num_experts"]:
        raise CheckpointError(f"num_experts_per_tok {fields['num_experts_per_tok']} must be in 1..num_experts {experts}")
    return fields


def _eos_ids(value) -> list[int]:
    if value is None:
        return []
    return [value] if isinstance(value, int) else [int(v) for v in value]


ATTENTION_BACKENDS = ("auto", "torch", "triton")
# SGLang's attention backends -> ours: its GPU kernels' names run hotswap's own kernels (the same attention, other code),
# "torch_native" is the PyTorch path; any other name is refused
_SGLANG_ATTENTION_BACKENDS = {"torch_native": "torch", "fa3": "auto", "fa4": "auto", "flashinfer": "auto", "flex_attention": "auto",
                              "trtllm_mha": "auto"}

# EngineConfig's integer knobs -> their least value (None: any integer)
_INTEGER_FLOORS: dict[str, int | None] = {
    "page_size": 0, "num_pages": 0, "max_running_requests": 1, "max_num_batched_tokens": 1, "chunked_prefill_size": None,
    "max_context_len": 0, "cuda_graph_max_batch": 0, "extend_cuda_graph_max_tokens": 0, "max_total_tokens": 0,
    "base_gpu_id": 0, "gpu_id_step": 1,
}

# process-group timeouts become timedeltas: a week stands for "never" and stays finite
_MAX_TIMEOUT_S = 7 * 24 * 3600.0


def _is_json(value: object) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError):
        return False
    return True


def _check_fraction(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
        raise HotswapError(f"{name} must be a fraction in (0, 1], got {value!r}")


@dataclass(kw_only=True, slots=True)
class EngineConfig:
    """How one engine runs a model. Defaults suit a single GPU; the CPU picks smaller ones."""

    model_path: str
    dtype: str = "auto"
    device: str = "auto"
    load_format: str = "auto"  # "auto": the checkpoint's safetensors; "dummy": random weights (benchmarks)
    page_size: int = 0  # 0 = 16 on CUDA, 4 on CPU
    num_pages: int = 0  # 0 = sized from mem_fraction_static or kv_cache_memory_fraction on CUDA, 1024 on CPU
    kv_cache_memory_fraction: float = 0.8  # the share of the memory the weights left free that the KV cache takes
    # SGLang's --mem-fraction-static, as SGLang sizes with it: weights and KV cache together take this share of the
    # memory free before the weights loaded, the rest stays free (activations, graphs, a trainer beside the engine).
    # When set it sizes the KV cache instead of kv_cache_memory_fraction (runner/kv_cache.py: kv_pool_bytes)
    mem_fraction_static: float | None = None
    max_total_tokens: int = 0  # SGLang's cap on the KV cache's tokens, in whole pages, below what memory allows (0: none)
    max_running_requests: int = 512  # an RL rollout (P prompts x n samples) keeps hundreds of sequences in flight
    max_num_batched_tokens: int = 8192
    chunked_prefill_size: int = 2048  # <= 0 (SGLang's -1): no chunk limit of its own, prompts are cut only by max_num_batched_tokens
    max_context_len: int = 0  # 0 = the model's max_position_embeddings
    # SGLang's --allow-auto-truncate: a max_new_tokens past the context is cut to fit instead of refused (400)
    allow_auto_truncate: bool = False
    enable_prefix_cache: bool = True
    attention_backend: str = "auto"  # "torch" | "triton" | "auto" (or SGLang's names: _SGLANG_ATTENTION_BACKENDS)
    enable_cuda_graph: bool = True
    cuda_graph_max_batch: int = 0  # decode graphs for batches up to this many rows (0: max_running_requests)
    extend_cuda_graph_max_tokens: int = 8192  # prefill/mixed steps up to this many tokens replay graphs (0: eager)
    # decode batches of 1 to 64 rows use our matmul kernels (kernels/skinny_matmul.py, rows_matmul.py; False: cuBLAS)
    enable_skinny_matmul: bool = True
    weight_update_bucket_bytes: int = 1 << 30
    # producer GPU memory kept mapped between CUDA IPC updates (0: none). Kept mappings keep the producer's
    # blocks alive, so the default stays small: it holds IPCWeightPusher's three reused pack buffers (calls_in_flight=3)
    # of 512 MiB (bucket_bytes); at least calls_in_flight * bucket_bytes for other settings. Raise it to the
    # model's size when a trainer sends handles of its live parameters (the same buffers every push).
    cuda_ipc_cache_bytes: int = 3 << 29
    weight_load_strategy: str = "auto"  # disk reads: "auto" (pinned on CUDA) | "pinned" | "register" | "hybrid" | "plain" (weights/fast_reader.py)
    weight_load_threads: int = 16  # reader threads for disk loads
    weight_load_staging_bytes: int = 512 << 20  # pinned host staging for disk loads (and device scratch for dtype casts)
    weight_session_timeout_s: float = 600.0  # a begin_weight_update session idle this long is rolled back (a pause never is)
    # the longest a weight update waits for started requests to finish (SGLang's drain) before it is refused
    weight_update_drain_timeout_s: float = 600.0
    weight_read_timeout_s: float = 600.0  # a disk update whose reads (headers and data) take longer fails, weights untouched
    rollback_device_budget_bytes: int = 1 << 30
    enable_rollback: bool = True
    check_weights_finite: bool = False  # refuse updates holding NaN or Inf (costs one pass over the data)
    check_invariants_when_idle: bool = False
    seed: int = 0
    # logprobs of the raw logits instead of the temperature-scaled distribution (SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB)
    return_original_logprob: bool = False
    stream_interval: int = 1  # a streaming request gets an output every this many tokens (SGLang's --stream-interval)
    # SGLang's --incremental-streaming-output: a streamed chunk's text, output_ids and output logprobs hold only
    # its new tokens. Off (SGLang's default) every chunk repeats everything so far: O(length^2) bytes per stream
    incremental_streaming_output: bool = False
    max_queue_wait_s: float = 300.0  # the longest a request queues while generation is paused or a session is open
    tensor_parallel_size: int = 1  # > 1: one worker process per extra rank (cuda:k+r*step; gloo ranks on the CPU)
    # SGLang's placement on a host whose GPUs are all visible (slime's and AReaL's engines per node): rank r runs on GPU
    # base_gpu_id + r * gpu_id_step. With device 'cuda' / 'auto' base_gpu_id picks rank 0's GPU; 'cuda:N' already does
    base_gpu_id: int = 0
    gpu_id_step: int = 1
    # the longest rank 0 waits on a tensor-parallel worker in a startup or weight op (a load, a gather) before declaring
    # the engine broken
    tp_timeout_s: float = 600.0
    # SGLang's watchdog_timeout (its default): a forward step running longer (a hung device, or a tensor-parallel
    # rank) fails the engine and `hotswap serve` exits, as SGLang's watchdog ends its server (scheduler/watchdog.py);
    # it also bounds each wait of a step on a tensor-parallel worker (and a worker's on rank 0)
    step_timeout_s: float = 300.0
    # shared-memory blocks of update_weights_from_tensor must be named with this token's prefix
    # (hotswap.wire.ipc.shm_block_prefix); "" = a fresh random token, handed out by get_ipc_token
    ipc_token: str = ""
    tokenizer_path: str = ""  # "" = the model's folder
    chat_template: str = ""  # a Jinja chat template file replacing the tokenizer's ("" = the tokenizer's own)
    # MoE: keep each token's routed experts beside its KV (a per-cache-slot table) so requests can ask for
    # them (`return_routed_experts`, SGLang's routing replay interface)
    enable_return_routed_experts: bool = False
    weight_version: str = "default"  # the version the launch weights carry (SGLang's --weight-version)
    # every SGLang ServerArgs setting taken (engine_args_from_sglang), as given under its SGLang name, those that set a
    # field of ours too: get_server_info reports them, so a framework reading back what it launched with finds it (JSON
    # values only: TP workers get a copy)
    sglang_settings: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.stream_interval, int) or self.stream_interval < 1:
            raise HotswapError(f"stream_interval must be an integer >= 1, got {self.stream_interval!r}")
        if not self.max_queue_wait_s > 0:
            raise HotswapError(f"max_queue_wait_s must be > 0, got {self.max_queue_wait_s!r}")
        for name in ("tp_timeout_s", "step_timeout_s"):  # process-group timeouts: a positive number of seconds
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:  # NaN too
                raise HotswapError(f"{name} must be a positive number of seconds, got {value!r}")
            setattr(self, name, min(float(value), _MAX_TIMEOUT_S))  # a huge value (a watchdog turned off) stands for a week
        _check_fraction("kv_cache_memory_fraction", self.kv_cache_memory_fraction)
        self.attention_backend = _SGLANG_ATTENTION_BACKENDS.get(self.attention_backend, self.attention_backend)
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise HotswapError(f"unknown attention_backend {self.attention_backend!r}; use one of {ATTENTION_BACKENDS} "
                               f"or SGLang's {tuple(_SGLANG_ATTENTION_BACKENDS)}")
        for name, least in _INTEGER_FLOORS.items():  # checked here: a bad value would otherwise stop the scheduler thread
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or (least is not None and value < least):
                raise HotswapError(f"{name} must be an integer{'' if least is None else f' >= {least}'}, got {value!r}")
        if self.mem_fraction_static is not None:
            _check_fraction("mem_fraction_static", self.mem_fraction_static)
        if not self.ipc_token:
            self.ipc_token = new_ipc_token()
        shm_block_prefix(self.ipc_token)  # refuses a malformed token

    def resolved_device(self) -> torch.device:
        if self.device == "auto":
            return self._placed(torch.device("cuda")) if torch.cuda.is_available() else torch.device("cpu")
        try:
            dev = torch.device(self.device)
        except (RuntimeError, TypeError):  # torch's "Expected one of cpu, cuda, ipu, ..." lists devices hotswap never runs on
            raise HotswapError(f"unsupported device {self.device!r}; use 'cpu', 'cuda', 'cuda:N' or 'auto'") from None
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise HotswapError("device 'cuda' requested but CUDA is not available")
        if dev.type not in ("cpu", "cuda"):
            raise HotswapError(f"unsupported device {self.device!r}; use 'cpu', 'cuda' or 'auto'")
        return self._placed(dev)

    def _placed(self, dev: torch.device) -> torch.device:
        """Rank 0's GPU under SGLang's base_gpu_id; every rank's GPU must exist."""
        if dev.type != "cuda":
            return dev
        if dev.index is not None and self.base_gpu_id not in (0, dev.index):
            raise HotswapError(f"device {self.device!r} and base_gpu_id {self.base_gpu_id} name different GPUs: give one of them")
        index = dev.index if dev.index is not None else self.base_gpu_id
        last = index + (self.tensor_parallel_size - 1) * self.gpu_id_step
        if last >= torch.cuda.device_count():
            raise HotswapError(f"GPU {last} (rank {self.tensor_parallel_size - 1} of GPU {index} + rank x gpu_id_step "
                               f"{self.gpu_id_step}) does not exist: {torch.cuda.device_count()} GPU(s) are visible")
        return dev if self.base_gpu_id == 0 else torch.device("cuda", index)  # a bare 'cuda' stays as given


# SGLang ServerArgs names frameworks pass to `Engine(**server_args)` -> (our field, value converter)
_SGLANG_ALIASES: dict[str, tuple[str, object]] = {
    "tp_size": ("tensor_parallel_size", int),
    "disable_radix_cache": ("enable_prefix_cache", lambda v: not v),
    "random_seed": ("seed", lambda v: 0 if v is None else int(v)),
    "context_length": ("max_context_len", lambda v: 0 if v is None else int(v)),
    "disable_cuda_graph": ("enable_cuda_graph", lambda v: not v),
    "cuda_graph_max_bs": ("cuda_graph_max_batch", lambda v: 0 if v is None else int(v)),
    "max_prefill_tokens": ("max_num_batched_tokens", int),
    "stream_output": ("incremental_streaming_output", bool),  # the flag's name before SGLang renamed it
    "watchdog_timeout": ("step_timeout_s", float),
    "base_gpu_id": ("base_gpu_id", lambda v: 0 if v is None else v),
    "gpu_id_step": ("gpu_id_step", lambda v: 1 if v is None else v),
}


def _neutral(what: str, ok) -> object:
    return lambda v: None if ok(v) else what


# SGLang ServerArgs names taken with the values hotswap honours as they are; any other value is refused by
# name (the check returns the reason). The values shown are what these settings mean for hotswap.
_SGLANG_ACCEPTED: dict[str, object] = {
    "dp_size": _neutral("dp_size must be 1: run one engine per data-parallel replica", lambda v: v in (None, 1)),
    "pp_size": _neutral("pp_size must be 1: hotswap has no pipeline parallelism", lambda v: v in (None, 1)),
    "ep_size": _neutral("ep_size must be 1", lambda v: v in (None, 1)),
    "nnodes": _neutral("nnodes must be 1: an engine runs on one host", lambda v: v in (None, 1)),
    "node_rank": _neutral("node_rank must be 0", lambda v: v in (None, 0)),
    "custom_weight_loader": _neutral("custom_weight_loader is not supported: hotswap loads weights with its own loaders",
                                     lambda v: not v),
    "lora_paths": _neutral("lora_paths is not supported: hotswap serves no LoRA adapters", lambda v: not v),
    "enable_lora": _neutral("enable_lora is not supported", lambda v: not v),
    "quantization": _neutral("quantization is not supported", lambda v: v in (None, "")),
    "speculative_algorithm": _neutral("speculative decoding is not supported", lambda v: v in (None, "")),
    "tokenizer_mode": _neutral("tokenizer_mode must be 'auto'", lambda v: v in (None, "auto")),
    "kv_cache_dtype": _neutral("kv_cache_dtype must be 'auto' (the model's dtype)", lambda v: v in (None, "auto")),
    "enable_dp_attention": _neutral("enable_dp_attention is not supported", lambda v: not v),
    # the chat route's output parsers (server/chat_parsers/: one module per parser family); other parser names are refused by name
    "reasoning_parser": _neutral(f"hotswap serves the reasoning parsers {', '.join(REASONING_PARSERS)}",
                                 lambda v: v is None or v in REASONING_PARSERS),
    "tool_call_parser": _neutral(f"hotswap serves the tool-call parsers {', '.join(TOOL_CALL_PARSERS)}",
                                 lambda v: v is None or v in TOOL_CALL_PARSERS),
    # accepted whatever they say: hotswap's behaviour already matches, or they concern nothing it runs (logging, metrics
    # and kernel choices are sglang_server_args.RUN_ONLY's)
    "skip_tokenizer_init": None,  # read by engine/tokenizer.py: no tokenizer loads, input_ids in and output_ids out
    "trust_remote_code": None,  # hotswap implements its models natively: no remote code ever runs
    "enable_memory_saver": None,  # release/resume_memory_occupation always work
    "host": None,
    "port": None,
    "dist_init_addr": None,
    "served_model_name": None,
    "load_balance_method": None,
}


def engine_args_from_sglang(args: dict) -> dict:
    """SGLang's ServerArgs names -> EngineConfig fields (our own names pass through; None, SGLang's "choose for me", takes
    our default). Any other ServerArgs field is taken at SGLang's default or where it only changes how SGLang runs
    (sglang_server_args.py). Raises HotswapError naming each setting that cannot be honoured, and each name that is
    neither ours nor SGLang's."""
    ours = {f.name for f in fields(EngineConfig)} - {"sglang_settings"}
    out, problems, settings = {}, [], {}
    for name, value in args.items():
        if name in ours:
            if value is None:  # SGLang's "choose for me" (max_running_requests, chunked_prefill_size, ...): our default
                continue
            target, converted = name, value
        elif name in _SGLANG_ALIASES:
            target, convert = _SGLANG_ALIASES[name]
            try:
                converted = convert(value)
            except (TypeError, ValueError):
                problems.append(f"{name}={value!r} is not a valid value")
                continue
        elif name in _SGLANG_ACCEPTED:
            check = _SGLANG_ACCEPTED[name]
            reason = check(value) if check is not None else None
            if reason:
                problems.append(f"{name}={value!r}: {reason}")
            elif _is_json(value):
                settings[name] = value
            continue
        elif name in SGLANG_DEFAULTS:
            default = SGLANG_DEFAULTS[name]
            if name not in RUN_ONLY | LORA_ONLY and (default is NOT_COMPARABLE or value != default):
                problems.append(f"{name}={value!r}: SGLang's setting is not supported by hotswap"
                                + ("" if default is NOT_COMPARABLE else f" (only its default {default!r})"))
            elif _is_json(value):
                settings[name] = value
            continue
        else:
            problems.append(f"unknown engine argument {name}")
            continue
        if target in out and out[target] != converted:
            problems.append(f"{name} and {target} disagree ({converted!r} vs {out[target]!r})")
            continue
        out[target] = converted
        if name in SGLANG_DEFAULTS and _is_json(value):  # get_server_info reads it back under SGLang's name, as given
            settings[name] = value
    if problems:
        raise HotswapError("; ".join(problems))
    if settings:
        out["sglang_settings"] = settings
    env = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB")
    if env is not None and "return_original_logprob" not in out:  # SGLang's switch is this variable, read at launch
        out["return_original_logprob"] = env.strip().lower() in ("1", "true")
    return out


def model_config_for(config: EngineConfig) -> ModelConfig:
    """The checkpoint's ModelConfig with the engine's dtype applied, checked against its tensor-parallel size."""
    mc = ModelConfig.from_pretrained(config.model_path)
    if config.dtype != "auto":
        mc.torch_dtype = parse_dtype(config.dtype)
    tp = config.tensor_parallel_size
    if not isinstance(tp, int) or tp < 1:
        raise HotswapError(f"tensor_parallel_size must be a positive integer, got {tp!r}")
    if tp > 1 and mc.num_experts:
        raise HotswapError(f"tensor_parallel_size {tp}: {mc.architecture} is a mixture-of-experts model, and hotswap serves those on "
                           "one device only for now (expert weights are not sharded across tensor-parallel ranks); "
                           "use tensor_parallel_size=1")
    uneven = [f"{what} {n}" for what, n in (("num_attention_heads", mc.num_heads), ("intermediate_size", mc.intermediate_size)) if n % tp]
    if mc.num_kv_heads % tp and tp % mc.num_kv_heads:  # fewer KV heads than ranks are replicated (SGLang's QKVParallelLinear)
        uneven.append(f"num_key_value_heads {mc.num_kv_heads} (nor is it a multiple of them, to replicate each on as many ranks)")
    if uneven:
        raise HotswapError(f"tensor_parallel_size {tp} does not divide the model's {', '.join(uneven)}")
    if config.enable_return_routed_experts and not mc.num_experts:
        raise HotswapError(f"enable_return_routed_experts needs a mixture-of-experts model; {mc.architecture} has no experts")
    mc.context_len = _context_len(config.max_context_len, mc)
    return mc


def _context_len(asked: int, mc: ModelConfig) -> int:
    """The context length served: `asked` (max_context_len, SGLang's context_length) or the model's, derived as SGLang's
    get_context_length derives it: max_position_embeddings times the rope's factor, unless the rope names its
    original_max_position_embeddings (max_position_embeddings is then the scaled length already) or is llama3's. A
    longer one is refused unless SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1 (SGLang's ModelConfig._derive_context_length).
    Dynamic rope is served only within max_position_embeddings (past it transformers rescales by the batch's longest
    sequence), where SGLang derives factor times it."""
    scaling = mc.rope_scaling or {}
    kind = scaling.get("rope_type", "default")
    scaled = kind not in ("default", "llama3", "dynamic") and "original_max_position_embeddings" not in scaling
    derived = int(mc.max_position_embeddings * (scaling.get("factor", 1) if scaled else 1))
    if asked <= derived:
        return asked or derived
    if kind == "dynamic":
        raise HotswapError(f"context length {asked} is greater than max_position_embeddings {derived}: hotswap serves "
                           "dynamic rope scaling only within it (transformers rescales past it by the batch's longest sequence)")
    if os.environ.get("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "").strip().lower() not in ("1", "true"):
        raise HotswapError(f"context length {asked} is greater than the model's derived context length {derived} "
                           "(max_position_embeddings); set SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN=1 to serve it anyway, "
                           "as SGLang asks (the positions past it may give incorrect outputs)")
    return asked
