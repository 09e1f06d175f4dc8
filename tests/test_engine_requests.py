"""The Engine's one request path: n fan-out and seeds on every wrapper, validation at the door, refusals
while generation cannot run, bounded queueing while paused, stream_interval, and streaming consumers that
leave early (inside asyncio.run) costing only their own request."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from engine_support import wait_idle

from hotswap import Engine
from hotswap import protocol as p
from hotswap.errors import EngineUnavailableError, HotswapError
from hotswap.sampling_params import SamplingParams
from hotswap.scheduler.output_streamer import OutputStreamer

SAMPLED = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True}
PROMPT = "Alice likes 12 apples"


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4, max_queue_wait_s=1.0)
    yield eng
    eng.shutdown()


def test_n_samples_use_seed_plus_k_on_every_path(engine):
    fanned = engine.generate(PROMPT, dict(SAMPLED, n=3, seed=5))
    singles = [engine.generate(PROMPT, dict(SAMPLED, seed=5 + k))["output_ids"] for k in range(3)]
    assert [o["output_ids"] for o in fanned] == singles
    assert len({tuple(s) for s in singles}) > 1  # the samples differ

    finals = {}
    for chunk in engine.generate(PROMPT, dict(SAMPLED, n=3, seed=5), stream=True):
        if chunk["meta_info"]["finish_reason"] is not None:
            finals[chunk["index"]] = chunk
    assert [finals[i]["output_ids"] for i in range(3)] == singles
    assert [finals[i]["text"] for i in range(3)] == [o["text"] for o in fanned]

    async def astream():
        out = {}
        async for chunk in await engine.async_generate(PROMPT, dict(SAMPLED, n=3, seed=5), stream=True):
            out.setdefault(chunk["index"], []).extend(chunk["delta_output_ids"])
        return out

    deltas = asyncio.run(astream())
    assert [deltas[i] for i in range(3)] == singles
    assert [o["output_ids"] for o in asyncio.run(engine.async_generate(PROMPT, dict(SAMPLED, n=3, seed=5)))] == singles


def test_unseeded_samples_draw_distinct_seeds(engine):
    outs = engine.generate([PROMPT, PROMPT], dict(SAMPLED, n=2))
    assert len(outs) == 4
    assert len({tuple(o["output_ids"]) for o in outs}) > 1


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"sampling_params": {"seed": 2**63}}, "seed"),
    ({"sampling_params": {"seed": 2**63 - 1, "n": 2}}, "seed"),
    ({"sampling_params": {"top_k": 2**63}}, "top_k"),
    ({"top_logprobs_num": 10**6}, "top_logprobs_num"),
    ({"top_logprobs_num": -1}, "top_logprobs_num"),
    ({"sampling_params": {"n": 257}}, "n"),
])
def test_out_of_range_values_are_refused_before_anything_runs(engine, kwargs, named):
    for stream in (False, True):
        with pytest.raises(HotswapError, match=named):
            engine.generate(PROMPT, stream=stream, **kwargs)
    assert engine.get_load().num_waiting == 0


def test_a_huge_top_k_means_the_whole_vocabulary(engine):
    params = dict(SAMPLED, seed=3)
    assert engine.generate(PROMPT, dict(params, top_k=2**62))["output_ids"] == engine.generate(PROMPT, params)["output_ids"]


def test_a_row_that_cannot_run_fails_alone_and_its_batch_mates_finish(engine, monkeypatch):
    """A value the door missed (validation switched off here: a top_p that is no number) fails its own request in
    the step; the requests sharing that step, and one already streaming beside it, finish as if alone."""
    good = [dict(SAMPLED, seed=21), dict(SAMPLED, seed=22, top_k=5), dict(SAMPLED, seed=23)]
    prompts = [PROMPT, "Bob sees 3 cats", "Carol counts"]
    alone = [engine.generate(pr, sp)["output_ids"] for pr, sp in zip(prompts, good)]
    long_params = {"max_new_tokens": 60, "temperature": 0, "ignore_eos": True}
    long_alone = engine.generate("Dan runs", long_params)["output_ids"]

    monkeypatch.setattr(SamplingParams, "validate", lambda self: None)
    stream = engine.generate("Dan runs", long_params, stream=True)
    first = next(stream)  # running: the bad row joins its decode steps
    bad = dict(SAMPLED, seed=24, top_p="high")
    outs = engine.generate([prompts[0], "Eve", prompts[1], prompts[2]], [good[0], bad, good[1], good[2]])
    streamed = first["delta_output_ids"] + [t for chunk in stream for t in chunk["delta_output_ids"]]

    assert [o["meta_info"]["finish_reason"]["type"] for o in (outs[0], outs[2], outs[3])] == ["length"] * 3
    assert [o["output_ids"] for o in (outs[0], outs[2], outs[3])] == alone
    assert streamed == long_alone
    reason = outs[1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "sampling parameters cannot run" in reason["message"] and "high" in reason["message"], reason
    wait_idle(engine)
    assert engine.check_invariants().success and engine.scheduler.dead is None


def test_a_fault_handling_one_requests_tokens_fails_that_request_only(engine, monkeypatch):
    """Stop checks and detokenization run per request on the scheduler thread: an exception there ends
    that request with the reason, not the scheduler loop (which would fail every request from then on)."""
    params = [dict(SAMPLED, seed=31), dict(SAMPLED, seed=666), dict(SAMPLED, seed=33)]
    alone = [engine.generate(PROMPT, sp)["output_ids"] for sp in (params[0], params[2])]
    real = OutputStreamer.append_token

    def faulty(self, seq, token, logprob, top, version):
        real(self, seq, token, logprob, top, version)
        if seq.req.seed == 666 and len(seq.output_ids) == 3:
            raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "a tokenizer fault")

    monkeypatch.setattr(OutputStreamer, "append_token", faulty)
    outs = engine.generate([PROMPT] * 3, params)
    assert [outs[0]["output_ids"], outs[2]["output_ids"]] == alone
    reason = outs[1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "UnicodeDecodeError" in reason["message"] and outs[1]["meta_info"]["completion_tokens"] == 3
    chunks = list(engine.generate(PROMPT, params[1], stream=True))
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    monkeypatch.undo()
    wait_idle(engine)
    assert engine.scheduler.dead is None and engine.check_invariants().success
    assert engine.generate(PROMPT, params[0])["output_ids"] == alone[0]


def test_stream_consumer_leaving_early_inside_asyncio_run_costs_only_its_request(engine):
    async def read_one():
        stream = await engine.async_generate(PROMPT, {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}, stream=True)
        async for _ in stream:
            break  # the loop closes with the generator unfinished

    for _ in range(5):
        asyncio.run(read_one())
    wait_idle(engine)
    assert engine.scheduler.dead is None and engine.scheduler.thread.is_alive()
    assert engine.generate(PROMPT, {"max_new_tokens": 4, "temperature": 0})["meta_info"]["completion_tokens"] == 4


def test_generate_refused_at_once_while_memory_is_released(engine):
    assert engine.release_memory_occupation().success
    try:
        start = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="memory is released"):
            engine.generate(PROMPT, {"max_new_tokens": 4})
        with pytest.raises(EngineUnavailableError, match="memory is released"):
            list(engine.generate(PROMPT, {"max_new_tokens": 4}, stream=True))
        assert time.monotonic() - start < 5
    finally:
        assert engine.resume_memory_occupation().success
    assert engine.generate(PROMPT, {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_generate_queues_while_paused_within_a_bound(engine):
    assert engine.pause_generation(mode="in_place").success
    try:
        start = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="max_queue_wait_s"):
            engine.generate(PROMPT, {"max_new_tokens": 4})
        assert 0.9 < time.monotonic() - start < 5
        # queued requests run once generation continues (SGLang's pause semantics)
        result = {}
        worker = threading.Thread(target=lambda: result.update(engine.generate(PROMPT, {"max_new_tokens": 3})))
        worker.start()
        time.sleep(0.3)
        assert engine.get_load().num_waiting == 1
    finally:
        assert engine.continue_generation().success
    worker.join(10)
    assert result["meta_info"]["completion_tokens"] == 3


def test_generate_inside_an_open_update_session_waits_within_a_bound(engine):
    """A session holds generation (its weights are half-pushed) but never longer than max_queue_wait_s for a
    request: the refusal says why, and nothing ran on the half-pushed weights."""
    before = engine.check_weights("checksum").digest
    assert engine.begin_weight_update().success
    try:
        start = time.monotonic()
        with pytest.raises(EngineUnavailableError, match="weight-update session is open.*max_queue_wait_s"):
            engine.generate(PROMPT, {"max_new_tokens": 4})
        with pytest.raises(EngineUnavailableError, match="weight-update session is open"):
            list(engine.generate(PROMPT, {"max_new_tokens": 4}, stream=True))
        assert 1.8 < time.monotonic() - start < 8
    finally:
        assert engine.end_weight_update(abort=True).success
    assert engine.check_weights("checksum").digest == before
    assert engine.generate(PROMPT, {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2


def test_a_request_queued_past_its_bound_while_paused_says_paused(engine):
    """A pause holds a weight-update session too; the refusal names the pause, not a session nobody opened."""
    assert engine.pause_generation().success
    try:
        with pytest.raises(EngineUnavailableError, match="generation is paused.*max_queue_wait_s"):
            engine.generate(PROMPT, {"max_new_tokens": 4})
    finally:
        assert engine.continue_generation().success


def test_stream_interval_batches_tokens_per_output(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, stream_interval=4) as eng:
        chunks = list(eng.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}, stream=True))
        reference = eng.generate(PROMPT, {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True})
    sizes = [len(c["delta_output_ids"]) for c in chunks]
    # SGLang's rule: the first token at once, then every 4 (output lengths 1, 5, 9, then the last)
    assert sum(sizes) == 10 and all(s >= 4 for s in sizes[1:-1]) and len(sizes) <= 4
    assert chunks[-1]["text"] == reference["text"] and "".join(c["delta_text"] for c in chunks) == reference["text"]
    with pytest.raises(HotswapError, match="stream_interval"):
        Engine(str(tiny_qwen3), device="cpu", stream_interval=0)


def test_incremental_streaming_output_chunks_carry_only_their_tokens(tiny_qwen3):
    """SGLang's incremental_streaming_output: each chunk's text, output_ids and output logprobs are its new
    tokens only, and together they are the whole output; off (the default), each chunk repeats everything so
    far. A call may ask for either shape whatever the engine's default (the OpenAI routes read cumulative ones)."""
    sp = {"max_new_tokens": 9, "temperature": 0.9, "seed": 3, "ignore_eos": True}
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, incremental_streaming_output=True) as eng:
        ref = eng.generate(PROMPT, sp, return_logprob=True, top_logprobs_num=2)
        chunks = list(eng.generate(PROMPT, sp, stream=True, return_logprob=True, top_logprobs_num=2))
        cumulative = list(eng.generate(PROMPT, sp, stream=True, return_logprob=True, top_logprobs_num=2,
                                       incremental_streaming_output=False))
    assert len(chunks) > 1
    assert sum((c["output_ids"] for c in chunks), []) == ref["output_ids"]
    assert "".join(c["text"] for c in chunks) == ref["text"]
    for key in ("output_token_logprobs", "output_top_logprobs"):
        assert sum((c["meta_info"][key] for c in chunks), []) == ref["meta_info"][key]
    assert all(len(c["meta_info"]["output_token_logprobs"]) == len(c["output_ids"]) for c in chunks)
    assert chunks[-1]["meta_info"]["completion_tokens"] == 9  # the count stays the request's total
    last = cumulative[-1]
    assert (last["text"], last["output_ids"], last["meta_info"]["output_token_logprobs"]) == (
        ref["text"], ref["output_ids"], ref["meta_info"]["output_token_logprobs"])
    assert [len(c["output_ids"]) for c in cumulative] == sorted(len(c["output_ids"]) for c in cumulative)


