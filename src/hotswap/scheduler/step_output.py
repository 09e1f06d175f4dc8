"""A read-back step's rows handed to their sequences: each sampled token appended (with its logprobs, top
logprobs and kept top-p set) and streamed, each chunk's prompt logprobs taken, and the sequences it finished."""

from __future__ import annotations

import logging

from hotswap.scheduler.output_streamer import OutputStreamer
from hotswap.scheduler.overlap import InFlight
from hotswap.scheduler.sequence import Sequence, Status

log = logging.getLogger(__name__)


def hand_out(step: InFlight, tokens: tuple, streamer: OutputStreamer) -> tuple[list[Sequence], int]:
    """Give each of `step`'s rows its output; `tokens`: the step's SampleResult.to_lists() (ids, logprobs, top
    values, top ids), read back. Returns the sequences that finished (their reasons set) and the tokens generated.
    A row whose output handling fails ends its request alone (abort, internal error); the others go on."""
    result, version = step.result, step.version
    ids, lps, top_values, top_ids = tokens
    tops = list(zip(top_values, top_ids)) if top_values is not None else None
    keeps = result.keep_sets() if result.keep_rows else None
    prompt = result.prompt_lists()
    done = []
    k = -1
    at = 0  # the next scored prompt row
    generated = 0
    append_token, emit = streamer.append_token, streamer.emit  # looked up once, not per row
    if lps is None:
        lps = [0.0] * len(ids)
    for seq, entry in zip(step.seqs, step.entries):
        if entry.prompt_targets:
            m = len(entry.prompt_targets)
            if seq.status is not Status.FINISHED:
                take_prompt_logprobs(seq, entry, prompt, at)
            at += m
        if not entry.sample:
            if prompt_scored(seq, entry):  # max_new_tokens 0 (SGLang's prompt scoring): done once prefilled
                seq.finish_reason = {"type": "length", "length": 0}
                done.append(seq)
            continue
        k += 1
        seq.pending -= 1
        if seq.status is Status.FINISHED:  # aborted, or it stopped while this step ran: drop the token
            continue
        top = []
        if tops is not None and seq.req.sampling_params.top_logprobs_num:
            vals, tids = tops[k]
            top = list(zip(vals, tids))[: seq.req.sampling_params.top_logprobs_num]
        try:
            if keeps is not None and keeps[k] is not None:
                seq.top_p_token_ids.append(keeps[k])
            append_token(seq, ids[k], lps[k], top, version)
            if seq.finish_reason is None and seq.req.stream:
                emit(seq, version)
        except Exception as exc:  # one request's output handling failed: it fails alone, the loop goes on
            log.exception("handling a token of %s failed", seq.rid)
            seq.finish_reason = {"type": "abort", "message": f"internal error: {type(exc).__name__}: {exc}"}
        generated += 1
        if seq.finish_reason is not None:
            done.append(seq)
    return done, generated


def take_prompt_logprobs(seq: Sequence, entry, prompt: tuple[list, list | None, list | None], at: int) -> None:
    """Append a chunk's prompt logprobs to its sequence; values a recomputation (after a preemption) scores
    again are dropped, so each prompt position has exactly one."""
    values, top_values, top_ids = prompt
    m = len(entry.prompt_targets)
    first = entry.start_pos + entry.prompt_from - seq.prompt_logprob_start  # index of this chunk's first value
    skip = len(seq.input_logprobs) - first
    if skip < 0 or skip >= m:
        return
    seq.input_logprobs += values[at + skip : at + m]
    n_top = seq.req.sampling_params.top_logprobs_num
    if n_top:
        seq.input_top_logprobs += [list(zip(v[:n_top], i[:n_top])) for v, i in zip(top_values[at + skip : at + m], top_ids[at + skip : at + m])]


def prompt_scored(seq: Sequence, entry) -> bool:
    """A request that samples nothing has had the last chunk of its prompt computed (its logprobs taken)."""
    return (seq.req.sampling_params.max_new_tokens == 0 and seq.status is not Status.FINISHED
            and entry.start_pos + len(entry.input_ids) >= seq.prompt_len)
