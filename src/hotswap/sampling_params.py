"""Per-request sampling parameters, validated once at submission (SGLang's names)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hotswap.errors import ConstrainedDecodingError, SamplingParamsError, shown

INT64_MAX = 2**63 - 1  # seeds and top_k travel to the device as int64
MAX_STOPS = 1024  # stop strings (and stop token ids) per request: each is checked after every token, on the scheduler thread
# top logprobs per position: SGLang sets no limit (verl's distillation teacher asks for its topk, 32 or 128), but each
# one is a (logprob, id, text) entry in every position's reply; the OpenAI and vLLM routes keep their own limit of 20
MAX_TOP_LOGPROBS = 1024
MAX_STOP_CHARS = 1 << 16  # all stop strings together: after every token each is searched for in the text's last len(stop) characters
MAX_LOGIT_BIAS = 1024  # logit_bias entries per request: every step writes each into the logits of each of the request's rows
# SGLang's _SAMPLING_EPS: a temperature below it samples greedily (SamplingParams.__post_init__ makes it top_k 1 at
# temperature 1), so its logprobs are the raw ones, not those of logits divided by a near-zero temperature
GREEDY_TEMPERATURE = 1e-6

# constrained decoding (SGLang's and vLLM's names): refused by name wherever a request may carry it
CONSTRAINED_DECODING_FIELDS = ("regex", "json_schema", "ebnf", "structural_tag", "guided_json", "guided_regex", "guided_choice",
                               "guided_grammar", "guided_decoding", "guided_decoding_backend", "structured_outputs")


def is_seed(value: object) -> bool:
    """A seed the device takes: an integer (not a bool) in [0, 2**63)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= INT64_MAX


def refuse_constrained_decoding(values: dict) -> None:
    """The one refusal of a set constrained-decoding field, on every path (Engine, /generate, OpenAI and vLLM
    routes): hotswap does not constrain decoding, and an ignored constraint would silently give unconstrained
    text. Unset (None, "", {}) passes: frameworks send the fields empty."""
    for key in CONSTRAINED_DECODING_FIELDS:
        if values.get(key):
            raise ConstrainedDecodingError(key, f"{key!r} (constrained decoding) is not supported by hotswap; leave it unset")


