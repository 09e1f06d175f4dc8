"""OpenAI-compatible routes: GET /v1/models, POST /v1/completions, POST /v1/chat/completions.

Request models accept and ignore fields they do not know (as vLLM and SGLang do) but validate the types
of the ones they do; parameters hotswap does not implement are refused with a 400 unless sent with
their neutral value.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field, model_validator

from hotswap.engine.unserved import UNSERVED_OPENAI_FIELDS
from hotswap.errors import shown
from hotswap.server.chat_parsers import (
    ReasoningStream,
    call_stream,
    chat_template_kwargs,
    new_call_id,
    parse_calls,
    split_reasoning,
    thinking_requested,
)
from hotswap.server.generation import (
    await_generation,
    open_stream,
    refuse_constrained_decoding_over_http,
    refuse_unserved_fields_over_http,
    stream_error_event,
)
from hotswap.server.http_utils import (
    SSE_DONE,
    APIError,
    DisconnectAwareStreamingResponse,
    JSONResponse,
    parse_body,
    sse,
)

if TYPE_CHECKING:
    from hotswap.server.app import ServerState


# ---- request models ---------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False
    continuous_usage_stats: bool = False


class _SamplingFields(BaseModel):
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


class CompletionRequest(_SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    prompt_logprobs: int | None = Field(None, ge=0, le=20)  # vLLM's: each prompt token's logprob and the top-k
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: bool = True  # vLLM's: a text prompt gets the tokenizer's special tokens (a BOS) unless false


class ChatCompletionRequest(_SamplingFields):
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


# ---- shared helpers ---------------------------------------------------------------------------------

def refuse_request_chat_template(template: Any) -> None:
    """A request's own `chat_template` is refused by name, as vLLM refuses it unless started with
    --trust-request-chat-template (OpenAIServing._validate_chat_template); hotswap runs only the server's template, and
    dropping the field would render a prompt the client did not ask for."""
    if template is not None:
        raise APIError(400, "chat_template is passed with the request: hotswap renders with the server's chat template only "
                            "(--chat-template at launch)", param="chat_template")


def finish_reason(meta: dict) -> str | None:
    """OpenAI's finish_reason: the engine's finish type (stop, length, abort) as it is."""
    reason = meta.get("finish_reason")
    return reason.get("type") if reason else None


def sampling_dict(body: _SamplingFields, max_new_tokens: int, defaults: dict | None = None) -> dict:
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


def _routed(meta: dict) -> dict:
    """The choice's `routed_experts` (base64 int32, as in /generate's meta_info) when the request asked."""
    return {"routed_experts": meta["routed_experts"]} if "routed_experts" in meta else {}


def sglext(outputs: list[dict]) -> dict:
    """SGLang's response-level `sglext` (entrypoints/openai/protocol.py::SglExt): the first choice's
    routed_experts when the request asked for them (serving_chat.py / serving_completions.py build it from
    ret[0]); {} otherwise (SGLang leaves the key out)."""
    for out in outputs:
        if "routed_experts" in out["meta_info"]:
            return {"sglext": {"routed_experts": out["meta_info"]["routed_experts"]}}
    return {}


def matched_stop(meta: dict) -> int | str | None:
    """SGLang's choice `matched_stop` (CompletionResponseChoice / ChatCompletionResponseChoice): the stop token
    id or stop string that ended the choice; None otherwise."""
    reason = meta.get("finish_reason")
    return reason.get("matched") if reason else None


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


def _usage(prompt_tokens: int, outputs: list[dict], n: int) -> dict:
    """`outputs`: prompt-major, `n` a prompt. A prompt's cached tokens count once, its first sample's (SGLang's
    usage_processor.calculate_response_usage: "cached_tokens should only be counted once")."""
    completion = sum(int(o["meta_info"].get("completion_tokens") or 0) for o in outputs)
    cached = sum(int(o["meta_info"].get("cached_tokens") or 0) for o in outputs[::n])
    usage = {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}
    if cached:
        usage["prompt_tokens_details"] = {"cached_tokens": cached}
    return usage


def _running_usage(meta: dict) -> dict:
    """A streamed chunk's usage so far, of its own choice: that choice's prompt and its tokens so far, as vLLM's
    (previous_num_tokens[i], num_prompt_tokens[prompt_idx]) and SGLang's (prompt_tokens[index], completion_tokens[index])."""
    prompt, completion = int(meta.get("prompt_tokens") or 0), int(meta.get("completion_tokens") or 0)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _slices(meta: dict, start: int, end: int) -> tuple[list, list | None]:
    lps = (meta.get("output_token_logprobs") or [])[start:end]
    tops = meta.get("output_top_logprobs")
    return lps, (tops[start:end] if tops is not None else None)


