"""The OpenAI routes' requests: their models (fields they do not know are ignored, as vLLM and SGLang do; the types of
those they know are validated; parameters hotswap does not implement are refused with a 400 unless sent with their
neutral value) and what is built from them: the engine's sampling parameters, the prompt's checks."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from hotswap.engine.unserved import UNSERVED_OPENAI_FIELDS
from hotswap.server.generation import refuse_constrained_decoding_over_http, refuse_unserved_fields_over_http
from hotswap.server.http_utils import APIError

if TYPE_CHECKING:
    from hotswap.server.app import ServerState


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class SamplingFields(BaseModel):
    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def _no_constrained_decoding(cls, data: Any) -> Any:
        """SGLang's and vLLM's constrained-decoding extras, and SGLang's request fields hotswap does not serve
        (lora_path, session_params, return_hidden_states...), are refused by name when set, never dropped with
        the other unknown fields (an APIError passes through pydantic as it is: the one message, with `param`)."""
        if isinstance(data, dict):
            refuse_constrained_decoding_over_http(data)
            refuse_unserved_fields_over_http({k: v for k, v in data.items() if k not in cls.model_fields}, UNSERVED_OPENAI_FIELDS)
        return data

    model: str | None = None
    temperature: float | None = Field(None, ge=0.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    n: int = Field(1, ge=1, le=256)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # vLLM's range; -1 means unseeded, as vLLM's SamplingParams reads it
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions that vLLM and SGLang accept
    top_k: int | None = None
    min_p: float | None = Field(None, ge=0.0, le=1.0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    no_stop_trim: bool = False
    include_stop_str_in_output: bool = False  # vLLM's: a stop string or token stays, the text cut right after it
    repetition_penalty: float | None = None
    min_tokens: int = Field(0, ge=0)  # the engine's min_new_tokens: checked here, under its OpenAI name
    # SGLang's extra fields (MoE routing replay): the reply's `sglext.routed_experts` (SGLang's place: the first
    # choice's) and each choice's `routed_experts`, rows from absolute position routed_experts_start_len on
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0
    use_beam_search: bool = False
    cache_salt: str | None = None  # accepted: every weight update flushes the prefix cache, what a version salt is for
    # token-in/token-out for multi-turn RL: vLLM's token ids (`token_id:N` logprob tokens, `token_ids` and
    # `prompt_token_ids`) and SGLang's per-choice `meta_info` (output ids, logprobs, weight versions)
    return_tokens_as_token_ids: bool | None = None
    return_token_ids: bool | None = None
    return_meta_info: bool = False
    # SGLang's request id (the engine's: /abort_request reaches it, the reply's `id` is it); one per prompt, or one
    # string (a batch's prompts are then `{rid}_{i}`, as SGLang names them)
    rid: str | list[str] | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: each prompt token's logprob and the top-k
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: a text prompt gets the tokenizer's special tokens (a BOS) unless false


class ChatCompletionRequest(SamplingFields):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=0)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: Any = None  # vLLM's per-request template: refused by name (never run, never silently dropped)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # vLLM's: special tokens (a BOS) added on top of what the template renders
    # SGLang's: each choice carries the prompt's token ids (so does return_token_ids, beside `token_ids`)
    return_prompt_token_ids: bool = False
    # SGLang's pre-computed prompt (protocol.py: "bypasses chat template tokenization entirely"): miles' session
    # server (rollout/session/core.py) sends its own token-in/token-out ids here
    input_ids: list[int] | None = None
    # SGLang's, read where the server runs a reasoning parser: reasoning apart in `reasoning_content`, streamed as it comes
    separate_reasoning: bool = True
    stream_reasoning: bool = True


def refuse_request_chat_template(template: Any) -> None:
    """A request's own `chat_template` is refused by name, as vLLM refuses it unless started with
    --trust-request-chat-template (OpenAIServing._validate_chat_template); hotswap runs only the server's template, and
    dropping the field would render a prompt the client did not ask for."""
    if template is not None:
        raise APIError(400, "chat_template is passed with the request: hotswap renders with the server's chat template only "
                            "(--chat-template at launch)", param="chat_template")


def sampling_dict(body: SamplingFields, max_new_tokens: int, defaults: dict | None = None) -> dict:
    """The engine's sampling parameters (it validates the values: a bad one is a 400 naming it). `defaults`: values
    for the fields of config.GENERATION_SAMPLING_FIELDS the request leaves unset (a chat's: the model's)."""
    defaults = defaults or {}
    given = {name: getattr(body, name) if getattr(body, name) is not None else defaults.get(name)
             for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")}
    if body.use_beam_search:
        raise APIError(400, "use_beam_search is not supported by hotswap", param="use_beam_search")
    if body.min_tokens > max_new_tokens:  # under its OpenAI name (the engine's refusal names min_new_tokens)
        raise APIError(400, f"min_tokens ({body.min_tokens}) must be at most max_tokens ({max_new_tokens})", param="min_tokens")
    sp: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "temperature": 1.0 if given["temperature"] is None else given["temperature"],
        "n": body.n,
        "ignore_eos": body.ignore_eos,
        "skip_special_tokens": body.skip_special_tokens,
        "no_stop_trim": body.no_stop_trim,
        "include_stop_str_in_output": body.include_stop_str_in_output,
        "min_new_tokens": body.min_tokens,
    }
    for name in ("presence_penalty", "frequency_penalty", "logit_bias"):
        if getattr(body, name) is not None:
            sp[name] = getattr(body, name)
    if given["repetition_penalty"] is not None:
        sp["repetition_penalty"] = given["repetition_penalty"]
    if body.return_routed_experts:
        sp["return_routed_experts"] = True
    if body.routed_experts_start_len:  # the engine refuses it without return_routed_experts, or past the prompt
        sp["routed_experts_start_len"] = body.routed_experts_start_len
    if given["top_p"] is not None:
        sp["top_p"] = given["top_p"]
    if given["top_k"] is not None:
        sp["top_k"] = -1 if given["top_k"] == 0 else given["top_k"]  # vLLM's 0: off, as its own /inference/v1/generate reads it
    if given["min_p"] is not None:
        sp["min_p"] = given["min_p"]
    if body.seed is not None and body.seed != -1:
        sp["seed"] = body.seed & (2**63 - 1)  # another negative seed: a seed of its own in the engine's [0, 2**63)
    if body.stop:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop)
        if any(not s for s in stops):
            raise APIError(400, "stop strings must be non-empty", param="stop")
        sp["stop"] = stops
    if body.stop_token_ids:
        sp["stop_token_ids"] = list(body.stop_token_ids)
    return sp


def check_prompt(state: ServerState, ids: list[int], max_tokens: int | None, index: int, max_tokens_field: str = "max_tokens",
                 prompt_field: str = "prompt") -> None:
    """The prompt (the request's `prompt_field`) fits the context and the KV cache, with `max_tokens` (its
    `max_tokens_field`) after it."""
    if not ids:
        raise APIError(400, f"prompt {index} is empty", param=prompt_field)
    if len(ids) > state.max_prompt_tokens:
        raise APIError(400, f"prompt {index} has {len(ids)} tokens; this server takes at most {state.max_prompt_tokens} "
                            f"(context length {state.max_context_len}, KV cache {state.kv_capacity_tokens} tokens)", param=prompt_field)
    if max_tokens is not None and len(ids) + max_tokens > state.max_context_len and not state.allow_auto_truncate:
        raise APIError(400, f"prompt {index} has {len(ids)} tokens and {max_tokens_field} is {max_tokens}: {len(ids) + max_tokens} "
                            f"exceeds the context length {state.max_context_len}", param=max_tokens_field)
