"""The FastAPI app on one Engine: OpenAI routes, SGLang's native routes, weight routes, /metrics.

`create_app(engine, api_key=None, admin_api_key=None, served_model_name=None, policy=None)`; `policy` (server/access.py) says which
Hosts, Origins and save destinations are allowed. Everything the routes need from the engine
goes through its public API (`async_generate`, `asubmit` (shielded), `tokenizer`, `model_info`); the app never
blocks the event loop on the scheduler.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import sys
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

import hotswap
from hotswap import protocol as p
from hotswap.errors import shown
from hotswap.gc_policy import make_garbage_collections_rare
from hotswap.server.access import AccessPolicy, refuse_browser_get
from hotswap.server.auth import ApiKeys
from hotswap.server.body_limit import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_BODY_BYTES, BodyLimits
from hotswap.server.diagnostics_api import register as register_diagnostics_routes
from hotswap.server.generation import (
    await_generation,
    normalize_sampling_params,
    open_stream,
    refuse_unserved_fields_over_http,
    stream_error_event,
)
from hotswap.server.http_utils import (
    SSE_DONE,
    APIError,
    ClientDisconnected,
    DisconnectAwareStreamingResponse,
    JSONResponse,
    dumps,
    error_body,
    error_response,
    parse_body,
    query_float,
    sse,
)
from hotswap.server.loads import TokenLoad, parse_query
from hotswap.server.loads import entry as load_entry
from hotswap.server.loads import envelope as loads_envelope
from hotswap.server.loads import prometheus as loads_prometheus
from hotswap.server.metrics import Metrics
from hotswap.server.metrics_share import MetricsShare
from hotswap.server.openai_api import register as register_openai_routes
from hotswap.server.vllm_api import register as register_vllm_routes
from hotswap.server.weights_api import register as register_weight_routes
from hotswap.wire.ipc import shm_block_prefix

log = logging.getLogger("hotswap.server")

# apply_chat_template's own parameters: a client may pass template variables, never these (a template
# given here would be executed).
_TEMPLATE_OWN_ARGS = frozenset({"chat_template", "conversation", "tools", "documents", "tokenize", "padding", "truncation", "max_length",
                                "return_tensors", "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs",
                                "add_generation_prompt", "continue_final_message"})
_MAX_TEMPLATE_KWARGS_BYTES = 16 << 10
_CHAT_ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function", "latest_reminder"})

# Status code nginx uses for "client closed request"; only ever logged, the client is gone.
_CLIENT_CLOSED = 499


def _parsed_tool_calls(message: dict) -> dict:
    """{"tool_calls": ...} with each call's `function.arguments` given as a JSON object string parsed to a dict, as
    SGLang (serving_chat.py: normalize_assistant_tool_call_arguments) and vLLM (chat_utils._postprocess_messages) pass
    them to the template: OpenAI clients send arguments as a string, and templates iterate them as a mapping
    (Qwen3-Coder's `arguments|items`) or dump them once (`|tojson`). {} when the message has no such call."""
    calls = message.get("tool_calls")
    if not isinstance(calls, list):
        return {}
    out, changed = [], False
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        args = fn.get("arguments") if isinstance(fn, dict) else None
        if isinstance(args, str):
            try:
                parsed = json.loads(args)
            except (ValueError, RecursionError):  # not JSON, or nested past the parser: the template gets the string
                parsed = None
            if isinstance(parsed, dict):
                call, changed = {**call, "function": {**fn, "arguments": parsed}}, True
        out.append(call)
    return {"tool_calls": out} if changed else {}


class ServerState:
    """What the routes share: the engine, names, limits, metrics, draining flag."""

    def __init__(self, engine, *, keys: ApiKeys, served_model_name: str | None, policy: AccessPolicy):
        self.engine = engine
        self.keys = keys
        self.policy = policy
        self._served_model_name = served_model_name
        self.created = int(time.time())
        self.metrics = Metrics()
        self.metrics_share: MetricsShare | None = None  # set in a front end process that shares the server with others
        self.draining = False
        self.last_weight_version = "default"
        self.tokenizer = engine.tokenizer
        self.max_context_len = int(engine.max_context_len)
        self.allow_auto_truncate = bool(engine.config.allow_auto_truncate)  # max_tokens past the context: cut, not refused
        # SGLang's --reasoning-parser / --tool-call-parser (config checks the names): the chat route parses its replies
        self.reasoning_parser: str | None = engine.config.sglang_settings.get("reasoning_parser")
        self.tool_call_parser: str | None = engine.config.sglang_settings.get("tool_call_parser")
        capacity = engine.capacity()
        self.page_size = capacity.page_size
        self.kv_capacity_tokens = capacity.max_total_tokens
        # the scheduler needs ceil((prompt + 1) / page_size) pages for a prompt
        self.max_prompt_tokens = min(self.max_context_len - 1, self.kv_capacity_tokens - 1)
        self.token_text = functools.lru_cache(maxsize=1 << 16)(self._token_text)

    @property
    def model_path(self) -> str:
        return str(self.engine.model_path)  # follows an update from another folder

    @property
    def served_model_name(self) -> str:
        return self._served_model_name or self.model_path

    # ---- helpers the routes use --------------------------------------------------------------------

    def _token_text(self, tid: int) -> str | None:
        """A token's text; None without a tokenizer (skip_tokenizer_init), as SGLang's logprob entries then hold."""
        return self.tokenizer.decode([tid]) if self.tokenizer is not None else None

    def require_tokenizer(self, route: str) -> None:
        """Routes that read or write text need the tokenizer skip_tokenizer_init left out: a clear 400 (SGLang's
        chat route fails there with a 500 on its missing tokenizer, its completions route with a 400 or a 500)."""
        if self.tokenizer is None:
            raise APIError(400, f"{route} needs a tokenizer, and this server was started with skip_tokenizer_init: it takes "
                                "token ids and returns token ids; use /generate with input_ids")

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids)

    def check_serving(self) -> None:
        if self.draining:
            raise APIError(503, "the server is shutting down", type_="ServiceUnavailableError")

    def model_card(self) -> dict:
        return {"id": self.served_model_name, "object": "model", "created": self.created, "owned_by": "hotswap",
                "root": self.model_path, "parent": None, "max_model_len": self.max_context_len}

    def fingerprint(self, outputs: list[dict]) -> str:
        versions = [o["meta_info"].get("weight_version") for o in outputs if o.get("meta_info")]
        version = versions[-1] if versions else self.last_weight_version
        if version:
            self.last_weight_version = version
        return f"hotswap-{hotswap.__version__}-w{version}"

    def render_chat(self, messages: list[dict], *, tools, add_generation_prompt: bool, continue_final_message: bool,
                    kwargs: dict | None, add_special_tokens: bool = False) -> list[int]:
        """The prompt ids of a chat. `add_special_tokens`: vLLM's (default False: the template holds its special
        tokens; true adds the tokenizer's, a BOS, on top), on the chat route and /tokenize alike."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, "the model's tokenizer has no chat template; use /v1/completions", param="messages")
        msgs = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if not isinstance(role, str) or not role:
                raise APIError(400, f"messages[{i}].role must be a non-empty string", param="messages")
            # SGLang's message roles (entrypoints/openai/protocol.py, ChatCompletionMessageGenericParam._normalize_role and
            # ChatCompletionMessageUserParam): case-insensitive, lowercased, any other refused. Templates test the role by
            # name, so a "User" or an unknown role was dropped from the prompt without a word.
            if role.lower() not in _CHAT_ROLES:
                raise APIError(400, f"messages[{i}].role must be one of {', '.join(sorted(_CHAT_ROLES))} (case-insensitive), "
                                    f"got {shown(role)}", param="messages")
            m = {**m, "role": role.lower()}
            content = m.get("content")
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise APIError(400, f"messages[{i}].content[{j}]: hotswap takes only text parts ({{'type': 'text', 'text': ...}})",
                                       param="messages")
                    texts.append(part["text"])
                content = "\n".join(texts)
            elif content is None:
                content = None if m.get("tool_calls") else ""
            elif not isinstance(content, str):
                raise APIError(400, f"messages[{i}].content must be a string or a list of text parts", param="messages")
            msgs.append({**m, "content": content, **_parsed_tool_calls(m)})
        extra = dict(kwargs or {})
        # only the server's own template runs (transformers renders it in a sandboxed Jinja environment): a
        # template, or any other argument of apply_chat_template itself, is refused when a client sends it
        refused = sorted(set(extra) & _TEMPLATE_OWN_ARGS)
        if refused:
            raise APIError(400, f"chat_template_kwargs may not set {', '.join(refused)}: the server's chat template is the only one that runs",
                           param="chat_template_kwargs")
        if len(dumps(extra)) > _MAX_TEMPLATE_KWARGS_BYTES:
            raise APIError(400, f"chat_template_kwargs is larger than {_MAX_TEMPLATE_KWARGS_BYTES} bytes", param="chat_template_kwargs")
        if tools:
            extra["tools"] = tools
        try:
            text = self.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=add_generation_prompt and not continue_final_message,
                                                      continue_final_message=continue_final_message, **extra)
        except Exception as exc:  # noqa: BLE001 - jinja raises anything; it is the client's template input
            raise APIError(400, f"cannot apply the chat template: {type(exc).__name__}: {exc}", param="messages") from None
        return self.engine.encode(text, add_special_tokens=add_special_tokens)

    async def load(self, timeout: float | None = None) -> p.LoadOutput | None:
        try:
            fut = self.engine.asubmit(p.GetLoadRequest())
            out = await (asyncio.wait_for(fut, timeout) if timeout else fut)
        except (asyncio.TimeoutError, ValueError):
            return None
        self.last_weight_version = out.weight_version
        return out

    async def sglang_load(self) -> tuple[p.LoadOutput, int, int]:
        """(the engine's load, KV tokens in use, SGLang's token load: in use plus still to prefill, which its
        router balances on) for SGLang's load routes; 503 when the engine does not answer."""
        load = await self.load(timeout=5.0)
        if load is None:
            raise APIError(503, "the engine did not answer")
        used = load.kv_pages_used * self.page_size
        return load, used, used + load.num_waiting_tokens