def test_requests_the_loop_never_answered_fail_when_the_engine_shuts_down(tiny_qwen3):
    """A control request queued or deferred behind running requests (a weight update waiting for them to
    drain) when the engine shuts down is answered with a failure, never left waiting on a stopped loop."""
    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4)
    eng.scheduler.stop()  # the loop is gone: nothing dispatches what is queued
    out = eng.scheduler.submit(p.FlushCacheRequest()).result(timeout=5)
    assert not out.success and "shut down" in out.message
    eng.shutdown()


def test_generate_requests_arriving_mid_run_keep_the_step_in_flight_and_control_requests_drain_it(tiny_qwen3, monkeypatch):
    """New requests arrive all the time in RL (n samples, async rollouts): taking one does not need the step in flight
    read back first, as a control request (an abort, a weight update, a load query) does. Each keeps its tokens."""
    from hotswap.scheduler import scheduler as scheduler_module

    drains: list[bool] = []
    real = scheduler_module.must_drain_before

    def counted(inflight, *, control_waiting: bool, update_ready: bool) -> bool:
        drain = real(inflight, control_waiting=control_waiting, update_ready=update_ready)
        if drain:
            drains.append(control_waiting)
        return drain

    monkeypatch.setattr(scheduler_module, "must_drain_before", counted)
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        short = {"max_new_tokens": 4, "temperature": 0.0, "ignore_eos": True}
        alone = eng.generate(PROMPT, short)["output_ids"]
        running = threading.Event()
        long_out: dict = {}

        def long_request():
            for chunk in eng.generate(PROMPT, {"max_new_tokens": 480, "temperature": 0.0, "ignore_eos": True}, stream=True):
                running.set()
                long_out.update(chunk)

        worker = threading.Thread(target=long_request, daemon=True)
        worker.start()
        assert running.wait(30)
        drains.clear()
        arrived = [eng.generate(PROMPT, short)["output_ids"] for _ in range(8)]  # each submitted while the long one runs
        assert arrived == [alone] * 8
        assert worker.is_alive() and drains == []  # no step was read back early for them
        assert eng.get_load().num_running >= 1  # a control request: the loop reads the step back first
        assert drains and all(drains)
        worker.join(60)
        assert len(long_out["output_ids"]) == 480