def token_namer(state: ServerState, as_ids: bool | None):
    """How a logprob entry names its token: its text, or vLLM's `token_id:N` (return_tokens_as_token_ids)."""
    return (lambda tid: f"token_id:{tid}") if as_ids else state.token_text


def completion_logprobs(state: ServerState, meta: dict, start: int, end: int, k: int, offset: int, as_ids: bool | None = None,
                        echo: bool = False) -> dict:
    """OpenAI's completion logprobs of output tokens [start, end); `echo`: the prompt's tokens first, as
    OpenAI gives them (the first has logprob None)."""
    name = token_namer(state, as_ids)
    lps, tops = _slices(meta, start, end)
    if echo:
        lps = list(meta.get("input_token_logprobs") or []) + list(lps)
        in_tops = meta.get("input_top_logprobs") or [None] * len(meta.get("input_token_logprobs") or [])
        tops = [t or [] for t in in_tops] + list(tops if tops is not None else [[] for _ in range(end - start)])
    tokens = [name(tid) for _, tid, _ in lps]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    top_logprobs = None
    if k > 0:
        top_logprobs = []
        for j in range(len(lps)):
            entry: dict[str, float] = {}
            for lp, tid, _ in (tops[j] if tops is not None and j < len(tops) else [])[:k]:
                entry.setdefault(name(tid), lp)
            top_logprobs.append(entry)
    if echo and top_logprobs:
        top_logprobs[0] = None  # the first prompt token has no distribution
    return {"tokens": tokens, "token_logprobs": [lp for lp, _, _ in lps], "top_logprobs": top_logprobs, "text_offset": offsets}


def vllm_prompt_logprobs(state: ServerState, meta: dict, k: int) -> list:
    """vLLM's `prompt_logprobs`: None for the first prompt token, then per token {token id: {logprob, rank,
    decoded_token}} holding the prompt token and the top-k (rank is given where the top-k shows it)."""
    out: list = []
    tops = meta.get("input_top_logprobs") or []
    for j, (lp, tid, _) in enumerate(meta.get("input_token_logprobs") or []):
        if lp is None:
            out.append(None)
            continue
        top = (tops[j] if j < len(tops) and tops[j] else [])[:k]
        ranks = {t: r + 1 for r, (_, t, _) in enumerate(top)}
        entry = {str(tid): {"logprob": lp, "rank": ranks.get(tid), "decoded_token": state.token_text(tid)}}
        for tlp, ttid, _ in top:
            entry.setdefault(str(ttid), {"logprob": tlp, "rank": ranks[ttid], "decoded_token": state.token_text(ttid)})
        out.append(entry)
    return out


def chat_logprobs(state: ServerState, meta: dict, start: int, end: int, k: int, as_ids: bool | None = None) -> dict:
    name = token_namer(state, as_ids)
    lps, tops = _slices(meta, start, end)
    content = []
    for j, (lp, tid, _) in enumerate(lps):
        tok = name(tid)
        top = []
        for tlp, ttid, _ in (tops[j] if tops is not None and j < len(tops) else [])[:k]:
            ttok = name(ttid)
            top.append({"token": ttok, "logprob": tlp, "bytes": list(ttok.encode("utf-8"))})
        content.append({"token": tok, "logprob": lp, "bytes": list(tok.encode("utf-8")), "top_logprobs": top})
    return {"content": content}