@dataclass(kw_only=True, slots=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    min_p: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False  # SGLang's: no token-based stop at all (eos nor stop_token_ids); length and stop strings still apply
    keep_stop_token_ids: bool = False  # with ignore_eos, stop_token_ids still stop (vLLM's ignore_eos skips only eos)
    return_logprob: bool = False
    top_logprobs_num: int = 0
    n: int = 1
    skip_special_tokens: bool = True
    # MoE: return each position's routed experts in meta_info["routed_experts"], from absolute position
    # routed_experts_start_len on (request-level fields in SGLang's API; carried here so every route hands
    # them through like return_logprob)
    return_routed_experts: bool = False
    # penalties and biases, applied to the logits on the device before temperature and filters (runner/penalties.py):
    # SGLang's rule, frequency and presence (output tokens), repetition (output tokens), logit_bias, min_new_tokens
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    repetition_penalty: float = 1.0
    min_new_tokens: int = 0  # eos and stop_token_ids are masked until this many tokens are out
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit (OpenAI)
    # vLLM's rule instead (vLLM's token route /inference/v1/generate sets it): logit_bias, repetition over the prompt
    # and output tokens, then frequency and presence; and stop strings wait until more than min_new_tokens are out
    vllm_penalty_rule: bool = False
    # SGLang's no_stop_trim: a matched stop string or token stays, with all the text its tokens decode to (trim_matched_stop
    # leaves the text untouched); vLLM's include_stop_str_in_output: they stay, the text cut right after a stop string
    no_stop_trim: bool = False
    include_stop_str_in_output: bool = False
    # SGLang's `logprob_start_len` (a top-level generate argument there): prompt logprobs from this position;
    # -1: none but the last prompt token's placeholder
    logprob_start_len: int = -1
    return_top_p_token_ids: bool = False  # slime's custom_params flag: each output token's kept ids (top-k/p/min-p)
    routed_experts_start_len: int = 0
    # SGLang's per-request stream_interval: a streamed request's outputs come every this many tokens (None: the
    # server's --stream-interval), as its scheduler reads `req.sampling_params.stream_interval or server's`
    stream_interval: int | None = None

    @classmethod
    def from_dict(cls, params: dict | SamplingParams | None) -> SamplingParams:
        """Build from a user dict, naming any unknown key instead of silently ignoring it."""
        if params is None:
            return cls()
        if isinstance(params, SamplingParams):
            params.validate()
            return params
        if not isinstance(params, dict):
            raise SamplingParamsError(f"sampling_params must be a dict, got {type(params).__name__}")
        values = dict(params)
        refuse_constrained_decoding(values)
        if "custom_params" in values:
            values.update(_custom_params(values.pop("custom_params")))
        unknown = sorted(set(values) - _FIELD_NAMES)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        if isinstance(values.get("logit_bias"), dict):
            values["logit_bias"] = _logit_bias(values["logit_bias"])
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        for key in ("stop", "stop_token_ids"):
            if isinstance(values.get(key), tuple):
                values[key] = list(values[key])
        if isinstance(values.get("stop_token_ids"), list):  # SGLang's __post_init__ drops None entries
            values["stop_token_ids"] = [t for t in values["stop_token_ids"] if t is not None]
        for key in _NONE_IS_DEFAULT:
            if key in values and values[key] is None:
                del values[key]
        sp = cls(**values)
        sp.validate()
        return sp

    def validate(self) -> None:
        def bad(msg: str) -> SamplingParamsError:
            return SamplingParamsError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be an integer >= 0, got {shown(self.max_new_tokens)}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise bad(f"temperature must be in [0, 100], got {shown(self.temperature)}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {shown(self.top_p)}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or (self.top_k < 1 and self.top_k != -1) or self.top_k > INT64_MAX:
            raise bad(f"top_k must be -1 (off) or in [1, 2**63), got {shown(self.top_k)}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {shown(self.min_p)}")
        if self.seed is not None and not is_seed(self.seed):
            raise bad(f"seed must be an integer in [0, 2**63), got {shown(self.seed)}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 256:
            raise bad(f"n must be in [1, 256], got {shown(self.n)}")
        if not isinstance(self.top_logprobs_num, int) or not 0 <= self.top_logprobs_num <= MAX_TOP_LOGPROBS:
            raise bad(f"top_logprobs_num must be in [0, {MAX_TOP_LOGPROBS}], got {shown(self.top_logprobs_num)}")
        if not isinstance(self.return_routed_experts, bool):
            raise bad(f"return_routed_experts must be a boolean, got {shown(self.return_routed_experts)}")
        start = self.routed_experts_start_len
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise bad(f"routed_experts_start_len must be an integer >= 0, got {shown(start)}")
        if not isinstance(self.stop, list) or not isinstance(self.stop_token_ids, list):
            raise bad("stop must be a string or a list of strings, stop_token_ids a list of integers")
        if len(self.stop) > MAX_STOPS or len(self.stop_token_ids) > MAX_STOPS:
            raise bad(f"stop and stop_token_ids take at most {MAX_STOPS} entries each, got {len(self.stop)} and {len(self.stop_token_ids)}")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if sum(map(len, self.stop)) > MAX_STOP_CHARS:
            raise bad(f"stop strings take at most {MAX_STOP_CHARS} characters together, got {sum(map(len, self.stop))}")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of non-negative integers")
        for name in ("frequency_penalty", "presence_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2.0 <= value <= 2.0:
                raise bad(f"{name} must be in [-2, 2], got {shown(value)}")
        if not _is_number(self.repetition_penalty) or not 0.0 < self.repetition_penalty <= 2.0:
            raise bad(f"repetition_penalty must be in (0, 2], got {shown(self.repetition_penalty)}")
        if not _is_int(self.min_new_tokens) or self.min_new_tokens < 0:
            raise bad(f"min_new_tokens must be an integer >= 0, got {shown(self.min_new_tokens)}")
        if self.min_new_tokens > self.max_new_tokens:  # SGLang's and vLLM's rule
            raise bad(f"min_new_tokens ({self.min_new_tokens}) must be at most max_new_tokens ({self.max_new_tokens})")
        if isinstance(self.logit_bias, dict) and len(self.logit_bias) > MAX_LOGIT_BIAS:
            raise bad(f"logit_bias takes at most {MAX_LOGIT_BIAS} entries, got {len(self.logit_bias)}")
        if not isinstance(self.logit_bias, dict) or not all(
                _is_int(t) and t >= 0 and _is_number(b) and -100.0 <= b <= 100.0 for t, b in self.logit_bias.items()):
            raise bad("logit_bias must map token ids (>= 0) to biases in [-100, 100]")
        if self.stream_interval is not None and (not _is_int(self.stream_interval) or self.stream_interval < 1):
            raise bad(f"stream_interval must be an integer >= 1, got {shown(self.stream_interval)}")
        if not _is_int(self.logprob_start_len) or self.logprob_start_len < -1:
            raise bad(f"logprob_start_len must be -1 or an integer >= 0, got {shown(self.logprob_start_len)}")
        for name in ("no_stop_trim", "include_stop_str_in_output", "return_top_p_token_ids", "ignore_eos", "keep_stop_token_ids",
                     "vllm_penalty_rule", "skip_special_tokens", "return_logprob"):
            if not isinstance(getattr(self, name), bool):
                raise bad(f"{name} must be a boolean, got {shown(getattr(self, name))}")

    @property
    def keeps_stop_text(self) -> bool:
        """A matched stop token's text stays in the text."""
        return self.no_stop_trim or self.include_stop_str_in_output

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_TEMPERATURE or self.top_k == 1

    @property
    def has_penalties(self) -> bool:
        """Anything that changes the logits before sampling (a neutral request costs the batch nothing)."""
        return bool(self.frequency_penalty or self.presence_penalty or self.repetition_penalty != 1.0
                    or self.min_new_tokens or self.logit_bias)


_FIELD_NAMES = frozenset(f.name for f in fields(SamplingParams))
# None is the default for these, on every path, as SGLang's SamplingParams.__post_init__ reads it ("so that callers
# (e.g. /generate) can pass null"); max_new_tokens None (until the context is full) is RequestPrep's
_NONE_IS_DEFAULT = ("temperature", "top_p", "top_k", "min_p", "n", "seed", "stop", "stop_token_ids", "logit_bias",
                    "frequency_penalty", "presence_penalty", "repetition_penalty", "min_new_tokens", "ignore_eos",
                    "skip_special_tokens", "no_stop_trim", "include_stop_str_in_output", "stream_interval")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _custom_params(value) -> dict:
    """SGLang's custom_params: slime's `return_top_p_token_ids` is honoured. Its other keys are the input of a custom
    logit processor, which is refused by name when one is given; without one SGLang ignores them, and clients send
    them as per-request metadata (a worker or job id), so they are ignored here too."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SamplingParamsError("invalid sampling parameter: custom_params must be an object")
    return {"return_top_p_token_ids": value["return_top_p_token_ids"]} if "return_top_p_token_ids" in value else {}


def _logit_bias(bias: dict) -> dict:
    """OpenAI sends the token ids as strings: {"50256": -100}."""
    out = {}
    for key, value in bias.items():
        if isinstance(key, str) and key.strip().isdigit():
            key = int(key)
        if not _is_int(key):
            raise SamplingParamsError(f"invalid sampling parameter: logit_bias key {shown(key)} is not a token id")
        out[key] = value
    return out
