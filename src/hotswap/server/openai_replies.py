"""The OpenAI routes' replies: choices' fields (finish_reason, matched_stop, logprobs in OpenAI's and vLLM's shapes),
usage, SGLang's metadata and sglext, the reply id, and the one streaming loop both routes share."""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

from hotswap.server.generation import stream_error_event
from hotswap.server.http_utils import SSE_DONE, DisconnectAwareStreamingResponse, sse

if TYPE_CHECKING:
    from hotswap.server.app import ServerState
    from hotswap.server.openai_requests import SamplingFields


def finish_reason(meta: dict) -> str | None:
    """OpenAI's finish_reason: the engine's finish type (stop, length, abort) as it is."""
    reason = meta.get("finish_reason")
    return reason.get("type") if reason else None


def matched_stop(meta: dict) -> int | str | None:
    """SGLang's choice `matched_stop` (CompletionResponseChoice / ChatCompletionResponseChoice): the stop token
    id or stop string that ended the choice; None otherwise."""
    reason = meta.get("finish_reason")
    return reason.get("matched") if reason else None


def routed(meta: dict) -> dict:
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


def reply_usage(prompt_tokens: int, outputs: list[dict], n: int) -> dict:
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


def _runs(versions: list[str]) -> list[str]:
    """Per-token weight versions -> the versions of its consecutive runs (["1", "1", "2"] -> ["1", "2"])."""
    return [v for j, v in enumerate(versions) if j == 0 or versions[j - 1] != v]


def _choice_versions(out: dict) -> list[str]:
    meta = out["meta_info"]
    return _runs(meta.get("weight_versions") or [meta.get("weight_version")])


def reply_metadata(outputs: list[dict]) -> dict:
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


def stream_usage(body: SamplingFields) -> str | None:
    """What a stream says of usage (`stream_options`): None, "final" (a last chunk with it) or "continuous"
    (also every chunk with choices: the counts so far, as SGLang's and vLLM's continuous_usage_stats)."""
    opts = body.stream_options
    if opts is None or not opts.include_usage:
        return None
    return "continuous" if opts.continuous_usage_stats else "final"


def stream_response(state: ServerState, route: str, chunks, *, rid: str, object_name: str, created: int, usage: str | None, n: int,
                     prompt_tokens: int, opening: list[dict], choice, token_ids: bool = False, meta_info: bool = False,
                     opening_extra: dict | None = None) -> DisconnectAwareStreamingResponse:
    """The one OpenAI streaming loop (completions and chat). `opening`: choices sent before any token (echo,
    role), with `opening_extra` top-level fields; `choice(i, text, meta, start, end, finish)`: the route's
    choice for the tokens [start, end) of request i. `token_ids`: each choice carries its new token ids;
    `meta_info`: a finishing choice carries its request's meta_info; `usage` as `stream_usage` says."""
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
                     **routed(meta)}  # routing comes with the last chunk
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
                yield chunk([], usage=reply_usage(prompt_tokens, [finals[i] for i in sorted(finals)], n))
        except Exception as exc:  # noqa: BLE001 - report in-band; the stream has started
            yield stream_error_event(exc)
        finally:
            await chunks.aclose()
            state.metrics.observe_generation(route, list(finals.values()))
        yield SSE_DONE

    return DisconnectAwareStreamingResponse(events(), on_disconnect=state.metrics.observe_disconnect)


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
