"""vLLM's RL control plane beside SGLang's routes, as prime-rl, SkyRL and AReaL's vLLM backend call it.

Served: `/pause` `/resume` `/is_paused` `/sleep` `/wake_up` `/is_sleeping` `/reset_prefix_cache`
`/get_world_size` `/weight_info`, prime-rl's `/liveness` and `/update_weights {weight_dir}` (a disk update), the token-in
token-out `/inference/v1/generate`, `/tokenize` `/detokenize` (vLLM's and SGLang's shapes, also under /v1),
and AReaL's own `/areal_*` routes that map onto our operations. Parameters are read where vLLM reads them:
the query string for `/pause`, `/sleep`, `/wake_up`, `/get_world_size`, `/reset_prefix_cache` (whose
`reset_running_requests` SkyRL sends as a JSON body: read there too), JSON bodies elsewhere. vLLM's native
weight transfer (`/init_weight_transfer_engine`, `/update_weights {update_info}`) and `/collective_rpc` are
refused by name. The control operations are the Engine's vLLM-named methods, run in a worker thread."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.responses import Response

from hotswap import protocol as p
from hotswap.errors import shown
from hotswap.server.generation import await_generation, refuse_constrained_decoding_over_http
from hotswap.server.http_utils import APIError, JSONResponse, parse_body, query_bool
from hotswap.server.openai_replies import finish_reason, vllm_prompt_logprobs
from hotswap.server.openai_requests import check_prompt, refuse_request_chat_template
from hotswap.server.weights_api import check_source_dir

if TYPE_CHECKING:
    from hotswap.server.app import ServerState

_LOGPROB_FLOOR = -9999.0  # vLLM clamps logprobs in its token-id replies to this


# ---- query parameters as FastAPI's Query() reads them ----------------------------------------------


def _query_tags(request: Request) -> list[str] | None:
    tags = request.query_params.getlist("tags")
    return tags or None  # none given: every tag


async def _control(call, *args) -> p.ControlOutput:
    """An Engine control method in a worker thread (it waits on the scheduler, never the event loop)."""
    try:
        return await asyncio.to_thread(call, *args)
    except ValueError as exc:  # the engine is shut down
        return p.ControlOutput(success=False, message=str(exc))


def _refused(out: p.ControlOutput, status: int = 400) -> APIError:
    return APIError(status, out.message)


# ---- tokenize / detokenize --------------------------------------------------------------------------


class TokenizeBody(BaseModel):
    """vLLM's TokenizeCompletionRequest / TokenizeChatRequest and SGLang's TokenizeRequest (prompt may be a list)."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    prompt: str | list[str] | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None  # vLLM: True for a prompt, False for messages
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    chat_template: Any = None  # refused by name, as vLLM refuses an untrusted one
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    tokens: list[int] | list[list[int]]
    skip_special_tokens: bool | None = None


# ---- /inference/v1/generate -------------------------------------------------------------------------


class TokensGenerateBody(BaseModel):
    """vLLM's GenerateRequest (vllm/entrypoints/serve/disagg/protocol.py)."""

    model_config = ConfigDict(extra="ignore")
    request_id: str | None = None
    token_ids: list[int] = Field(min_length=1)
    sampling_params: dict[str, Any]
    model: str | None = None
    stream: bool | None = False
    features: Any = None
    cache_salt: str | None = None  # accepted: every weight update flushes the prefix cache, what a version salt is for
    priority: int = 0
    kv_transfer_params: dict[str, Any] | None = None


# vLLM SamplingParams fields served, and those accepted only at their neutral value (anything else is refused by name)
_NEUTRAL_SAMPLING = {"allowed_token_ids": None, "bad_words": None, "structured_outputs": None, "guided_decoding": None,
                     "logits_processors": None, "extra_args": None, "truncate_prompt_tokens": None, "use_beam_search": False,
                     "flat_logprobs": False}