def test_a_control_request_met_behind_generate_ones_mid_step_waits_for_the_step_to_be_read_back(tiny_qwen3, monkeypatch):
    """The race the inbox's order makes: a control request queued after the loop chose not to drain, behind a generate
    request. It is held until the step in flight is read back (the next loop turn drains for it), then answered."""
    from hotswap.scheduler import scheduler as scheduler_module

    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        sched = eng.scheduler
        real = scheduler_module.must_drain_before
        armed, raced, seen = threading.Event(), [], []

        def racing(inflight, *, control_waiting: bool, update_ready: bool) -> bool:
            if raced:  # the turns after the race: was a drain asked for the held request alone?
                seen.append((control_waiting, sched._controls_queued, sched._held is not None))
            if armed.is_set() and inflight is not None and not control_waiting and sched._controls_queued == 0 and not sched.inbox.empty():
                armed.clear()
                raced.append(sched.submit(p.GetLoadRequest()))  # behind the generate request, after this turn's decision
            return real(inflight, control_waiting=control_waiting, update_ready=update_ready)

        monkeypatch.setattr(scheduler_module, "must_drain_before", racing)
        running = threading.Event()

        def long_request():
            for _ in eng.generate(PROMPT, {"max_new_tokens": 480, "temperature": 0.0, "ignore_eos": True}, stream=True):
                running.set()

        worker = threading.Thread(target=long_request, daemon=True)
        worker.start()
        assert running.wait(30)
        armed.set()
        assert eng.generate(PROMPT, {"max_new_tokens": 4, "temperature": 0.0})["meta_info"]["completion_tokens"] == 4
        assert raced and raced[0].result(timeout=10).success
        assert (True, 0, True) in seen  # the loop drained for the held request (nothing else was queued)
        worker.join(60)
