"""HTTP plumbing shared by the route modules: body parsing, error shapes, JSON/SSE responses, and
waiting on the engine while watching for the client to go away."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import anyio
import orjson
from pydantic import TypeAdapter, ValidationError
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from hotswap.errors import shown

T = TypeVar("T")

SSE_DONE = b"data: [DONE]\n\n"


class APIError(Exception):
    """A refused HTTP request: status code plus OpenAI's error fields."""

    def __init__(self, status: int, message: str, *, type_: str | None = None, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_ or _default_type(status)
        self.param = param
        self.code = code


def _default_type(status: int) -> str:
    return {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError", 405: "MethodNotAllowed",
            413: "RequestTooLarge", 422: "UnprocessableEntityError", 503: "ServiceUnavailableError"}.get(
        status, "InternalServerError" if status >= 500 else "invalid_request_error")


class ClientDisconnected(Exception):
    """The client closed its connection while we waited on the engine."""


def _clean(obj: Any) -> Any:
    """Replace non-finite floats (JSON has none) with None, recursively."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def _as_json_does(obj: Any) -> Any:
    """What `json.dumps(default=str)` writes for what orjson leaves to `default`: a float subclass (a numpy
    float64) as a number, a tuple subclass (a namedtuple) as an array, anything else (a dataclass, a datetime) as its str."""
    if isinstance(obj, float):
        return float(obj)
    if isinstance(obj, tuple):
        return list(obj)
    return str(obj)


_ORJSON_OPTIONS = orjson.OPT_NON_STR_KEYS | orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON; a NaN or inf (a logprob of a masked token) is sent as null. orjson (SGLang's encoder
    too) is about ten times faster than `json` on streamed chunks, which the front end encodes per token
    (docs/benchmarks.md); what it cannot encode (an int past 64 bits) goes through `json`."""
    try:
        return orjson.dumps(obj, default=_as_json_does, option=_ORJSON_OPTIONS)
    except TypeError:
        pass
    try:
        return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":"), default=str).encode()
    except ValueError:
        return json.dumps(_clean(obj), ensure_ascii=False, separators=(",", ":"), default=str).encode()


class JSONResponse(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return dumps(content)


def error_body(err: APIError) -> dict:
    return {"error": {"message": err.message, "type": err.type, "param": err.param, "code": err.code if err.code is not None else err.status}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err), status_code=err.status)


def sse(obj: Any) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def query_bool(request: Request, name: str, default: bool) -> bool:
    """A boolean query parameter as FastAPI's Query() reads one; anything else is a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off"):
        return False
    raise APIError(400, f"query parameter {name}={shown(raw)} is not a boolean", param=name)


def query_float(request: Request, name: str, default: float, minimum: float) -> float:
    """A finite number >= `minimum` from the query string (FastAPI's Query(ge=...)); anything else is a 400 naming it."""
    raw = request.query_params.get(name)
    if raw is None:
        return default
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= minimum):
        raise APIError(400, f"query parameter {name}={shown(raw)} must be a finite number >= {minimum:g}", param=name)
    return value


def format_validation_error(exc: ValidationError) -> str:
    parts = []
    for e in exc.errors(include_url=False):
        if e.get("type") == "json_invalid":
            return f"malformed JSON body: {e.get('msg')}"
        loc = ".".join(str(x) for x in e.get("loc", ()) if not str(x).startswith(("function-", "tagged-union")))
        msg = e.get("msg", "invalid value")
        parts.append(f"{loc}: {msg}" if loc else msg)
    # unions report one error per branch; keep them short and distinct
    seen: list[str] = []
    for p in parts:
        if p not in seen:
            seen.append(p)
    text = "; ".join(seen[:6])
    return f"invalid request body: {text}" + (f" (and {len(seen) - 6} more)" if len(seen) > 6 else "")


_adapters: dict[Any, TypeAdapter] = {}


def _adapter(tp) -> TypeAdapter:
    ad = _adapters.get(tp)
    if ad is None:
        ad = _adapters[tp] = TypeAdapter(tp)
    return ad


async def parse_body(request: Request, tp: type[T], *, allow_query: bool = False) -> T:
    """Validate the JSON body into `tp` (a pydantic model or a dataclass). An empty body reads as {};
    with allow_query, an empty body falls back to the query parameters. Raises APIError(400)."""
    raw = await request.body()
    if not raw.strip():
        data: Any = dict(request.query_params) if allow_query else {}
        try:
            return _adapter(tp).validate_python(data)
        except ValidationError as exc:
            raise APIError(400, format_validation_error(exc), param=_first_loc(exc)) from None
    try:
        return _adapter(tp).validate_json(raw)
    except ValidationError as exc:
        raise APIError(400, format_validation_error(exc), param=_first_loc(exc)) from None


def _first_loc(exc: ValidationError) -> str | None:
    for e in exc.errors(include_url=False):
        loc = e.get("loc") or ()
        if loc and isinstance(loc[0], str):
            return loc[0]
    return None


async def wait_for_disconnect(receive: Receive) -> None:
    """Return once the client has gone (needs the request body to be read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def await_unless_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await `awaitable` (e.g. engine.async_generate) unless the client disconnects first; then cancel it
    (which aborts the engine requests behind it) and raise ClientDisconnected."""
    task = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(wait_for_disconnect(request.receive))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task in done:
            return task.result()
        task.cancel()
        try:
            await task
        except BaseException:  # noqa: BLE001 - we only need the task finished
            pass
        raise ClientDisconnected()
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()


class DisconnectAwareStreamingResponse(StreamingResponse):
    """A StreamingResponse that always listens for the client's disconnect, whatever the ASGI spec version,
    and cancels the body iterator when it comes: the iterator's `finally` frees the engine requests even
    when no token is flowing (e.g. generation is paused)."""

    def __init__(self, content: AsyncIterator[bytes], on_disconnect=None, **kw):
        kw.setdefault("media_type", "text/event-stream")
        headers = dict(kw.pop("headers", None) or {})
        headers.setdefault("Cache-Control", "no-cache")
        headers.setdefault("X-Accel-Buffering", "no")
        super().__init__(content, headers=headers, **kw)
        self._on_disconnect = on_disconnect

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        heard_disconnect = False
        completed = False  # the last body message was sent (stream_response returns only after sending it)

        async with anyio.create_task_group() as tg:

            async def stream() -> None:
                nonlocal completed
                try:
                    await self.stream_response(send)
                    completed = True
                except OSError:
                    pass
                tg.cancel_scope.cancel()

            async def listen() -> None:
                nonlocal heard_disconnect
                await wait_for_disconnect(receive)
                heard_disconnect = True
                tg.cancel_scope.cancel()

            tg.start_soon(stream)
            tg.start_soon(listen)
        if heard_disconnect and not completed:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
            if self._on_disconnect is not None:
                self._on_disconnect()
        if self.background is not None:
            await self.background()
