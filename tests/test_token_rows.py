"""Streamed tokens as token rows (`GenerateRequest.sink_token`, the front end process's pipe): an output that is one
plain new token leaves the scheduler thread as a tuple instead of a GenerateOutput, and the front end rebuilds
exactly the GenerateOutput the full path sends. Everything else (the first output with the prompt's logprobs, top
logprobs, stop strings, keep-sets, several tokens at once, the finished output) keeps the full path."""

from __future__ import annotations

import dataclasses

import pytest

from hotswap import protocol as p
from hotswap.engine.service import output_rows, outputs_from_rows
from hotswap.sampling_params import SamplingParams
from hotswap.scheduler.output_streamer import OutputStreamer
from hotswap.scheduler.sequence import Sequence


class NoDecodeTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(97 + i % 26) for i in ids)


def stream(sp: SamplingParams, rows: bool, *, stream_text: bool = False, interval: int = 1, steps: int = 6) -> tuple[list, int]:
    """Every output one streamed request gets over `steps` tokens (token rows rebuilt as the front end does), and
    how many came as token rows."""
    outs: list = []
    tokens: list[tuple] = []
    req = p.GenerateRequest(rid="r", input_ids=[1, 2, 3], sampling_params=sp, seed=0, sink=outs.append, flush=lambda: None,
                            stream=True, stream_text=stream_text, sink_token=tokens.append if rows else None)
    seq = Sequence(req=req, cached_tokens=1)
    seq.input_logprobs = [-0.5, -0.25]
    streamer = OutputStreamer(tokenizer=NoDecodeTokenizer(), eos_token_ids=frozenset({-1}), max_context_len=1 << 20,
                              stream_interval=interval)
    used = 0
    for step in range(steps):
        if sp.return_top_p_token_ids:
            seq.top_p_token_ids.append([4 + step, 9])
        top = [(-0.1, 4 + step)] if sp.top_logprobs_num else []
        streamer.append_token(seq, 4 + step, -0.1 * step, top, f"v{step // 3}")
        if seq.finish_reason is None:
            streamer.emit(seq, f"v{step // 3}")
        else:
            streamer.emit_finished([seq], f"v{step // 3}")
        streamer.flush()
        used += len(tokens)
        outs += outputs_from_rows([], tokens)
        tokens.clear()
    return outs, used


CASES = [
    (SamplingParams(temperature=1.0, max_new_tokens=6, return_logprob=True), {}, 4),  # the first (prompt logprobs) and the last go full
    (SamplingParams(temperature=1.0, max_new_tokens=6), {}, 5),  # no logprobs: only the finished output goes full
    (SamplingParams(temperature=0.0, max_new_tokens=6, return_logprob=True, top_logprobs_num=1), {}, 0),
    (SamplingParams(temperature=1.0, max_new_tokens=6, return_top_p_token_ids=True, top_p=0.9), {}, 0),
    (SamplingParams(temperature=1.0, max_new_tokens=6, return_logprob=True, stop=["zz"]), {"stream_text": True}, 0),
    (SamplingParams(temperature=1.0, max_new_tokens=6, return_logprob=True), {"interval": 2}, 0),  # two tokens an output
]


@pytest.mark.parametrize("sp,kw,rows_expected", CASES)
def test_token_rows_rebuild_exactly_the_outputs_of_the_full_path(sp, kw, rows_expected):
    full, none_used = stream(sp, rows=False, **kw)
    rebuilt, used = stream(sp, rows=True, **kw)
    assert none_used == 0 and used == rows_expected
    assert rebuilt == full  # every field of every output, in order: tokens, logprobs, versions, sizes, finish
    assert full[-1].finished and sum(len(o.new_token_ids) for o in full) == 6


def test_a_step_message_delivers_token_rows_before_the_outputs_beside_them():
    """A request's token row and its finished output (an abort taken while the step ran) can share a step's message:
    the token must reach the request first, or its route is gone when the token comes."""
    token = ("r", 5, -0.5, "v1", 3, 0)
    finished = dataclasses.replace(p.output_of_token_row(("r", 0, None, "v1", 3, 0)), new_token_ids=[], new_token_versions=[],
                                   finished=True, finish_reason={"type": "abort", "message": "aborted"})
    outs = outputs_from_rows(output_rows([finished]), [token])
    assert [o.finished for o in outs] == [False, True] and outs[0].new_token_ids == [5]