# output formatting only (token ids are what this route returns): accepted as they come. `return_token_ids` is not a
# SamplingParams field (vLLM drops it here): prime-rl's `resolve_env_config` puts it in every policy env's extra_body,
# which verifiers' TrainClient merges into sampling_params
_FORMAT_ONLY = ("detokenize", "include_stop_str_in_output", "spaces_between_special_tokens", "output_kind", "skip_special_tokens",
                "return_token_ids")
# keys verifiers' TrainClient (v1/clients/train.py, renderers.client.generate) puts in sampling_params for prime-rl: its
# extra_body `cache_salt` (a policy version; hotswap flushes the prefix cache at every update, what the salt is for) and
# `routed_experts_prompt_start` (where returned routing starts; this route returns no routing, as vLLM without
# --enable-return-routed-experts). vLLM's SamplingParams ignores keys it lacks; these two are checked, then unused.
_POSITIONING = {"cache_salt": str, "routed_experts_prompt_start": int}
_SERVED = ("n", "best_of", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stop_token_ids", "ignore_eos", "max_tokens", "logprobs",
           "prompt_logprobs", "min_tokens", "presence_penalty", "frequency_penalty", "repetition_penalty", "logit_bias")
# vLLM name -> ours, passed as given (the engine validates the values and names a bad one)
_RENAMED = {"min_tokens": "min_new_tokens", "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
            "repetition_penalty": "repetition_penalty", "logit_bias": "logit_bias"}


@dataclass(frozen=True, slots=True)
class VllmSampling:
    """A vLLM SamplingParams read for our engine: the sampling dict, `logprobs` (k per output token, or None)
    and `prompt_logprobs` (k per prompt token, or None)."""

    params: dict[str, Any]
    logprobs: int | None
    prompt_logprobs: int | None


def _count(sp: dict[str, Any], key: str, most: int | None = None) -> int | None:
    """An integer field of vLLM's (>= 0, at most `most`) or None, checked under vLLM's name before it is renamed."""
    k = sp.get(key)
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0 or (most is not None and k > most)):
        span = f"in [0, {most}]" if most is not None else ">= 0"
        raise APIError(400, f"{key} must be an integer {span} or null, got {shown(k)}", param=key)
    return k


def vllm_sampling_params(sp: dict[str, Any], prompt_len: int, max_context_len: int) -> VllmSampling:
    """vLLM SamplingParams -> our sampling dict and logprob counts. Raises APIError(400) naming the field.
    (The prompt's fit in the context, with max_tokens after it, is the route's `check_prompt`, as on the
    OpenAI routes.)"""
    refuse_constrained_decoding_over_http(sp)
    unknown = sorted(set(sp) - set(_NEUTRAL_SAMPLING) - set(_FORMAT_ONLY) - set(_SERVED) - set(_POSITIONING))
    if unknown:
        raise APIError(400, f"unknown or unsupported sampling parameter(s): {', '.join(unknown)}", param="sampling_params")
    for key, kind in _POSITIONING.items():
        value = sp.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0)):
            raise APIError(400, f"{key} must be {'a string' if kind is str else 'an integer >= 0'} or null, got {shown(value)}", param=key)
    for key, neutral in _NEUTRAL_SAMPLING.items():
        value = sp.get(key, neutral)
        if value is not None and value != neutral and value not in ({}, []):
            raise APIError(400, f"sampling parameter {key}={shown(value)} is not supported by hotswap (only {shown(neutral)})", param=key)
    n = sp.get("n", 1)
    best_of = sp.get("best_of")
    if best_of is not None and best_of != n:
        raise APIError(400, "best_of is not supported by hotswap (only best_of == n)", param="best_of")
    max_tokens = _count(sp, "max_tokens")
    min_tokens = _count(sp, "min_tokens")  # the engine's min_new_tokens
    out: dict[str, Any] = {"n": n, "max_new_tokens": max_context_len - prompt_len if max_tokens is None else max_tokens,
                           "temperature": 1.0 if sp.get("temperature") is None else sp["temperature"],
                           "ignore_eos": bool(sp.get("ignore_eos", False)), "skip_special_tokens": sp.get("skip_special_tokens", True),
                           "vllm_penalty_rule": True}  # repetition over the prompt too, logit_bias before the penalties
    if out["ignore_eos"]:
        out["keep_stop_token_ids"] = True  # vLLM's ignore_eos skips only EOS; SGLang's skips stop_token_ids too
    if min_tokens is not None and min_tokens > out["max_new_tokens"]:  # vLLM's rule, under its name
        raise APIError(400, f"min_tokens ({min_tokens}) must be at most max_tokens ({out['max_new_tokens']})", param="min_tokens")
    for key in ("top_p", "min_p", "seed"):
        if sp.get(key) is not None:
            out[key] = sp[key]
    for theirs, ours in _RENAMED.items():
        if sp.get(theirs) is not None:
            out[ours] = sp[theirs]
    top_k = sp.get("top_k")
    if top_k is not None:
        out["top_k"] = -1 if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k <= 0 else top_k  # vLLM: 0 or -1 = off
    if sp.get("stop"):
        out["stop"] = [sp["stop"]] if isinstance(sp["stop"], str) else sp["stop"]
    if sp.get("stop_token_ids"):
        out["stop_token_ids"] = sp["stop_token_ids"]
    return VllmSampling(params=out, logprobs=_count(sp, "logprobs", 20), prompt_logprobs=_count(sp, "prompt_logprobs", 20))


