"""A request's state inside the scheduler."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from hotswap.protocol import GenerateRequest
from hotswap.runner.row_params import SamplerRow
from hotswap.scheduler.detokenizer import IncrementalDetokenizer


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False, slots=True)
class Sequence:
    req: GenerateRequest
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    token_versions: list[str] = field(default_factory=list)
    # prompt logprobs (SGLang's input_token_logprobs): values for prompt positions logprob_start_len + 1 ..
    input_logprobs: list[float] = field(default_factory=list)
    input_top_logprobs: list[list[tuple[float, int]]] = field(default_factory=list)
    top_p_token_ids: list[list[int]] = field(default_factory=list)  # per output token: the ids the filters kept
    # penalties read these every step, as int64 arrays: the prompt's distinct ids (vLLM's repetition_penalty), made
    # once; the output ids, converted as they come (`counted_output`), so a step converts no earlier token
    prompt_token_set: np.ndarray | None = None
    counted_ids: np.ndarray | None = None  # output_ids[:counted_len] as int64, with room to grow
    counted_len: int = 0
    banned_ids: list[int] | None = None  # the ids min_new_tokens masks (stop ids, eos unless ignored), made once
    sampler_row: SamplerRow | None = None  # its sampling parameters as a runner row, made once (`row`)
    page_keys: list[int] | None = None  # one key per full page of the prompt, made once (`prompt_page_keys`)
    pages: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading tokens whose KV is in `pages` (or is being computed by the step in flight)
    pending: int = 0  # sampled tokens in flight: launched, not yet read back (0 or 1); see scheduler/overlap.py
    pending_row: int = -1  # which sampled row of the in-flight step holds that token
    cached_tokens: int = 0  # prefix-cache hit at first admission (reported in meta_info)
    admitted: bool = False  # has been running once: a weight update waits for it even while it is preempted
    cache_epoch: int = 0  # the batcher's cache epoch when its pages were taken: KV of older weights is never cached
    status: Status = Status.WAITING
    finish_reason: dict | None = None
    routed_experts: bytes | None = None  # int32 bytes read from the KV-side table when the sequence finishes (it asked)
    # incremental detokenization (only when the request streams text or has stop strings)
    text: str = ""
    detokenizer: IncrementalDetokenizer | None = None
    # the stop strings that hold a special token's text (found once): with skip_special_tokens they are matched
    # against the tokens' raw text, as SGLang matches every stop string (None: not looked for yet)
    special_stops: list[str] | None = None
    sent_tokens: int = 0
    sent_text: int = 0
    sent_input_logprobs: bool = False

    @property
    def rid(self) -> str:
        return self.req.rid

    @property
    def prompt_len(self) -> int:
        return len(self.req.input_ids)

    @property
    def token_ids(self) -> list[int]:
        return self.req.input_ids + self.output_ids

    def tokens_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list (the decode step needs only the last)."""
        plen = len(self.req.input_ids)
        if start >= plen:
            return self.output_ids[start - plen : end - plen]
        if end <= plen:
            return self.req.input_ids[start:end]
        return self.req.input_ids[start:] + self.output_ids[: end - plen]

    def prompt_page_keys(self, page_size: int) -> list[int]:
        """A key per full page of the prompt, each naming that page's tokens and every token before it (a chain
        of hashes), so two prompts share the first k keys exactly when they share the first k pages. The batcher
        finds with them a prompt page another sequence is computing now; the prefix cache itself compares ids."""
        if self.page_keys is None:
            ids, key, keys = self.req.input_ids, 0, []
            for start in range(0, len(ids) - page_size + 1, page_size):
                key = hash((key, *ids[start : start + page_size]))
                keys.append(key)
            self.page_keys = keys
        return self.page_keys

    def distinct_prompt_ids(self) -> np.ndarray:
        if self.prompt_token_set is None:
            self.prompt_token_set = np.array(sorted(set(self.req.input_ids)), dtype=np.int64)
        return self.prompt_token_set

    def counted_output(self) -> np.ndarray:
        """output_ids as int64: a view that later tokens never change (they are written past its end, or
        into a grown copy); only tokens new since the last call are converted."""
        n, have = len(self.output_ids), self.counted_len
        if self.counted_ids is None or len(self.counted_ids) < n:
            grown = np.empty(max(16, n, 2 * have), dtype=np.int64)
            if have:
                grown[:have] = self.counted_ids[:have]
            self.counted_ids = grown
        if n > have:
            self.counted_ids[have:n] = self.output_ids[have:n]
            self.counted_len = n
        return self.counted_ids[:n]

    def row(self) -> SamplerRow:
        if self.sampler_row is None:
            self.sampler_row = SamplerRow.of(self.req.sampling_params, self.req.seed)
        return self.sampler_row

    @property
    def prompt_logprob_start(self) -> int:
        """The first prompt position whose logits score a prompt token. SGLang (scheduler's handle_generate_request): -1
        means the last for a request that samples (its `[None, id]` entry), and past the end, none at all, for one that
        samples nothing (max_new_tokens 0: prompt scoring asked for no prompt position)."""
        sp = self.req.sampling_params
        if sp.logprob_start_len < 0 or not sp.return_logprob:
            return self.prompt_len if sp.max_new_tokens == 0 else self.prompt_len - 1
        return sp.logprob_start_len

    @property
    def prompt_logprobs_owed(self) -> int:
        """The first position whose prompt logprob is still missing (prompt_len - 1: none missing)."""
        return self.prompt_logprob_start + len(self.input_logprobs)

    @property
    def num_tokens(self) -> int:
        return len(self.req.input_ids) + len(self.output_ids)
