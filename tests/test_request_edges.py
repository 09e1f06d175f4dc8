"""A request's lifecycle at its edges, as RL rollout loops drive it (SGLang's behaviour is the contract):
prompt-only scoring (max_new_tokens 0), the context limit, finish-reason order, stop strings held by
min_new_tokens and spanning tokens, aborts at every stage (one rid, a prompt's n samples, all, mid-stream)
freeing their KV, and seeded sampling that a preemption does not change."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from engine_support import wait_idle

from hotswap import Engine
from hotswap.engine.api import fresh_rids
from hotswap.engine.request_prep import RequestPrep
from hotswap.errors import HotswapError
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT = "Alice likes 12 apples"
GREEDY = {"max_new_tokens": 16, "temperature": 0, "ignore_eos": True}
SLOW = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}  # runs until aborted


def assert_idle(engine: Engine, timeout: float = 10.0) -> None:
    """Nothing runs or waits, every KV page is back (cached prefixes aside) and the accounting holds."""
    wait_idle(engine, timeout)
    res = engine.check_invariants()
    assert res.success, res.message


def in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(out=fn(*args, **kwargs)), daemon=True)
    t.start()
    return t, box


def wait_running(engine: Engine, count: int = 1, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.get_load().num_running < count:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


def test_max_new_tokens_zero_returns_the_prompt_logprobs_and_no_tokens(engine):
    scored = engine.generate(PROMPT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    one = engine.generate(PROMPT, {"max_new_tokens": 1, "temperature": 0}, return_logprob=True, logprob_start_len=0)
    meta = scored["meta_info"]
    assert scored["output_ids"] == [] and scored["text"] == "" and meta["completion_tokens"] == 0
    assert meta["finish_reason"] == {"type": "length", "length": 0}
    ids = engine.tokenizer.encode(PROMPT)
    assert [t for _, t, _ in meta["input_token_logprobs"]] == ids
    assert meta["input_token_logprobs"][0][0] is None and all(lp is not None for lp, _, _ in meta["input_token_logprobs"][1:])
    theirs = one["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in theirs] == ids
    assert [lp for lp, _, _ in meta["input_token_logprobs"][1:]] == pytest.approx([lp for lp, _, _ in theirs[1:]], abs=1e-5)
    # again, its prefix now cached: still every position scored; and a batch of prompts, each scored alone
    again = engine.generate(PROMPT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    assert again["meta_info"]["input_token_logprobs"] == meta["input_token_logprobs"]
    batch = engine.generate([PROMPT, "Bob sees 3 birds"], {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=1)
    lps = [lp for lp, _, _ in batch[0]["meta_info"]["input_token_logprobs"][1:]]
    assert lps == pytest.approx([lp for lp, _, _ in meta["input_token_logprobs"][2:]], abs=1e-5)
    assert len(batch[1]["meta_info"]["input_token_logprobs"]) == len(engine.tokenizer.encode("Bob sees 3 birds")) - 1
    tops = engine.generate(PROMPT, {"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0, top_logprobs_num=2)["meta_info"]
    assert tops["input_top_logprobs"][0] is None and all(len(top) == 2 for top in tops["input_top_logprobs"][1:])
    assert len(tops["input_top_logprobs"]) == len(ids) and tops["output_top_logprobs"] == []  # SGLang sets it, empty
    assert engine.generate(PROMPT, {"max_new_tokens": 0})["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    assert_idle(engine)


def test_the_context_limits_max_new_tokens_as_sglang_does(engine):
    ctx = engine.max_context_len
    ids = [5] * (ctx - 12)
    with pytest.raises(HotswapError, match=f"max_new_tokens is 13: {ctx + 1} exceeds the context length {ctx}"):
        engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=13))
    with pytest.raises(HotswapError, match=f"{ctx} tokens; the context length is {ctx}"):
        engine.generate(input_ids=[5] * ctx, sampling_params=GREEDY)
    # None: until the context is full; omitted: SGLang's default of 128, cut short by the context
    until = engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=None))
    assert len(until["output_ids"]) == 12 and until["meta_info"]["finish_reason"] == {"type": "length", "length": 12}
    assert len(engine.generate(PROMPT, {"temperature": 0, "ignore_eos": True})["output_ids"]) == 128
    cut = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "ignore_eos": True})
    assert len(cut["output_ids"]) == 12
    # SGLang's allow_auto_truncate: cut to fit (the context ends the generation) instead of refused
    prep = RequestPrep(encode=engine.encode, vocab_size=engine.model_config.vocab_size, max_context_len=ctx, seed=0,
                       allow_auto_truncate=True)
    assert prep.prepare(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=13)).requests[0].sampling_params.max_new_tokens == 13
    for bad in ([], ""):
        with pytest.raises(HotswapError, match="prompt 0 is empty"):
            engine.generate(bad, GREEDY) if isinstance(bad, str) else engine.generate(input_ids=bad, sampling_params=GREEDY)
    # text and input_ids both given: SGLang runs the input_ids (the text is not tokenized); their shapes must agree
    ids = engine.tokenizer.encode("Bob sees")
    assert engine.generate(PROMPT, GREEDY, input_ids=ids)["output_ids"] == engine.generate("Bob sees", GREEDY)["output_ids"]
    with pytest.raises(HotswapError, match="prompt and input_ids disagree"):
        engine.generate([PROMPT, PROMPT], GREEDY, input_ids=ids)
    with pytest.raises(HotswapError, match="give a prompt or input_ids"):
        engine.generate(None, GREEDY)
    assert_idle(engine)


def test_the_length_limit_is_checked_before_a_stop_token(engine):
    ref = engine.generate(PROMPT, GREEDY)["output_ids"]
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i])  # a token first sampled at step k
    if set(ref[: k + 2]) & set(engine.eos_token_ids):
        pytest.skip("the greedy output holds an eos before the chosen stop token")
    stops = dict(GREEDY, ignore_eos=False, stop_token_ids=[ref[k]])
    at_limit = engine.generate(PROMPT, dict(stops, max_new_tokens=k + 1))
    assert at_limit["output_ids"] == ref[: k + 1]
    assert at_limit["meta_info"]["finish_reason"] == {"type": "length", "length": k + 1}  # SGLang: length wins
    before = engine.generate(PROMPT, dict(stops, max_new_tokens=k + 2))
    assert before["output_ids"] == ref[: k + 1] and before["meta_info"]["finish_reason"] == {"type": "stop", "matched": ref[k]}
    # SGLang's ignore_eos turns off every token-based stop: stop_token_ids do not end the request either
    ignored = engine.generate(PROMPT, dict(stops, ignore_eos=True, max_new_tokens=k + 2))
    assert ignored["output_ids"] == ref[: k + 2] and ignored["meta_info"]["finish_reason"] == {"type": "length", "length": k + 2}


def test_a_matched_stop_tokens_text_is_left_out_of_the_text(engine):
    """SGLang's trim_matched_stop (detokenizer_manager.py) and vLLM's detokenizer: the stop token that ended a
    request stays in output_ids and leaves its text out, unless no_stop_trim; streamed deltas add up the same.
    A client with skip_special_tokens false got '<|im_end|>' at the end of every answer."""
    ref = engine.generate(PROMPT, GREEDY)["output_ids"]
    k = next(i for i in range(2, len(ref)) if ref[i] not in ref[:i] and engine.tokenizer.decode([ref[i]]).strip())
    if set(ref[: k + 1]) & set(engine.eos_token_ids):
        pytest.skip("the greedy output holds an eos before the chosen stop token")
    stops = dict(GREEDY, ignore_eos=False, stop_token_ids=[ref[k]], skip_special_tokens=False)
    out = engine.generate(PROMPT, stops)
    assert out["output_ids"] == ref[: k + 1] and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": ref[k]}
    assert out["text"] == engine.tokenizer.decode(ref[:k], skip_special_tokens=False)
    kept = engine.generate(PROMPT, dict(stops, no_stop_trim=True))
    assert kept["text"] == engine.tokenizer.decode(ref[: k + 1], skip_special_tokens=False)
    for keep, want in ((False, out["text"]), (True, kept["text"])):
        streamed = list(engine.generate(PROMPT, dict(stops, no_stop_trim=keep), stream=True))
        assert "".join(c["delta_text"] for c in streamed) == want and streamed[-1]["output_ids"] == ref[: k + 1]
    # eos with its special-token text kept: the same rule
    eos = engine.eos_token_ids[0]
    ids = engine.tokenizer.encode(PROMPT)
    raw = engine.generate(input_ids=ids, sampling_params=dict(GREEDY, ignore_eos=False, logit_bias={eos: 100}, skip_special_tokens=False))
    assert raw["output_ids"] == [eos] and raw["text"] == ""


def spanning_stop(engine: Engine, ids: list[int], start: int) -> tuple[str, int]:
    """A two-character stop string made of the last character of token i's text and the first of token i+1's
    (so it spans a token boundary), from token `start` on, whose first match in the text is that boundary."""
    text = engine.tokenizer.decode(ids)
    for i in range(start, len(ids) - 1):
        a, b = (engine.tokenizer.decode(ids[: j + 1]) for j in (i, i + 1))
        head = engine.tokenizer.decode(ids[:i])
        if len(a) == len(head) or len(b) == len(a) or "\ufffd" in b[len(head):]:
            continue
        stop = a[-1] + b[len(a)]
        if text.find(stop) == len(a) - 1:
            return stop, i + 1
    pytest.skip("no stop string spans a token boundary in this output")


def test_stop_strings_span_tokens_and_wait_for_min_new_tokens_only_under_vllms_rule(engine):
    ref = engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40))
    text, ids = ref["text"], ref["output_ids"]
    stop, last = spanning_stop(engine, ids, 1)
    pos = text.find(stop)
    out = engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40, stop=[stop]))
    assert out["text"] == text[:pos] and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == ids[: last + 1]
    kept = engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40, stop=[stop], no_stop_trim=True))
    assert kept["text"] == text[: pos + len(stop)]
    for keep, want in ((False, out["text"]), (True, kept["text"])):
        streamed = list(engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40, stop=[stop], no_stop_trim=keep), stream=True))
        assert "".join(c["delta_text"] for c in streamed) == want and streamed[-1]["output_ids"] == out["output_ids"]
    # SGLang's rule (Req.check_finished): stop strings match from the first token, min_new_tokens or not (it masks
    # only eos and stop_token_ids); hotswap held them until min_new_tokens tokens were out
    early = engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40, stop=[stop], min_new_tokens=last + 2))
    assert early["output_ids"] == out["output_ids"] and early["text"] == out["text"]
    assert early["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    # vLLM's rule (its route): held until more than min_tokens are out, the text of those never matching
    held = engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40, stop=[stop], min_new_tokens=last + 2, vllm_penalty_rule=True))
    assert len(held["output_ids"]) > last + 2
    later = text.find(stop, max(0, len(engine.tokenizer.decode(ids[: last + 2])) - len(stop) + 1))
    reason = held["meta_info"]["finish_reason"]
    assert reason == ({"type": "length", "length": 40} if later == -1 else {"type": "stop", "matched": stop})
    assert held["text"] == (text if later == -1 else text[:later])
    # SGLang's and vLLM's rule: min_new_tokens may not exceed max_new_tokens
    with pytest.raises(HotswapError, match=r"min_new_tokens \(41\) must be at most max_new_tokens \(40\)"):
        engine.generate(PROMPT, dict(GREEDY, max_new_tokens=40, min_new_tokens=41))


def test_skip_special_tokens_and_spaces_between_them(engine):
    eos = engine.eos_token_ids[0]
    special = engine.tokenizer.decode([eos])
    ids = engine.tokenizer.encode(PROMPT)
    out = engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=3, stop_token_ids=[], logit_bias={eos: 100}))
    assert out["output_ids"] == [eos] * 3 and out["text"] == ""
    raw = engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=3, logit_bias={eos: 100}, skip_special_tokens=False,
                                                              spaces_between_special_tokens=False))
    assert raw["text"] == special * 3
    with pytest.raises(HotswapError, match="spaces_between_special_tokens must be a boolean"):
        engine.generate(PROMPT, dict(GREEDY, spaces_between_special_tokens="no"))


def test_abort_before_admission_during_decode_after_finish_and_all(engine):
    assert engine.pause_generation("in_place").success
    try:
        t, box = in_thread(engine.generate, PROMPT, SLOW, rid="queued")
        deadline = time.monotonic() + 10
        while not engine.get_load().num_waiting:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert engine.abort_request("queued").success
        t.join(10)
        reason = box["out"]["meta_info"]["finish_reason"]
        assert box["out"]["output_ids"] == [] and reason["type"] == "abort"
        assert reason["message"].startswith("Abort before prefill")  # SGLang's words; AReaL reads them as "no tokens"
    finally:
        engine.continue_generation()

    t, box = in_thread(engine.generate, PROMPT, SLOW, rid="decoding")
    wait_running(engine)
    time.sleep(0.2)
    assert engine.abort_request("decoding").success
    t.join(10)
    out = box["out"]
    assert out["meta_info"]["finish_reason"] == {"type": "abort", "message": "aborted by abort_request"}
    assert 0 < len(out["output_ids"]) < 400
    assert out["meta_info"]["id"] == "decoding"
    assert_idle(engine)

    done = engine.generate(PROMPT, GREEDY, rid="finished")
    assert done["meta_info"]["finish_reason"]["type"] == "length"
    late = engine.abort_request("finished")
    assert not late.success and "finished" in late.message
    assert not engine.abort_request("").success  # nothing named: nothing aborted

    threads = [in_thread(engine.generate, f"{PROMPT} {i}", SLOW) for i in range(3)]
    wait_running(engine, 3)
    assert engine.abort_request(abort_all=True).success
    for t, box in threads:
        t.join(10)
        assert box["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    assert_idle(engine)


def test_a_stream_aborted_mid_way_ends_with_its_tokens_so_far(engine):
    chunks = []
    for chunk in engine.generate(PROMPT, SLOW, stream=True, rid="streaming"):
        chunks.append(chunk)
        if len(chunks) == 2:
            assert engine.abort_request("streaming").success
    assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
    assert all(c["meta_info"]["finish_reason"] is None for c in chunks[:-1])
    assert sum(len(c["delta_output_ids"]) for c in chunks) == len(chunks[-1]["output_ids"]) < 400
    assert_idle(engine)


def test_aborting_a_prompts_rid_aborts_its_n_samples_and_no_request_sharing_its_prefix(engine):
    t, box = in_thread(engine.generate, PROMPT, dict(SLOW, n=4), rid="job")
    others = [in_thread(engine.generate, PROMPT, dict(GREEDY, max_new_tokens=60), rid=rid) for rid in ("job7", "jobs", "job-x")]
    wait_running(engine, 7)
    assert engine.abort_request("job").success
    t.join(10)
    samples = box["out"]
    assert [s["meta_info"]["id"] for s in samples] == ["job", "job-1", "job-2", "job-3"]
    assert all(s["meta_info"]["finish_reason"]["type"] == "abort" for s in samples)
    for t, other in others:
        t.join(30)
        assert other["out"]["meta_info"]["finish_reason"] == {"type": "length", "length": 60}
    assert_idle(engine)


def test_engine_made_rids_are_uuid4_hex_and_distinct(engine):
    """A request sent without a rid gets what SGLang gives it, uuid.uuid4().hex (made in batches: engine/api.py fresh_rids)."""
    outs = engine.generate(input_ids=[[5, 6, 7]] * 3, sampling_params=dict(GREEDY, max_new_tokens=1, n=2))
    rids = [o["meta_info"]["id"] for o in outs] + fresh_rids(300)
    assert len(set(rids)) == len(rids) == 306
    for rid in rids:
        u = uuid.UUID(hex=rid)
        assert u.hex == rid and u.version == 4 and u.variant == uuid.RFC_4122


@pytest.fixture(scope="module")
def tight(tiny_qwen3):
    """160 tokens of KV and 8-token prefill chunks: requests are preempted, prompts take several steps."""
    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4, num_pages=40, chunked_prefill_size=8)
    yield eng
    eng.shutdown()


def test_seeded_sampling_is_the_same_when_preempted(engine, tight):
    prompts = [f"{PROMPT} and {i} pears" for i in range(6)]
    sampled = {"max_new_tokens": 48, "temperature": 1.0, "ignore_eos": True}
    params = [dict(sampled, seed=100 + i) for i in range(len(prompts))]
    roomy = [o["output_ids"] for o in engine.generate(prompts, params)]
    before = tight.get_load().num_preemptions
    with ThreadPoolExecutor(len(prompts)) as pool:
        futures = [pool.submit(tight.generate, prompt, sp) for prompt, sp in zip(prompts, params)]
        squeezed = [f.result(timeout=120)["output_ids"] for f in futures]
    assert tight.get_load().num_preemptions > before
    assert squeezed == roomy
    assert_idle(tight)


def test_prompt_scoring_and_abort_in_a_chunked_prefill(engine, tight, monkeypatch):
    ids = engine.tokenizer.encode(" ".join(["Carol counts 7 pears"] * 16))[:100]
    want = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    got = tight.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=0)
    assert [t for _, t, _ in got["meta_info"]["input_token_logprobs"]] == ids and got["output_ids"] == []
    assert [lp for lp, _, _ in got["meta_info"]["input_token_logprobs"][1:]] == \
        pytest.approx([lp for lp, _, _ in want["meta_info"]["input_token_logprobs"][1:]], abs=1e-5)

    run = tight.model_runner.run  # each step takes 30 ms: the 13 prefill chunks outlast the abort's round trip

    def slow_run(*args, **kwargs):
        time.sleep(0.03)
        return run(*args, **kwargs)

    monkeypatch.setattr(tight.model_runner, "run", slow_run)
    assert tight.flush_cache().success  # the prompt is computed again, chunk by chunk
    t, box = in_thread(tight.generate, input_ids=ids, sampling_params=SLOW, rid="prefilling")
    wait_running(tight)
    assert tight.abort_request("prefilling").success
    t.join(10)
    out = box["out"]
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"] == {"type": "abort", "message": "aborted by abort_request"}
    monkeypatch.undo()
    assert_idle(tight)
    assert tight.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=4))["output_ids"] == \
        engine.generate(input_ids=ids, sampling_params=dict(GREEDY, max_new_tokens=4))["output_ids"]


def test_http_generate_edges(engine):
    with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        ctx = engine.max_context_len
        r = http.post("/generate", json={"input_ids": [5] * (ctx - 4), "sampling_params": dict(GREEDY, max_new_tokens=8)})
        assert r.status_code == 400 and "exceeds the context length" in r.json()["error"]["message"]
        assert "--allow-auto-truncate" in r.json()["error"]["message"]  # the server's flag, not only the engine's field
        r = http.post("/generate", json={"input_ids": [5] * (ctx - 4), "sampling_params": dict(GREEDY, max_new_tokens=None)})
        assert r.status_code == 200 and len(r.json()["output_ids"]) == 4
        r = http.post("/generate", json={"text": PROMPT, "sampling_params": {"max_new_tokens": 0}, "return_logprob": True,
                                         "logprob_start_len": 0})
        meta = r.json()["meta_info"]
        assert r.json()["output_ids"] == [] and len(meta["input_token_logprobs"]) == len(engine.tokenizer.encode(PROMPT))
        # n > 1 over a list of prompts: prompt-major, as SGLang orders them
        body = {"text": [PROMPT, "Bob sees"], "sampling_params": {"max_new_tokens": 4, "n": 2, "seed": 3}}
        outs = http.post("/generate", json=body).json()
        singles = [http.post("/generate", json={"text": t, "sampling_params": {"max_new_tokens": 4, "seed": 3 + k}}).json()["output_ids"]
                   for t in (PROMPT, "Bob sees") for k in range(2)]
        assert [o["output_ids"] for o in outs] == singles
        # a stream aborted by its rid ends with its tokens so far, then [DONE]
        events = []
        with http.stream("POST", "/generate", json={"text": PROMPT, "sampling_params": SLOW, "stream": True, "rid": "sse"}) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    events.append(line[6:])
                    if len(events) == 2:
                        assert httpx.post(srv.url + "/abort_request", json={"rid": "sse"}).status_code == 200
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])
        assert last["meta_info"]["finish_reason"]["type"] == "abort" and 0 < len(last["output_ids"]) < 400
    assert_idle(engine)