# ---- middleware: auth and per-route counters --------------------------------------------------------


class ServerMiddleware:
    """Pure ASGI (streaming and disconnects pass through untouched): the access policy (Host, Origin, JSON
    bodies), the API keys (server/auth.py: SGLang's rules), and a request counter per (method, route, status)."""

    def __init__(self, app: ASGIApp, state: ServerState):
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        method = scope.get("method", "")
        try:
            self.state.policy.check_request(method, scope.get("path", ""), dict(scope.get("headers", ())))
        except APIError as err:
            await _send_error(send, err)
            self.state.metrics.observe_http(method, "refused", err.status)
            return
        keys = self.state.keys
        if keys.any and not keys.admits(method, scope.get("path", ""), dict(scope.get("headers", ()))):
            err = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>' or 'x-api-key: <key>' (the admin "
                           "key on admin routes when the server has one)", type_="AuthenticationError", code="invalid_api_key")
            await _send_error(send, err, [(b"www-authenticate", b"Bearer")])
            self.state.metrics.observe_http(method, "unauthorized", 401)
            return
        status = _CLIENT_CLOSED

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            route = scope.get("route")
            self.state.metrics.observe_http(method, getattr(route, "path", None) or "unmatched", status)


async def _send_error(send: Send, err: APIError, extra_headers: list[tuple[bytes, bytes]] = ()) -> None:
    body = dumps(error_body(err))
    await send({"type": "http.response.start", "status": err.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]})
    await send({"type": "http.response.body", "body": body})


