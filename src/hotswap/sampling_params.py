"""Per-request sampling parameters, validated once at submission (SGLang's names)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from hotswap.errors import SamplingParamsError

_INT64_MAX = 2**63 - 1  # seeds and top_k travel to the device as int64


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
    ignore_eos: bool = False
    return_logprob: bool = False
    top_logprobs_num: int = 0
    n: int = 1
    skip_special_tokens: bool = True
    # MoE: return each position's routed experts in meta_info["routed_experts"], from absolute position
    # routed_experts_start_len on (request-level fields in SGLang's API; carried here so every route hands
    # them through like return_logprob)
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0

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
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise SamplingParamsError(f"unknown sampling parameter(s): {', '.join(unknown)}")
        values = dict(params)
        if isinstance(values.get("stop"), str):
            values["stop"] = [values["stop"]]
        for key in ("stop", "stop_token_ids"):
            if isinstance(values.get(key), tuple):
                values[key] = list(values[key])
        for key in ("stop", "stop_token_ids"):
            if values.get(key) is None:
                values.pop(key, None)
        sp = cls(**values)
        sp.validate()
        return sp

    def validate(self) -> None:
        def bad(msg: str) -> SamplingParamsError:
            return SamplingParamsError(f"invalid sampling parameter: {msg}")

        if not isinstance(self.max_new_tokens, int) or isinstance(self.max_new_tokens, bool) or self.max_new_tokens < 0:
            raise bad(f"max_new_tokens must be an integer >= 0, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, (int, float)) or not 0.0 <= self.temperature <= 100.0:
            raise bad(f"temperature must be in [0, 100], got {self.temperature!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or (self.top_k < 1 and self.top_k != -1) or self.top_k > _INT64_MAX:
            raise bad(f"top_k must be -1 (off) or in [1, 2**63), got {self.top_k!r}")
        if not isinstance(self.min_p, (int, float)) or not 0.0 <= self.min_p <= 1.0:
            raise bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool) or not 0 <= self.seed <= _INT64_MAX):
            raise bad(f"seed must be an integer in [0, 2**63), got {self.seed!r}")
        if not isinstance(self.n, int) or not 1 <= self.n <= 256:
            raise bad(f"n must be in [1, 256], got {self.n!r}")
        if not isinstance(self.top_logprobs_num, int) or not 0 <= self.top_logprobs_num <= 20:
            raise bad(f"top_logprobs_num must be in [0, 20], got {self.top_logprobs_num!r}")
        if not isinstance(self.return_routed_experts, bool):
            raise bad(f"return_routed_experts must be a boolean, got {self.return_routed_experts!r}")
        start = self.routed_experts_start_len
        if not isinstance(start, int) or isinstance(start, bool) or start < 0:
            raise bad(f"routed_experts_start_len must be an integer >= 0, got {start!r}")
        if not isinstance(self.stop, list) or not isinstance(self.stop_token_ids, list):
            raise bad("stop must be a string or a list of strings, stop_token_ids a list of integers")
        if not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop must be a list of non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids must be a list of non-negative integers")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0 or self.top_k == 1