def reply_id(rid: str | list[str] | None, prompts: int, prefix: str) -> str:
    """The reply's `id`: SGLang's, the first request's id (the client's rid, `{rid}_0` for a string naming a batch),
    else a fresh one."""
    if isinstance(rid, list) and rid:
        return rid[0]
    if isinstance(rid, str) and rid:
        return rid if prompts == 1 else f"{rid}_0"
    return f"{prefix}-{uuid.uuid4().hex}"


async def _generate_all(state: ServerState, request: Request, id_lists: list[list[int]], sp: dict, return_logprob: bool,
                        top_logprobs_num: int, logprob_start_len: int | None = None, rid: str | list[str] | None = None) -> list[dict]:
    coro = state.engine.async_generate(input_ids=id_lists, sampling_params=sp, return_logprob=return_logprob,
                                       top_logprobs_num=top_logprobs_num, logprob_start_len=logprob_start_len, rid=rid)
    outs = await await_generation(request, coro)
    return outs if isinstance(outs, list) else [outs]


def _runs(versions: list[str]) -> list[str]:
    """Per-token weight versions -> the versions of its consecutive runs (["1", "1", "2"] -> ["1", "2"])."""
    return [v for j, v in enumerate(versions) if j == 0 or versions[j - 1] != v]


def _choice_versions(out: dict) -> list[str]:
    meta = out["meta_info"]
    return _runs(meta.get("weight_versions") or [meta.get("weight_version")])


def _metadata(outputs: list[dict]) -> dict:
    """SGLang's `metadata.weight_version` (the last) plus, per choice, the versions its tokens came from."""
    versions = [o["meta_info"].get("weight_version") for o in outputs if o.get("meta_info")]
    return {"weight_version": versions[-1] if versions else None, "weight_versions": [_choice_versions(o) for o in outputs]}


def _chunk_metadata(out: dict) -> dict:
    """A streamed chunk's versions: those of the tokens it carries (the current one when it carries none)."""
    meta = out["meta_info"]
    return {"weight_version": meta.get("weight_version"), "weight_versions": [_runs(out.get("delta_weight_versions") or [meta.get("weight_version")])]}


def choice_meta_info(out: dict) -> dict:
    """SGLang's meta_info for an OpenAI choice (return_meta_info): the output ids beside it."""
    return {**out["meta_info"], "output_ids": list(out["output_ids"])}


def _stream_usage(body: _SamplingFields) -> str | None:
    """What a stream says of usage (`stream_options`): None, "final" (a last chunk with it) or "continuous"
    (also every chunk with choices: the counts so far, as SGLang's and vLLM's continuous_usage_stats)."""
    opts = body.stream_options
    if opts is None or not opts.include_usage:
        return None
    return "continuous" if opts.continuous_usage_stats else "final"


