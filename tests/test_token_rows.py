"""Streamed tokens as token rows (`GenerateRequest.sink_token`, the front end process's pipe): an output that is one
plain new token leaves the scheduler thread as a tuple instead of a GenerateOutput, and the front end rebuilds
exactly the GenerateOutput the full path sends. Everything else (the first output with the prompt's logprobs, top
logprobs, stop strings, keep-sets, several tokens at once, the finished output) keeps the full path."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp

import pytest
from engine_support import make_engine

from hotswap import protocol as p
from hotswap.engine.remote import RemoteEngine
from hotswap.engine.service import EngineService, output_rows, outputs_from_rows
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


@pytest.fixture
def linked(tiny_qwen3):
    engine = make_engine(tiny_qwen3)
    ours, theirs = mp.Pipe(duplex=True)
    service = EngineService(engine, ours).start()
    remote = RemoteEngine(theirs, service.info)
    try:
        yield engine, remote
    finally:
        remote.shutdown()
        service.close()
        engine.shutdown()


def test_sampled_streaming_with_logprobs_through_the_pipe_equals_the_engine_in_process(linked, monkeypatch):
    """The RL shape (temperature 1, a seed, logprobs, n streams): the chunks through the front end's pipe carry the
    tokens, logprobs and meta the engine gives in process, and most tokens crossed as token rows."""
    engine, remote = linked
    crossed = []
    rebuild = p.output_of_token_row
    monkeypatch.setattr(p, "output_of_token_row", lambda row: crossed.append(row) or rebuild(row))
    params = {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True, "seed": 11}

    def chunks(api) -> dict[int, list[dict]]:
        api.flush_cache()
        got: dict[int, list[dict]] = {}
        for c in api.generate(["Alice likes", "Bob"], params, stream=True, return_logprob=True, incremental_streaming_output=True):
            got.setdefault(c["index"], []).append(c)
        return got

    local, there = chunks(engine), chunks(remote)
    assert local.keys() == there.keys() == {0, 1}
    for k in local:
        ids = [sum((c["output_ids"] for c in chunks_), []) for chunks_ in (local[k], there[k])]
        lps = [sum((c["meta_info"]["output_token_logprobs"] for c in chunks_), []) for chunks_ in (local[k], there[k])]
        assert ids[0] == ids[1] and len(ids[0]) == 12
        assert lps[0] == lps[1]
        last = [chunks_[-1]["meta_info"] for chunks_ in (local[k], there[k])]
        assert [m["prompt_tokens"] for m in last] == [last[0]["prompt_tokens"]] * 2
        assert [m["finish_reason"] for m in last] == [last[0]["finish_reason"]] * 2
    assert len(crossed) >= 2 * 12 - 2 * 2  # all but each request's first (prompt logprobs) and last output
