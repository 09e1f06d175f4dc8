"""Consumer-side assembly of one request's outputs into SGLang's output dict. Streaming requests without
stop strings are detokenized here, on the consumer's thread, instead of on the scheduler thread."""

from __future__ import annotations

import base64
import time
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np

from hotswap import protocol as p
from hotswap.errors import EngineUnavailableError, HotswapError
from hotswap.scheduler.detokenizer import IncrementalDetokenizer, text_ids


def encode_top_p_token_ids(rows: list[list[int]]) -> tuple[str, str]:
    """slime's encoding of per-token kept ids: every row's ids back to back, and len(rows) + 1 offsets,
    each as little-endian int32, base64."""
    flat = np.fromiter((t for row in rows for t in row), dtype="<i4")
    offsets = np.zeros(len(rows) + 1, dtype="<i4")
    np.cumsum([len(row) for row in rows], out=offsets[1:])
    return base64.b64encode(flat.tobytes()).decode("ascii"), base64.b64encode(offsets.tobytes()).decode("ascii")


@dataclass(kw_only=True, slots=True)
class Collector:
    """Accumulates one request's pieces. `detok` is set when the scheduler sends no text until the end."""

    rid: str
    return_logprob: bool
    # top_logprobs_num > 0: SGLang's meta_info then holds output_top_logprobs (and input_top_logprobs), empty or not
    top_logprobs: bool = False
    index: int | None = None  # the request's place in a fanned-out stream (None: a stream of one)
    routed_experts_start_len: int = 0  # the first position of the returned routing, echoed beside it
    detok: IncrementalDetokenizer | None = None
    keep_stop_token: bool = False  # the request's: whether a matched stop token's text stays (the final text's ids)
    with_text: bool = True  # False under skip_tokenizer_init: SGLang's output then has no text key (output_ids and meta_info)
    text: str = ""
    output_ids: list[int] = field(default_factory=list)
    # SGLang's (logprob, token id, text) entries, built once per token as it arrives: a streamed chunk that
    # repeats them all (SGLang's cumulative shape) then copies a list instead of rebuilding every entry
    token_logprobs: list[tuple] = field(default_factory=list)
    top_entries: list[list[tuple]] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)
    mixed_versions: bool = False  # the tokens came from more than one weight version
    top_p_token_ids: list[list[int]] = field(default_factory=list)
    input_token_logprobs: list[tuple] | None = None  # SGLang's entries, as the output ones
    input_top_logprobs: list | None = None
    last: p.GenerateOutput | None = None
    started_at: float = field(default_factory=time.monotonic)  # when the call handed the request over
    e2e_latency: float | None = None  # SGLang's meta_info["e2e_latency"]: seconds to the finished output

    @property
    def finished(self) -> bool:
        return self.last is not None and self.last.finished

    def add(self, outs: list[p.GenerateOutput]) -> dict:
        """Take one or more consecutive outputs; returns the coalesced delta (text, ids, versions). Several
        outputs (steps the consumer had not read yet) are detokenized together, once."""
        start, old_text = len(self.output_ids), self.text
        for out in outs:
            ids = out.new_token_ids
            self.output_ids += ids
            if self.return_logprob:
                self.token_logprobs += zip(out.new_logprobs, ids, repeat(None))
                if out.new_top_logprobs:
                    self.top_entries += [[(lp, tid, None) for lp, tid in top] for top in out.new_top_logprobs]
            versions = out.new_token_versions
            if versions and not self.mixed_versions:
                first = self.versions[0] if self.versions else versions[0]
                self.mixed_versions = versions.count(first) != len(versions)
            self.versions += versions
            if out.new_top_p_token_ids:
                self.top_p_token_ids += out.new_top_p_token_ids
            if out.input_token_logprobs is not None:
                self.input_token_logprobs = [(lp, tid, None) for lp, tid in out.input_token_logprobs]
                self.input_top_logprobs = None if out.input_top_logprobs is None else [
                    None if top is None else [(lp, tid, None) for lp, tid in top] for top in out.input_top_logprobs]
            if self.detok is None:
                self.text += out.text_delta
        last = outs[-1]
        if self.detok is not None:
            if last.finished:  # the scheduler's full final text is the answer, unless it no longer extends the text
                final = last.text_delta  # streamed (IncrementalDetokenizer.rest)
                ids = text_ids(self.output_ids, last.finish_reason, self.keep_stop_token)
                self.text = final if final.startswith(self.text) else self.text + self.detok.rest(ids)
            else:
                self.text += self.detok.step(self.output_ids)
        self.last = last
        if last.finished and self.e2e_latency is None:
            self.e2e_latency = time.monotonic() - self.started_at
        delta_text = self.text[len(old_text) :] if self.text.startswith(old_text) else self.text
        return {"delta_text": delta_text, "delta_output_ids": self.output_ids[start:], "delta_weight_versions": self.versions[start:]}

    def refusal(self) -> HotswapError | None:
        """The engine refused to run this request: 503, generation cannot run now (memory released, held past the
        queue bound); 400, the request itself (its rid runs already on another front end of the server: engine/service.py)."""
        reason = self.last.finish_reason if self.last is not None else None
        if not reason or reason.get("type") != "abort" or self.output_ids:
            return None
        if reason.get("status_code") == 503:
            return EngineUnavailableError(reason.get("message", "generation is unavailable"))
        if reason.get("status_code") == 400:
            return HotswapError(reason.get("message", "the request was refused"))
        return None

    def to_dict(self, delta: dict | None = None, since: int | None = None) -> dict:
        """SGLang's output dict. `delta`: a streamed chunk's coalesced delta (from `add`), merged in. `since`:
        SGLang's incremental streaming output: text, output ids and the per-output-token lists hold only the
        tokens from this position on (the delta), not everything so far."""
        out = self.last
        start = since or 0
        meta = {
            "id": self.rid,
            "prompt_tokens": out.prompt_tokens,
            "completion_tokens": len(self.output_ids),
            "cached_tokens": out.cached_tokens,
            "finish_reason": out.finish_reason,
            "weight_version": out.weight_version,
        }
        if self.e2e_latency is not None:  # finished outputs only, as SGLang's tokenizer manager sets it
            meta["e2e_latency"] = self.e2e_latency
        if self.mixed_versions:
            meta["weight_versions"] = self.versions[start:]
        if out.routed_experts is not None:
            meta["routed_experts"] = base64.b64encode(out.routed_experts).decode("ascii")  # SGLang's wire form
            # slime reads it to splice a partial routing onto the rows it holds (0 when absent)
            meta["routed_experts_start_len"] = self.routed_experts_start_len
        if self.return_logprob:
            meta["output_token_logprobs"] = self.token_logprobs[start:]
            if self.top_logprobs:
                meta["output_top_logprobs"] = self.top_entries[start:]
            # SGLang's add_logprob_to_meta_info always sets it (empty where no prompt position was asked for)
            meta["input_token_logprobs"] = list(self.input_token_logprobs or ())
            if self.input_top_logprobs is not None:
                meta["input_top_logprobs"] = list(self.input_top_logprobs)
        if self.top_p_token_ids and out.finished:  # slime's replay fields: int32 ids and offsets, base64
            meta["top_p_token_ids"], meta["top_p_token_offsets"] = encode_top_p_token_ids(self.top_p_token_ids)
        result: dict = {}
        if self.with_text:  # under skip_tokenizer_init SGLang's output has no text keys
            result["text"] = self.text if since is None or delta is None else delta["delta_text"]
        result |= {"output_ids": self.output_ids[start:], "meta_info": meta}
        if delta is not None:
            result |= delta if self.with_text else {k: v for k, v in delta.items() if k != "delta_text"}
        if self.index is not None:
            result["index"] = self.index
        return result