def _stream_response(state: ServerState, route: str, chunks, *, rid: str, object_name: str, created: int, usage: str | None, n: int,
                     prompt_tokens: int, opening: list[dict], choice, token_ids: bool = False, meta_info: bool = False,
                     opening_extra: dict | None = None) -> DisconnectAwareStreamingResponse:
    """The one OpenAI streaming loop (completions and chat). `opening`: choices sent before any token (echo,
    role), with `opening_extra` top-level fields; `choice(i, text, meta, start, end, finish)`: the route's
    choice for the tokens [start, end) of request i. `token_ids`: each choice carries its new token ids;
    `meta_info`: a finishing choice carries its request's meta_info; `usage` as `_stream_usage` says."""
    chunk = _chunker(rid, object_name, created, state.served_model_name, usage is not None)

    async def events():
        sent: dict[int, int] = {}
        finals: dict[int, dict] = {}
        try:
            for c in opening:
                yield chunk([c], **(opening_extra or {}))
            async for out in chunks:
                i = out.get("index", 0)
                meta = out["meta_info"]
                fin = finish_reason(meta)
                text = out.get("delta_text", "")
                if not text and fin is None:
                    continue
                end = len(out["output_ids"])
                c = {**choice(i, text, meta, sent.get(i, 0), end, fin), "matched_stop": matched_stop(meta),
                     **_routed(meta)}  # routing comes with the last chunk
                if token_ids:
                    c["token_ids"] = list(out["output_ids"][sent.get(i, 0):end])
                if meta_info and fin is not None:
                    c["meta_info"] = choice_meta_info(out)
                sent[i] = end
                if fin is not None:
                    finals[i] = out
                so_far = {"usage": _running_usage(meta)} if usage == "continuous" else {}
                yield chunk([c], metadata=_chunk_metadata(out), **so_far)
            ext = sglext([finals[i] for i in sorted(finals)])
            if ext:  # SGLang's routing chunk: no choices, the response-level sglext, before the usage chunk
                yield chunk([], **ext)
            if usage is not None:
                yield chunk([], usage=_usage(prompt_tokens, [finals[i] for i in sorted(finals)], n))
        except Exception as exc:  # noqa: BLE001 - report in-band; the stream has started
            yield stream_error_event(exc)
        finally:
            await chunks.aclose()
            state.metrics.observe_generation(route, list(finals.values()))
        yield SSE_DONE

    return DisconnectAwareStreamingResponse(events(), on_disconnect=state.metrics.observe_disconnect)


# ---- routes -----------------------------------------------------------------------------------------