def token_id_logprobs(meta: dict, k: int) -> dict:
    """vLLM's ChatCompletionLogProbs for a token-id reply: tokens as "token_id:N"; each entry's top_logprobs
    lists the sampled token first, then the best others, max(k, 1) in all (as vLLM's logprob dicts)."""
    tops = meta.get("output_top_logprobs") or []
    content = []
    for j, (lp, tid, _) in enumerate(meta.get("output_token_logprobs") or []):
        entries = [(tid, lp)] + [(ttid, tlp) for tlp, ttid, _ in (tops[j] if j < len(tops) else []) if ttid != tid]
        top = [{"token": f"token_id:{t}", "logprob": max(v, _LOGPROB_FLOOR), "bytes": None} for t, v in entries[: max(k, 1)]]
        content.append({"token": f"token_id:{tid}", "logprob": max(lp, _LOGPROB_FLOOR), "bytes": None, "top_logprobs": top})
    return {"content": content}


# ---- AReaL's own vLLM server routes (areal/engine/vllm_ext/areal_vllm_server.py) ---------------------


class ArealUpdateWeightsBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model_path: str
    load_format: str | None = "auto"
    abort_all_requests: bool = False


class ArealGroupBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    backend: str | None = None
    group_name: str = "weight_update_group"


class ArealWeightMetaBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"


def _areal_reply(out) -> JSONResponse:
    return JSONResponse({"success": bool(out.success), "message": str(out.message)}, status_code=200 if out.success else 400)


# ---- routes -----------------------------------------------------------------------------------------