# ---- native routes ----------------------------------------------------------------------------------


class GenerateBody(BaseModel):
    """SGLang's GenerateReqInput, the fields hotswap serves. SGLang's fields it does not serve are refused when
    set (engine/unserved.py); keys SGLang does not know are ignored, as SGLang ignores them."""

    model_config = ConfigDict(extra="allow")
    text: str | list[str] | None = None
    input_ids: list[int] | list[list[int]] | None = None
    sampling_params: dict[str, Any] | list[dict[str, Any]] | None = None
    stream: bool = False
    return_logprob: bool | list[bool] | None = False  # None: unset, as SGLang's Optional fields
    top_logprobs_num: int | list[int] | None = 0
    logprob_start_len: int | list[int] | None = None
    return_text_in_logprobs: bool = False
    return_routed_experts: bool = False
    routed_experts_start_len: int = 0  # the returned routing starts at this absolute position (<= the prompt's length)
    rid: str | list[str] | None = None
    image_data: Any = None  # refused by the engine when set (text-only)
    lora_path: Any = None  # refused by the engine when set (no adapters)
    custom_logit_processor: Any = None  # refused by the engine when set


class AbortBody(BaseModel):
    model_config = ConfigDict(extra="ignore")
    rid: str | None = ""
    abort_all: bool = False