def register(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [state.model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def retrieve_model(model_id: str) -> JSONResponse:
        # the listing names one model (requests may name any: frameworks send their own names, as to SGLang)
        if model_id not in (state.served_model_name, state.model_path):
            raise APIError(404, f"The model `{model_id}` does not exist; this server serves `{state.served_model_name}`.",
                           type_="NotFoundError", param="model", code="model_not_found")
        return JSONResponse(state.model_card())

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await parse_body(request, CompletionRequest)
        state.check_serving()
        state.require_tokenizer("/v1/completions")
        if body.suffix:
            raise APIError(400, "suffix is not supported by hotswap", param="suffix")
        if body.best_of is not None and body.best_of != body.n:
            raise APIError(400, "best_of is not supported by hotswap (only best_of == n)", param="best_of")
        prompt = body.prompt
        special = body.add_special_tokens
        if isinstance(prompt, str):  # tokenization never stalls the event loop
            id_lists = [await asyncio.to_thread(state.engine.encode, prompt, special)]
        elif not prompt:
            raise APIError(400, "prompt is empty", param="prompt")
        elif isinstance(prompt[0], str):
            id_lists = await asyncio.to_thread(lambda: [state.engine.encode(x, special) for x in prompt])
        elif isinstance(prompt[0], int):
            id_lists = [list(prompt)]
        else:
            id_lists = [list(x) for x in prompt]
        for i, ids in enumerate(id_lists):
            check_prompt(state, ids, body.max_tokens, i)
        max_tokens = body.max_tokens if body.max_tokens is not None else 16
        sp = sampling_dict(body, max_tokens)
        want_lp = body.logprobs is not None
        k = body.logprobs or 0
        as_ids = body.return_tokens_as_token_ids
        echo_lp = body.echo and want_lp  # OpenAI prepends the prompt tokens' logprobs
        score_prompt = echo_lp or body.prompt_logprobs is not None
        lp_args = {"return_logprob": want_lp or score_prompt, "top_logprobs_num": max(k, body.prompt_logprobs or 0),
                   "logprob_start_len": 0 if score_prompt else None}

        async def echoed() -> list[str] | None:
            """The prompts' text for `echo`, decoded once the engine has accepted their ids (never out-of-vocabulary ones)."""
            return await asyncio.to_thread(lambda: [state.decode(ids) for ids in id_lists]) if body.echo else None

        n = body.n
        rid = reply_id(body.rid, len(id_lists), "cmpl")
        created = int(time.time())
        prompt_tokens = sum(len(ids) for ids in id_lists)
        # one prompt goes as one (the engine then keeps a string rid as it is, as SGLang does)
        prompts = id_lists[0] if len(id_lists) == 1 else id_lists

        if not body.stream:
            outs = await _generate_all(state, request, prompts, sp, rid=body.rid, **lp_args)
            state.metrics.observe_generation("/v1/completions", outs)
            echo_texts = await echoed()
            choices = []
            for i, out in enumerate(outs):
                meta = out["meta_info"]
                text = out["text"]
                if echo_texts is not None:
                    text = echo_texts[i // n] + text
                lp = completion_logprobs(state, meta, 0, len(out["output_ids"]), k, 0, as_ids, echo=echo_lp) if want_lp else None
                c = {"index": i, "text": text, "logprobs": lp, "finish_reason": finish_reason(meta), "matched_stop": matched_stop(meta),
                     **_routed(meta)}
                if body.prompt_logprobs is not None:
                    c["prompt_logprobs"] = vllm_prompt_logprobs(state, meta, body.prompt_logprobs)
                if body.return_token_ids:
                    c.update(prompt_token_ids=id_lists[i // n], token_ids=list(out["output_ids"]))
                if body.return_meta_info:
                    c["meta_info"] = choice_meta_info(out)
                choices.append(c)
            return JSONResponse({"id": rid, "object": "text_completion", "created": created, "model": state.served_model_name,
                                 "system_fingerprint": state.fingerprint(outs), "choices": choices,
                                 "usage": _usage(prompt_tokens, outs, n), "metadata": _metadata(outs), **sglext(outs)})

        chunks = await open_stream(state.engine, input_ids=prompts, sampling_params=sp, incremental_streaming_output=False, rid=body.rid,
                                   **lp_args)
        echo_texts = await echoed()
        offsets: dict[int, int] = {}

        def choice(i: int, text: str, meta: dict, start: int, end: int, fin: str | None) -> dict:
            lp = None
            if want_lp:  # the prompt's logprobs ride on each choice's first chunk
                lp = completion_logprobs(state, meta, start, end, k, offsets.get(i, 0), as_ids, echo=echo_lp and start == 0)
                offsets[i] = offsets.get(i, 0) + sum(len(t) for t in lp["tokens"])
            c = {"index": i, "text": text, "logprobs": lp, "finish_reason": fin}
            if body.prompt_logprobs is not None and start == 0:
                c["prompt_logprobs"] = vllm_prompt_logprobs(state, meta, body.prompt_logprobs)
            if body.return_token_ids and start == 0:  # vLLM: the prompt's ids come with a choice's first chunk
                c["prompt_token_ids"] = id_lists[i // n]
            return c

        opening = [{"index": i, "text": echo_texts[i // n], "logprobs": None, "finish_reason": None, "matched_stop": None}
                   for i in range(len(id_lists) * n)] if echo_texts is not None else []
        return _stream_response(state, "/v1/completions", chunks, rid=rid, object_name="text_completion", created=created,
                                usage=_stream_usage(body), n=n, prompt_tokens=prompt_tokens, opening=opening, choice=choice,
                                token_ids=bool(body.return_token_ids), meta_info=body.return_meta_info)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await parse_body(request, ChatCompletionRequest)
        state.check_serving()
        state.require_tokenizer("/v1/chat/completions")
        if body.response_format and body.response_format.get("type", "text") != "text":
            raise APIError(400, f"response_format {shown(body.response_format.get('type'))} is not supported by hotswap", param="response_format")
        if isinstance(body.tool_choice, dict) or body.tool_choice == "required":
            raise APIError(400, "forcing tool calls is not supported by hotswap", param="tool_choice")
        if body.tool_choice not in (None, "none", "auto"):  # vLLM's and SGLang's request models refuse any other value
            raise APIError(400, f"tool_choice must be \"none\", \"auto\", \"required\" or a named function, got {shown(body.tool_choice)}",
                           param="tool_choice")
        refuse_request_chat_template(body.chat_template)
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs requires logprobs=true", param="top_logprobs")
        if body.input_ids is not None:  # the caller's prompt as it is; the messages are not rendered
            ids = list(body.input_ids)
        else:  # the chat template runs in a worker thread, never on the event loop
            ids = await asyncio.to_thread(state.render_chat, body.messages, tools=body.tools if body.tool_choice != "none" else None,
                                          add_generation_prompt=body.add_generation_prompt,
                                          continue_final_message=body.continue_final_message,
                                          kwargs=chat_template_kwargs(state.reasoning_parser, body.chat_template_kwargs),
                                          add_special_tokens=body.add_special_tokens)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        check_prompt(state, ids, max_tokens, 0, "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens",
                     "input_ids" if body.input_ids is not None else "messages")
        if max_tokens is None:
            max_tokens = max(1, state.max_context_len - len(ids))
        # the model's generation_config.json values for what the request leaves unset, as SGLang's chat takes them
        sp = sampling_dict(body, max_tokens, state.engine.model_config.sampling_defaults)
        if body.tools and body.tool_choice != "none":
            # SGLang (serving_chat.py, OpenAIServingChat._process_messages) keeps special tokens in the text of a request
            # that offers tools: many models mark a call with special tokens (Llama 3's <|python_tag|>, Mistral's
            # [TOOL_CALLS], DeepSeek's and Kimi's tool-call tokens), and a client parsing the call from the text needs them
            sp["skip_special_tokens"] = False
        want_lp = body.logprobs
        k = body.top_logprobs or 0
        as_ids = body.return_tokens_as_token_ids
        n = body.n
        if isinstance(body.rid, list):
            raise APIError(400, "rid must be a string for a chat completion (one prompt)", param="rid")
        rid = reply_id(body.rid, 1, "chatcmpl")
        created = int(time.time())
        prompt_tokens = len(ids)
        parsing = _ChatParsing(state, body)

        if not body.stream:
            outs = await _generate_all(state, request, ids, sp, want_lp, k, rid=body.rid)
            state.metrics.observe_generation("/v1/chat/completions", outs)
            choices = []
            for i, out in enumerate(outs):
                meta = out["meta_info"]
                text = out["text"]
                lp = chat_logprobs(state, meta, 0, len(out["output_ids"]), k, as_ids) if want_lp else None
                message, fin, matched = parsing.message(text, meta)
                c = {"index": i, "message": message, "logprobs": lp, "finish_reason": fin, "matched_stop": matched, **_routed(meta)}
                if body.return_token_ids:
                    c["token_ids"] = list(out["output_ids"])
                if body.return_token_ids or body.return_prompt_token_ids:  # SGLang serving_chat.py: on the choice
                    c["prompt_token_ids"] = ids
                if body.return_meta_info:
                    c["meta_info"] = choice_meta_info(out)
                choices.append(c)
            reply = {"id": rid, "object": "chat.completion", "created": created, "model": state.served_model_name,
                     "system_fingerprint": state.fingerprint(outs), "choices": choices, "usage": _usage(prompt_tokens, outs, n),
                     "metadata": _metadata(outs), **sglext(outs)}
            if body.return_token_ids:
                reply["prompt_token_ids"] = ids
            return JSONResponse(reply)

        chunks = await open_stream(state.engine, input_ids=ids, sampling_params=sp, return_logprob=want_lp, top_logprobs_num=k,
                                   incremental_streaming_output=False, rid=body.rid)

        streams: dict[int, _ChoiceStream] = {}

        def choice(i: int, text: str, meta: dict, start: int, end: int, fin: str | None) -> dict:
            lp = chat_logprobs(state, meta, start, end, k, as_ids) if want_lp else None
            delta, fin = streams.setdefault(i, parsing.stream()).delta(text, fin)
            return {"index": i, "delta": delta, "logprobs": lp, "finish_reason": fin}

        opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None, "matched_stop": None,
                    **({"prompt_token_ids": ids} if body.return_token_ids or body.return_prompt_token_ids else {})} for i in range(n)]
        return _stream_response(state, "/v1/chat/completions", chunks, rid=rid, object_name="chat.completion.chunk", created=created,
                                usage=_stream_usage(body), n=n, prompt_tokens=prompt_tokens, opening=opening, choice=choice,
                                token_ids=bool(body.return_token_ids), meta_info=body.return_meta_info,
                                opening_extra={"prompt_token_ids": ids} if body.return_token_ids else None)


__all__ = ["ChatCompletionRequest", "CompletionRequest", "register"]


# ---- chat output parsers (SGLang's --reasoning-parser / --tool-call-parser) -------------------------------


class _ChatParsing:
    """How a chat reply is parsed, as SGLang's serving_chat.py decides it: reasoning where the server has a parser and
    the request `separate_reasoning`; tool calls where it has a parser and `tool_choice` is not "none" (SGLang's default:
    "auto" with tools, "none" without)."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest) -> None:
        self.reasoning = state.reasoning_parser if body.separate_reasoning else None
        self.thinking = bool(state.reasoning_parser) and thinking_requested(state.reasoning_parser, body.chat_template_kwargs)
        self.stream_reasoning = body.stream_reasoning
        choice = body.tool_choice or ("auto" if body.tools else "none")
        self.tool_parser = state.tool_call_parser if choice != "none" else None
        self.tools = body.tools or []

    def message(self, text: str, meta: dict) -> tuple[dict, str | None, int | str | None]:
        """A whole reply's message, finish_reason and matched_stop (`tool_calls` and no match where it made calls)."""
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        fin, matched = finish_reason(meta), matched_stop(meta)
        if self.reasoning:  # SGLang's ChatMessage: reasoning_content null where there was none, not ""
            reasoning, msg["content"] = split_reasoning(text, self.reasoning, self.thinking)
            msg["reasoning_content"] = reasoning or None
        if self.tool_parser:
            msg["tool_calls"] = None
            if (parsed := parse_calls(msg["content"], self.tool_parser, self.tools)) is not None:
                msg["content"], calls = parsed
                msg["tool_calls"] = [{"id": new_call_id(), "index": c.tool_index, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                if calls and fin == "stop":  # SGLang's _process_tool_calls: a reply cut at the length stays "length"
                    fin, matched = "tool_calls", None
        return msg, fin, matched

    def stream(self) -> _ChoiceStream:
        return _ChoiceStream(self)


class _ChoiceStream:
    """One streamed choice's deltas: `reasoning_content`, `content`, and each tool call whole once it closes (its
    `index` the call's position in the choice, the key a client gathers a call's deltas by)."""

    def __init__(self, parsing: _ChatParsing) -> None:
        self.reasoning = ReasoningStream(parsing.reasoning, parsing.thinking, parsing.stream_reasoning) if parsing.reasoning else None
        self.tools = call_stream(parsing.tool_parser, parsing.tools) if parsing.tool_parser else None
        self.calls = 0

    def delta(self, text: str, fin: str | None) -> tuple[dict, str | None]:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if self.reasoning and fin is not None:
            more_reasoning, more_content = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        calls: list = []
        if self.tools:
            content, calls = self.tools.feed(content)
            content += self.tools.finish() if fin is not None else ""
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [{"id": new_call_id(), "index": self.calls + j, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}} for j, c in enumerate(calls)]
            self.calls += len(calls)
        return delta, ("tool_calls" if self.calls and fin == "stop" else fin)


def _chunker(rid: str, object_name: str, created: int, model: str, include_usage: bool):
    """The SSE chunk builder both streaming routes share (OpenAI sends `usage: null` until the last chunk
    when usage is asked for)."""

    def chunk(choices: list[dict], **extra) -> bytes:
        obj = {"id": rid, "object": object_name, "created": created, "model": model, "choices": choices}
        if include_usage:
            obj["usage"] = None
        obj.update(extra)
        return sse(obj)

    return chunk