def register(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.post("/pause")
    async def pause(request: Request) -> JSONResponse:
        mode = request.query_params.get("mode", "abort")
        if query_bool(request, "wait_for_inflight_requests", False) and "mode" not in request.query_params:
            mode = "wait"  # vLLM's deprecated spelling of mode=wait
        out = await _control(engine.pause, mode, query_bool(request, "clear_cache", True))
        if not out.success:
            raise _refused(out)
        return JSONResponse({"status": "paused"})

    @app.post("/resume")
    async def resume() -> JSONResponse:
        out = await _control(engine.resume)
        if not out.success:
            raise _refused(out, 409)
        return JSONResponse({"status": "resumed"})

    @app.get("/is_paused")
    async def is_paused() -> JSONResponse:
        return JSONResponse({"is_paused": await asyncio.to_thread(engine.is_paused)})

    @app.post("/sleep")
    async def sleep(request: Request) -> Response:
        raw_level = request.query_params.get("level", "1")
        try:
            level = int(raw_level)
        except ValueError:
            raise APIError(400, f"query parameter level={shown(raw_level)} is not an integer", param="level") from None
        out = await _control(engine.sleep, level, request.query_params.get("mode", "abort"), _query_tags(request))
        if not out.success:
            raise _refused(out)
        return Response(status_code=200)

    @app.post("/wake_up")
    async def wake_up(request: Request) -> Response:
        out = await _control(engine.wake_up, _query_tags(request))
        if not out.success:
            raise _refused(out)
        return Response(status_code=200)

    @app.get("/is_sleeping")
    async def is_sleeping() -> JSONResponse:
        return JSONResponse({"is_sleeping": await asyncio.to_thread(engine.is_sleeping)})

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache(request: Request) -> JSONResponse:
        body = await parse_body(request, dict[str, Any])  # optional: an empty body reads as {}
        running = query_bool(request, "reset_running_requests", bool(body.get("reset_running_requests", False)))
        reset = await asyncio.to_thread(engine.reset_prefix_cache, running)
        return JSONResponse({"success": reset})

    @app.get("/get_world_size")
    async def get_world_size(request: Request) -> JSONResponse:
        query_bool(request, "include_dp", True)  # validated; data parallelism is one engine per server here
        return JSONResponse({"world_size": int(engine.model_info()["tensor_parallel_size"])})

    @app.get("/liveness")
    async def liveness() -> JSONResponse:
        """prime-rl's probe: the engine loop answers a no-op within 10 s."""
        if await state.load(timeout=10.0) is None:
            return JSONResponse({"status": "engine_unresponsive"}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/weight_info")
    async def weight_info() -> JSONResponse:
        load = await state.load(timeout=2.0)
        return JSONResponse({"weight_version": load.weight_version if load else state.last_weight_version})

    @app.post("/update_weights")
    async def update_weights(request: Request) -> JSONResponse:
        body = await parse_body(request, dict[str, Any])  # optional: an empty body reads as {}
        if "update_info" in body:
            raise APIError(400, "vLLM's native weight transfer (update_info, /init_weight_transfer_engine) is not served by hotswap; "
                                "send {\"weight_dir\": HF folder} for a disk update, or use /update_weights_from_distributed",
                           param="update_info")
        weight_dir = body.get("weight_dir")
        if not isinstance(weight_dir, str):
            raise APIError(400, "weight_dir is required: the folder of an HF checkpoint to load", param="weight_dir")
        version = body.get("weight_version")
        if version is not None and not isinstance(version, str):
            raise APIError(400, "weight_version must be a string", param="weight_version")
        check_source_dir(weight_dir, "weight_dir")
        start = time.perf_counter()
        out = await engine.asubmit(p.UpdateWeightsFromDiskRequest(model_path=weight_dir, weight_version=version))
        state.metrics.observe_weight_update("/update_weights", bool(out.success), time.perf_counter() - start)
        if not out.success:
            raise APIError(400, out.message)
        state.last_weight_version = out.weight_version or state.last_weight_version
        return JSONResponse({"status": "ok", "message": out.message, "weight_version": out.weight_version})

    for route in ("/init_weight_transfer_engine", "/collective_rpc"):
        app.add_api_route(route, _not_served(route), methods=["POST"], name=route.strip("/"))

    for route in ("/tokenize", "/v1/tokenize"):
        app.add_api_route(route, _tokenize_handler(state), methods=["POST"], name=route.strip("/").replace("/", "_"))
    for route, skip_default in (("/detokenize", False), ("/v1/detokenize", True)):
        app.add_api_route(route, _detokenize_handler(state, skip_default), methods=["POST"], name=route.strip("/").replace("/", "_"))

    @app.post("/inference/v1/generate")
    async def tokens_generate(request: Request) -> JSONResponse:
        body = await parse_body(request, TokensGenerateBody)
        state.check_serving()
        for name, given in (("stream", bool(body.stream)), ("features", body.features is not None), ("priority", body.priority != 0),
                            ("kv_transfer_params", bool(body.kv_transfer_params))):
            if given:
                raise APIError(400, f"{name} is not supported by hotswap's /inference/v1/generate", param=name)
        vs = vllm_sampling_params(body.sampling_params, len(body.token_ids), state.max_context_len)
        # the OpenAI routes' check: the context and the KV cache, max_tokens past the context (vLLM's 400, under its name)
        check_prompt(state, body.token_ids, body.sampling_params.get("max_tokens"), 0)
        k, pk = vs.logprobs, vs.prompt_logprobs
        coro = engine.async_generate(input_ids=list(body.token_ids), sampling_params=vs.params,
                                     return_logprob=k is not None or pk is not None, top_logprobs_num=max(k or 0, pk or 0),
                                     logprob_start_len=0 if pk is not None else None)
        result = await await_generation(request, coro)
        outs = result if isinstance(result, list) else [result]
        state.metrics.observe_generation("/inference/v1/generate", outs)
        choices = [{"index": i, "logprobs": token_id_logprobs(out["meta_info"], k) if k is not None else None,
                    "finish_reason": finish_reason(out["meta_info"]) or "stop", "token_ids": list(out["output_ids"])}
                   for i, out in enumerate(outs)]
        completion = sum(len(out["output_ids"]) for out in outs)
        prompt = len(body.token_ids)
        # every choice scored the same prompt: the reply carries it once, at the top level (vLLM's GenerateResponse)
        prompt_logprobs = vllm_prompt_logprobs(state, outs[0]["meta_info"], pk) if pk is not None else None
        return JSONResponse({"request_id": f"generate-tokens-{body.request_id or uuid.uuid4().hex}", "choices": choices,
                             "prompt_logprobs": prompt_logprobs, "kv_transfer_params": None,
                             "usage": {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion},
                             "metadata": {"weight_version": outs[-1]["meta_info"].get("weight_version")}})

    _register_areal(app, state)


def _not_served(route: str):
    async def handler() -> JSONResponse:
        raise APIError(400, f"{route} is not served by hotswap: vLLM's in-process collective_rpc and its own weight-transfer process "
                            "group are out of scope; use /update_weights {weight_dir}, /update_weights_from_disk, "
                            "/update_weights_from_distributed or /update_weights_from_tensor")

    return handler


def _tokenize_handler(state: ServerState):
    async def handler(request: Request) -> JSONResponse:
        body = await parse_body(request, TokenizeBody)
        state.require_tokenizer(request.url.path)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        tok = state.tokenizer
        refuse_request_chat_template(body.chat_template)
        if body.messages is not None:  # vLLM's TokenizeChatRequest: add_special_tokens defaults to False, as on the chat route
            ids: list[int] | list[list[int]] = await asyncio.to_thread(
                state.render_chat, body.messages, tools=body.tools, add_generation_prompt=body.add_generation_prompt,
                continue_final_message=body.continue_final_message, kwargs=body.chat_template_kwargs,
                add_special_tokens=bool(body.add_special_tokens))
        else:
            special = True if body.add_special_tokens is None else body.add_special_tokens
            texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
            lists = await asyncio.to_thread(lambda: [state.engine.encode(t, add_special_tokens=special) for t in texts])
            ids = lists[0] if isinstance(body.prompt, str) else lists
        single = not ids or isinstance(ids[0], int)
        reply: dict[str, Any] = {"count": len(ids) if single else [len(x) for x in ids], "max_model_len": state.max_context_len, "tokens": ids,
                                 "token_strs": None}
        if body.return_token_strs:
            reply["token_strs"] = tok.convert_ids_to_tokens(ids) if single else [tok.convert_ids_to_tokens(x) for x in ids]
        return JSONResponse(reply)

    return handler


def _detokenize_handler(state: ServerState, skip_default: bool):
    """vLLM's /detokenize replies {prompt} and decodes every token; SGLang's /v1/detokenize replies {text}
    and skips special tokens by default. Both keys are in every reply."""

    async def handler(request: Request) -> JSONResponse:
        body = await parse_body(request, DetokenizeBody)
        state.require_tokenizer(request.url.path)
        vocab = int(state.engine.model_info()["vocab_size"])
        single = not body.tokens or isinstance(body.tokens[0], int)
        lists = [body.tokens] if single else body.tokens
        for ids in lists:
            if any(t < 0 or t >= vocab for t in ids):
                raise APIError(400, f"tokens holds ids outside the vocabulary [0, {vocab})", param="tokens")
        skip = skip_default if body.skip_special_tokens is None else body.skip_special_tokens
        texts = await asyncio.to_thread(lambda: [state.tokenizer.decode(ids, skip_special_tokens=skip) for ids in lists])
        text = texts[0] if single else texts
        return JSONResponse({"prompt": text, "text": text})

    return handler


def _register_areal(app: FastAPI, state: ServerState) -> None:
    """AReaL's vLLM server routes (reply {success, message}, 400 on failure), mapped onto our operations.
    The weight metadata of /areal_set_update_weight_meta is kept for the /areal_update_weights_xccl that follows."""
    engine = state.engine
    pending_meta: dict[str, ArealWeightMetaBody] = {}  # "next": the metadata the next xccl update reads

    @app.post("/areal_update_weights")
    async def areal_update_weights(request: Request) -> JSONResponse:
        body = await parse_body(request, ArealUpdateWeightsBody)
        check_source_dir(body.model_path, "model_path")
        load_format = None if body.load_format in (None, "auto") else body.load_format
        out = await engine.asubmit(p.UpdateWeightsFromDiskRequest(model_path=body.model_path, load_format=load_format,
                                                                       abort_all_requests=body.abort_all_requests))
        return _areal_reply(out)

    @app.post("/areal_init_weights_update_group")
    async def areal_init_group(request: Request) -> JSONResponse:
        body = await parse_body(request, ArealGroupBody)
        out = await engine.asubmit(p.InitWeightsUpdateGroupRequest(master_address=body.master_address, master_port=body.master_port,
                                                                        rank_offset=body.rank_offset, world_size=body.world_size,
                                                                        group_name=body.group_name, backend=body.backend))
        return _areal_reply(out)

    @app.post("/areal_set_update_weight_meta")
    async def areal_set_meta(request: Request) -> JSONResponse:
        body = await parse_body(request, ArealWeightMetaBody)
        if not (len(body.names) == len(body.dtypes) == len(body.shapes)):
            raise APIError(400, f"names, dtypes and shapes differ in length ({len(body.names)}, {len(body.dtypes)}, {len(body.shapes)})")
        pending_meta["next"] = body
        return _areal_reply(p.ControlOutput(success=True, message=f"weight metadata set for {len(body.names)} tensor(s)"))

    @app.post("/areal_update_weights_xccl")
    async def areal_update_xccl() -> JSONResponse:
        meta = pending_meta.pop("next", None)
        if meta is None:
            return _areal_reply(p.ControlOutput(success=False, message="no weight metadata: call /areal_set_update_weight_meta first"))
        dtypes = [d.removeprefix("torch.") for d in meta.dtypes]
        out = await engine.asubmit(p.UpdateWeightsFromDistributedRequest(names=meta.names, dtypes=dtypes, shapes=meta.shapes,
                                                                              group_name=meta.group_name))
        return _areal_reply(out)

    @app.post("/areal_pause_generation")
    async def areal_pause() -> JSONResponse:
        return _areal_reply(await _control(engine.pause, "abort", True))

    @app.post("/areal_continue_generation")
    async def areal_continue() -> JSONResponse:
        return _areal_reply(await _control(engine.resume))