def _fill_logprob_text(state: ServerState, out: dict) -> None:
    meta = out.get("meta_info", {})
    if "output_token_logprobs" in meta:
        meta["output_token_logprobs"] = [(lp, tid, state.token_text(tid)) for lp, tid, _ in meta["output_token_logprobs"]]
    if "output_top_logprobs" in meta:
        meta["output_top_logprobs"] = [[(lp, tid, state.token_text(tid)) for lp, tid, _ in top] for top in meta["output_top_logprobs"]]
    if "input_token_logprobs" in meta:
        meta["input_token_logprobs"] = [(lp, tid, state.token_text(tid)) for lp, tid, _ in meta["input_token_logprobs"]]
    if "input_top_logprobs" in meta:
        meta["input_top_logprobs"] = [None if top is None else [(lp, tid, state.token_text(tid)) for lp, tid, _ in top]
                                      for top in meta["input_top_logprobs"]]


HEALTH_CHECK_TIMEOUT_S = 20.0  # SGLang's HEALTH_CHECK_TIMEOUT


def _register_native(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health() -> Response:
        if state.draining:
            return Response(status_code=503)
        return Response(status_code=200)

    @app.get("/health_generate")
    async def health_generate() -> Response:
        """SGLang's rule (http_server.py::health_generate): a 1-token probe is sent, and the engine is healthy
        once it answers anything after the probe started, within 20 s: the probe's own output, or any step of
        the requests already running. A busy engine, whose probe queues behind a full batch, is healthy (slime's
        and miles' health monitors kill an engine that fails this under load)."""
        if state.draining:
            return Response(status_code=503)
        start = await state.load(timeout=5.0)
        if start is None:
            return Response(status_code=503)
        if start.paused:  # held on purpose (a weight update); generating would only wait
            return Response(status_code=200)
        token = engine.eos_token_ids[0] if getattr(engine, "eos_token_ids", None) else 0
        probe = asyncio.ensure_future(engine.async_generate(input_ids=[token], sampling_params={"max_new_tokens": 1, "temperature": 0.0}))
        deadline = time.monotonic() + HEALTH_CHECK_TIMEOUT_S
        try:
            while time.monotonic() < deadline:
                await asyncio.wait({probe}, timeout=min(1.0, max(deadline - time.monotonic(), 0.0)))
                if probe.done():
                    return Response(status_code=503 if probe.exception() is not None else 200)
                now = await state.load(timeout=max(min(1.0, deadline - time.monotonic()), 0.01))
                if now is not None and now.num_steps > start.num_steps:
                    return Response(status_code=200)
            return Response(status_code=503)
        finally:
            if not probe.done():
                probe.cancel()  # aborts the probe request (async_generate frees what still runs)
            await asyncio.gather(probe, return_exceptions=True)

    async def model_info() -> JSONResponse:
        info = await asyncio.to_thread(engine.get_model_info)
        info["served_model_name"] = state.served_model_name
        return JSONResponse(info)

    async def server_info(request: Request) -> JSONResponse:
        info = await asyncio.to_thread(engine.get_server_info)
        served = request.scope.get("server")  # the address this server listens on, as SGLang reports its --host / --port
        if served and served[1] is not None:
            info.update({"host": served[0], "port": served[1]})
        info.update({"served_model_name": state.served_model_name, "api_key_set": state.keys.api_key is not None,
                     "admin_api_key_set": state.keys.admin_api_key is not None,
                     "model_info": engine.model_info()})
        return JSONResponse(info)

    for path in ("/get_model_info", "/model_info"):  # SGLang renamed them; frameworks call both names
        app.add_api_route(path, model_info, methods=["GET"], name=path.strip("/"))
    for path in ("/get_server_info", "/server_info"):
        app.add_api_route(path, server_info, methods=["GET"], name=path.strip("/"))

    @app.get("/v1/loads")
    async def loads(include: str | None = None, dp_rank: str | None = None, format: str | None = None) -> Response:  # noqa: A002
        """SGLang's per-DP load reply (one DP rank here); slime polls it after abort_all until idle, sgl-model-gateway
        and smg read token_usage, gen_throughput and cache_hit_rate from it (server/loads.py)."""
        query = parse_query(include, dp_rank, format)
        load, used, tokens = await state.sglang_load()
        rows = [] if query.dp_rank not in (None, 0) else [load_entry(load, TokenLoad(used=used, total=tokens, capacity=state.kv_capacity_tokens), query)]
        if query.prometheus:
            return PlainTextResponse(loads_prometheus(rows), media_type="text/plain; version=0.0.4; charset=utf-8")
        return JSONResponse(loads_envelope(rows, version=hotswap.__version__, accelerator=engine.accelerator,
                                           num_accelerators=engine.config.tensor_parallel_size))

    @app.get("/get_load")
    async def get_load() -> JSONResponse:
        """SGLang's legacy shim: a list with one entry per DP rank, {dp_rank, num_reqs, num_waiting_reqs,
        num_tokens (used + pending prefill), num_pending_tokens, ts_tic}, which sgl-model-gateway (slime's and
        miles' router) polls to balance load; hotswap's LoadOutput fields ride beside them in the entry."""
        load, _, tokens = await state.sglang_load()
        entry = {"dp_rank": 0, "num_reqs": load.num_running + load.num_waiting, "num_waiting_reqs": load.num_waiting,
                 "num_tokens": tokens, "num_pending_tokens": load.num_waiting_tokens,
                 "ts_tic": time.perf_counter(), **load.to_dict()}
        return JSONResponse([entry])

    async def weight_version() -> JSONResponse:
        load = await state.load(timeout=2.0)
        return JSONResponse({"weight_version": load.weight_version if load else state.last_weight_version})

    for path in ("/weight_version", "/get_weight_version"):  # SGLang's name now, and the one it deprecated
        app.add_api_route(path, weight_version, methods=["GET"], name=path.strip("/"))

    @app.get("/metrics")
    async def metrics() -> PlainTextResponse:
        load = await state.load(timeout=1.0)
        counts = state.metrics if state.metrics_share is None else state.metrics_share.total(state.metrics)
        return PlainTextResponse(counts.render(load, state.served_model_name, state.page_size), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/get_ipc_token")
    async def get_ipc_token() -> JSONResponse:
        token = engine.get_ipc_token()
        return JSONResponse({"ipc_token": token, "shm_prefix": shm_block_prefix(token)})

    @app.api_route("/flush_cache", methods=["GET", "POST"])
    async def flush_cache(request: Request) -> JSONResponse:
        """SGLang's: `?timeout=` (seconds, >= 0) waits that long for running requests to finish before refusing."""
        refuse_browser_get(request)  # slime and verl flush with GET; a page's link or <img> cannot
        timeout_s = query_float(request, "timeout", default=0.0, minimum=0.0)
        out = await engine.asubmit(p.FlushCacheRequest(timeout_s=timeout_s))
        return JSONResponse(out.to_dict(), status_code=200 if out.success else 400)

    @app.post("/abort_request")
    async def abort_request(request: Request) -> Response:
        """SGLang's: `{rid}` aborts that request (a non-streaming one returns its tokens so far with finish
        reason abort), `{abort_all: true}` every request; 200 with an empty body."""
        try:
            body = await parse_body(request, AbortBody)
        except APIError as exc:
            return JSONResponse({"success": False, "message": exc.message}, status_code=exc.status)
        if body.abort_all:
            await engine.asubmit(p.AbortRequest(rid=None, message="aborted by /abort_request"))
        elif body.rid:  # as SGLang: an empty rid without abort_all aborts nothing
            await engine.asubmit(p.AbortRequest(rid=body.rid, message="aborted by /abort_request"))
        return Response(status_code=200)

    @app.post("/generate")
    async def generate(request: Request):
        body = await parse_body(request, GenerateBody)
        refuse_unserved_fields_over_http(body.model_extra or {})
        state.check_serving()
        if body.text is None and body.input_ids is None:
            raise APIError(400, "give text or input_ids", param="text")
        # SGLang's rule: given both, the input_ids run (the engine checks that their shapes agree)
        if body.input_ids is not None:
            single = not body.input_ids or isinstance(body.input_ids[0], int)
        else:
            single = isinstance(body.text, str)
        count = 1 if single else len(body.input_ids if body.input_ids is not None else body.text)
        if count == 0:
            raise APIError(400, "empty batch", param="text")
        if isinstance(body.sampling_params, list):
            if len(body.sampling_params) != count:
                raise APIError(400, f"{len(body.sampling_params)} sampling_params for {count} prompts", param="sampling_params")
            sps = [normalize_sampling_params(sp) for sp in body.sampling_params]
        else:
            sps = [normalize_sampling_params(body.sampling_params)] * count
        # the engine prepares, validates and fans out (prompts x n, seeds) on every path, streaming or not, and takes
        # the logprob options as one value or SGLang's list of one per prompt; a client rid is the engine's id for the
        # request, so /abort_request reaches it directly
        kwargs = {"prompt": body.text, "input_ids": body.input_ids, "sampling_params": sps if isinstance(body.sampling_params, list) else sps[0],
                  "return_logprob": body.return_logprob, "top_logprobs_num": body.top_logprobs_num,
                  "logprob_start_len": body.logprob_start_len,
                  "return_routed_experts": body.return_routed_experts, "routed_experts_start_len": body.routed_experts_start_len,
                  "rid": body.rid, "image_data": body.image_data, "lora_path": body.lora_path,
                  "custom_logit_processor": body.custom_logit_processor}

        def post(out: dict) -> dict:
            if body.return_text_in_logprobs:
                _fill_logprob_text(state, out)
            return out

        if not body.stream:
            result = await await_generation(request, engine.async_generate(**kwargs))
            outs = result if isinstance(result, list) else [result]
            for out in outs:
                post(out)
            state.metrics.observe_generation("/generate", outs)
            return JSONResponse(result)

        chunks = await open_stream(engine, **kwargs)

        async def events():
            finals: list[dict] = []
            try:
                async for out in chunks:
                    finished = out["meta_info"].get("finish_reason") is not None
                    post(out)
                    if finished:
                        finals.append(out)
                    yield sse(out)
            except Exception as exc:  # noqa: BLE001 - the stream has started: report in-band
                yield stream_error_event(exc)
            finally:
                await chunks.aclose()
                state.metrics.observe_generation("/generate", finals)
            yield SSE_DONE

        return DisconnectAwareStreamingResponse(events(), on_disconnect=state.metrics.observe_disconnect)


# ---- the factory ------------------------------------------------------------------------------------


# The event loop serving HTTP and the engine's scheduler thread share one interpreter lock. Each time the scheduler
# waits on the device it lets the lock go, and a busy event loop (hundreds of streams) then keeps it for up to the
# switch interval before the scheduler runs again: 5 ms by default, about a whole decode step. A short interval
# bounds that wait (measured on the H200: docs/benchmarks.md, streaming rollouts).
GIL_SWITCH_INTERVAL_S = 0.0005

def create_app(engine, *, api_key: str | None = None, admin_api_key: str | None = None, served_model_name: str | None = None,
               policy: AccessPolicy | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
               body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S) -> FastAPI:
    """Build the HTTP app on a running Engine. The caller owns the engine (and shuts it down).
    `api_key` / `admin_api_key`: SGLang's keys (server/auth.py says which routes need which).
    `max_body_bytes`: larger request bodies get 413; `body_timeout_s`: a body not in within this many seconds
    gets 408 (0: no limit for either)."""
    state = ServerState(engine, keys=ApiKeys(api_key, admin_api_key), served_model_name=served_model_name, policy=policy or AccessPolicy())
    sys.setswitchinterval(min(sys.getswitchinterval(), GIL_SWITCH_INTERVAL_S))
    make_garbage_collections_rare()
    app = FastAPI(title="hotswap", version=hotswap.__version__, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.hotswap = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(ClientDisconnected)
    @app.exception_handler(ClientDisconnect)  # gone before its body was in: nothing was started
    async def _gone(request: Request, exc: Exception) -> Response:
        state.metrics.observe_disconnect()
        return Response(status_code=_CLIENT_CLOSED)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            detail = f"no route {request.method} {request.url.path}"
        return error_response(APIError(exc.status_code, detail))

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(APIError(400, f"invalid request: {exc.errors()}"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}"))

    _register_native(app, state)
    register_openai_routes(app, state)
    register_weight_routes(app, state)
    register_diagnostics_routes(app, state)
    register_vllm_routes(app, state)
    app.add_middleware(BodyLimits, max_bytes=max_body_bytes, timeout_s=body_timeout_s)
    app.add_middleware(ServerMiddleware, state=state)
    return app
