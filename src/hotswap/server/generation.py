"""Engine-facing generation helpers shared by the native and OpenAI routes: SGLang sampling-parameter
compatibility, opening an engine stream (the engine fans prompts x n out itself), and engine refusals as
HTTP errors."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from starlette.requests import Request

from hotswap.engine.unserved import UNSERVED_GENERATE_FIELDS, is_unset, refuse_unserved_fields
from hotswap.errors import ConstrainedDecodingError, EngineUnavailableError, UnservedFieldError, shown
from hotswap.sampling_params import refuse_constrained_decoding
from hotswap.server.http_utils import APIError, await_unless_disconnected, error_body, sse

# SGLang sampling parameters hotswap does not implement: sent empty they are dropped, so frameworks that
# always send them work; any other value is refused rather than silently ignored. (Constrained-decoding
# fields: refused below with their own message; sent unset, the engine drops them.)
# set, refused by name: LoRA, and vLLM's penalty rule (SamplingParams.vllm_penalty_rule, which only the vLLM routes
# set: a native request follows SGLang's, as SGLang's own SamplingParams knows no such field)
_MUST_BE_EMPTY = ("lora_path", "vllm_penalty_rule")


def refuse_unserved_fields_over_http(extra: dict[str, Any], unserved: dict[str, str] = UNSERVED_GENERATE_FIELDS) -> None:
    """engine/unserved.py's refusal as HTTP's 400 naming the field (`param`). `extra`: the request's fields its
    model does not declare."""
    try:
        refuse_unserved_fields(extra, unserved)
    except UnservedFieldError as exc:
        raise APIError(400, str(exc), param=exc.field) from None


def refuse_constrained_decoding_over_http(fields: dict) -> None:
    """sampling_params.refuse_constrained_decoding as HTTP's 400 naming the field (`param`)."""
    try:
        refuse_constrained_decoding(fields)
    except ConstrainedDecodingError as exc:
        raise APIError(400, str(exc), param=exc.field) from None


def normalize_sampling_params(params: Any) -> dict:
    """SGLang's sampling_params dict -> hotswap's SamplingParams dict (the engine validates the values).
    Raises APIError(400)."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise APIError(400, f"sampling_params must be an object, got {type(params).__name__}", param="sampling_params")
    sp = dict(params)
    refuse_constrained_decoding_over_http(sp)
    for key in _MUST_BE_EMPTY:
        if key in sp:
            value = sp.pop(key)
            if not is_unset(value):
                raise APIError(400, f"sampling parameter {shown(key)} is not supported by hotswap", param=key)
    return sp  # None is a field's default (the engine reads it so on every path, as SGLang does)


def engine_error(exc: Exception) -> APIError:
    """A refusal from the engine as an HTTP error: 503 when generation cannot run now, else 400."""
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), type_="ServiceUnavailableError")
    return APIError(400, str(exc))


async def await_generation(request: Request, generation: Awaitable[Any]) -> Any:
    """A non-streaming `engine.async_generate(...)`, awaited unless the client goes (ClientDisconnected);
    an engine refusal as its HTTP error."""
    try:
        return await await_unless_disconnected(request, generation)
    except (ValueError, TypeError) as exc:  # the engine refused (HotswapError is a ValueError)
        raise engine_error(exc) from None


def stream_error_event(exc: Exception) -> bytes:
    """The SSE event reporting a failure after a stream has started (its status is already sent)."""
    err = exc if isinstance(exc, APIError) else engine_error(exc) if isinstance(exc, ValueError) else APIError(500, str(exc))
    return sse(error_body(err))


async def open_stream(engine, first_chunk_wait_s: float = 1.0, **kwargs) -> AsyncIterator[dict]:
    """`engine.async_generate(stream=True, ...)`, waiting up to `first_chunk_wait_s` for its first chunk so
    that a refusal (bad input: 400; memory released: 503, answered within a scheduler step) is the reply's
    status. A first chunk that takes longer (generation paused: the request queues) lets the response start;
    what comes later, a refusal included, is sent in-band."""
    try:
        stream = await engine.async_generate(stream=True, **kwargs)
    except (ValueError, TypeError) as exc:  # HotswapError is a ValueError
        raise engine_error(exc) from None
    first = asyncio.ensure_future(anext(stream))
    await asyncio.wait({first}, timeout=first_chunk_wait_s)
    if first.done() and first.exception() is not None:
        await stream.aclose()
        exc = first.exception()
        if isinstance(exc, StopAsyncIteration):
            raise APIError(500, "the engine ended the stream without output")
        raise engine_error(exc) if isinstance(exc, (ValueError, TypeError)) else exc

    async def chunks() -> AsyncIterator[dict]:
        try:
            yield await first
            async for chunk in stream:
                yield chunk
        finally:
            if not first.done():
                first.cancel()
                await asyncio.gather(first, return_exceptions=True)
            await stream.aclose()

    return chunks()
