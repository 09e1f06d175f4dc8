"""Engine-facing generation helpers shared by the native and OpenAI routes: SGLang sampling-parameter
compatibility, fan-out of prompts x n into single streams, merging those streams, and client request ids."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from hotswap.server.http_utils import APIError

# SGLang sampling parameters hotswap does not implement. Sent with their neutral value they are dropped,
# so frameworks that always send them work; any other value is refused rather than silently ignored.
_NEUTRAL = {
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "repetition_penalty": 1.0,
    "min_new_tokens": 0,
}
_MUST_BE_EMPTY = ("regex", "json_schema", "ebnf", "structural_tag", "logit_bias", "custom_params", "lora_path")
# Accepted and ignored: they change nothing observable in hotswap's outputs (or only formatting).
_IGNORED = ("spaces_between_special_tokens", "stream_interval")


def normalize_sampling_params(params: Any) -> tuple[dict, bool]:
    """SGLang's sampling_params dict -> (hotswap SamplingParams dict, no_stop_trim). Raises APIError(400)."""
    if params is None:
        return {}, False
    if not isinstance(params, dict):
        raise APIError(400, f"sampling_params must be an object, got {type(params).__name__}", param="sampling_params")
    sp = dict(params)
    for key, neutral in _NEUTRAL.items():
        if key in sp:
            value = sp.pop(key)
            if value is not None and value != neutral:
                raise APIError(400, f"sampling parameter {key}={value!r} is not supported by hotswap (only {neutral!r})", param=key)
    for key in _MUST_BE_EMPTY:
        if key in sp:
            value = sp.pop(key)
            if value:
                raise APIError(400, f"sampling parameter {key!r} is not supported by hotswap", param=key)
    for key in _IGNORED:
        sp.pop(key, None)
    if "sampling_seed" in sp:
        seed = sp.pop("sampling_seed")
        if seed is not None:
            sp.setdefault("seed", seed)
    for key in ("max_new_tokens", "top_k", "top_p", "min_p", "temperature", "seed", "n"):
        if key in sp and sp[key] is None:
            del sp[key]
    no_stop_trim = sp.pop("no_stop_trim", False)
    if not isinstance(no_stop_trim, bool):
        raise APIError(400, "sampling parameter no_stop_trim must be a boolean", param="no_stop_trim")
    return sp, no_stop_trim


def apply_no_stop_trim(out: dict, *, delta: bool = False) -> None:
    """Append the stop string that ended a request to its text (SGLang's no_stop_trim)."""
    reason = out.get("meta_info", {}).get("finish_reason") or {}
    if reason.get("type") == "stop" and isinstance(reason.get("matched"), str):
        out["text"] = out.get("text", "") + reason["matched"]
        if delta and "delta_text" in out:
            out["delta_text"] += reason["matched"]


@dataclass(slots=True)
class Job:
    """One engine request (n == 1) of a streamed fan-out."""

    prompt: str | None
    input_ids: list[int] | None
    sampling_params: dict
    return_logprob: bool
    top_logprobs_num: int

    def kwargs(self) -> dict:
        kw = {"sampling_params": self.sampling_params, "return_logprob": self.return_logprob, "top_logprobs_num": self.top_logprobs_num}
        if self.input_ids is not None:
            kw["input_ids"] = self.input_ids
        else:
            kw["prompt"] = self.prompt
        return kw


def expand_jobs(prompts: list[str] | None, id_lists: list[list[int]] | None, sps: list[dict], *, return_logprob: bool,
                top_logprobs_num: int) -> list[Job]:
    """prompts (or id lists) x n -> single jobs in the engine's order (prompt-major), with the engine's
    seeding rule (seed + k for the k-th sample), so a streamed fan-out equals the non-streamed call."""
    items = prompts if prompts is not None else id_lists
    jobs = []
    for i, item in enumerate(items):
        sp = sps[i]
        n = sp.get("n", 1)
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise APIError(400, f"invalid sampling parameter: n must be a positive integer, got {n!r}", param="n")
        for k in range(n):
            one = dict(sp, n=1)
            if sp.get("seed") is not None and isinstance(sp["seed"], int):
                one["seed"] = sp["seed"] + k
            jobs.append(Job(prompt=item if prompts is not None else None, input_ids=item if prompts is None else None,
                            sampling_params=one, return_logprob=return_logprob, top_logprobs_num=top_logprobs_num))
    return jobs


async def open_streams(engine, jobs: list[Job]) -> list[AsyncIterator[dict]]:
    """Validate every job and create its stream; nothing reaches the scheduler until a stream is iterated,
    so a bad job refuses the whole call before any request starts. Raises ValueError (HotswapError)."""
    return [await engine.async_generate(stream=True, **job.kwargs()) for job in jobs]


async def merge_streams(streams: list[AsyncIterator[dict]]) -> AsyncIterator[tuple[int, dict]]:
    """Yield (job index, chunk) from several engine streams as chunks arrive. Closing this iterator (or
    cancelling its consumer) closes every stream, which aborts their unfinished engine requests."""
    if len(streams) == 1:
        it = streams[0]
        try:
            async for chunk in it:
                yield 0, chunk
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()
        return
    q: asyncio.Queue = asyncio.Queue()
    _END = object()

    async def pump(i: int, it: AsyncIterator[dict]) -> None:
        try:
            async for chunk in it:
                q.put_nowait((i, chunk))
        except Exception as exc:  # delivered to the consumer
            q.put_nowait((i, exc))
        finally:
            with contextlib.suppress(Exception):
                await it.aclose()
            q.put_nowait((i, _END))

    tasks = [asyncio.ensure_future(pump(i, it)) for i, it in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            i, item = await q.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(slots=True)
class ClientRequest:
    """A generation call registered under a client-chosen `rid`, so /abort_request can reach it."""

    engine_rids: set[str] = field(default_factory=set)
    abort_requested: bool = False
    cancel: Callable[[], None] | None = None  # cancels a non-streaming wait


class ClientRids:
    """client rid -> the engine requests behind it (engine rids appear in `meta_info.id`)."""

    def __init__(self) -> None:
        self._entries: dict[str, ClientRequest] = {}

    def register(self, rids: list[str]) -> ClientRequest | None:
        if not rids:
            return None
        entry = ClientRequest()
        for rid in rids:
            self._entries[rid] = entry
        return entry

    def release(self, rids: list[str], entry: ClientRequest | None) -> None:
        for rid in rids:
            if self._entries.get(rid) is entry:
                del self._entries[rid]

    def get(self, rid: str) -> ClientRequest | None:
        return self._entries.get(rid)
