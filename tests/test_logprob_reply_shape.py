"""Which logprob fields a reply holds, against SGLang's source: TokenizerManager._handle_batch_output adds logprobs to
meta_info only under return_logprob, and add_logprob_to_meta_info then always sets input_token_logprobs (and, with
top_logprobs_num > 0, input/output_top_logprobs), empty or not; the scheduler's handle_generate_request ignores
logprob_start_len without return_logprob, scores no prompt position for -1 on a prompt-only request, and refuses a
start past the prompt's end."""

from __future__ import annotations

import pytest

from hotswap.errors import HotswapError

IDS = [11, 12, 13, 14, 15]
GREEDY = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
LOGPROB_KEYS = ("input_token_logprobs", "output_token_logprobs", "input_top_logprobs", "output_top_logprobs")


def test_top_logprobs_num_without_return_logprob_returns_no_logprobs(engine, http):
    """SGLang: top_logprobs_num alone asks for nothing (hotswap turned return_logprob on); its range is still checked."""
    meta = engine.generate(input_ids=IDS, sampling_params=GREEDY, top_logprobs_num=3)["meta_info"]
    assert not set(LOGPROB_KEYS) & set(meta)
    body = {"input_ids": IDS, "sampling_params": GREEDY, "top_logprobs_num": 3}
    r = http.post("/generate", json=body)
    assert r.status_code == 200 and not set(LOGPROB_KEYS) & set(r.json()["meta_info"])
    r = http.post("/generate", json={**body, "top_logprobs_num": [3]})  # SGLang's per-prompt list
    assert r.status_code == 200 and not set(LOGPROB_KEYS) & set(r.json()["meta_info"])
    assert engine.generate(input_ids=IDS, sampling_params=GREEDY, top_logprobs_num=3)["output_ids"] == \
        engine.generate(input_ids=IDS, sampling_params=GREEDY)["output_ids"]
    with pytest.raises(HotswapError, match="top_logprobs_num"):
        engine.generate(input_ids=IDS, sampling_params=GREEDY, top_logprobs_num=10**6)
    r = http.post("/generate", json={**body, "top_logprobs_num": 10**6})
    assert r.status_code == 400 and "top_logprobs_num" in r.text


def test_max_new_tokens_zero_without_a_start_scores_no_prompt_position(engine):
    """A prompt-only request with logprob_start_len -1 (unset): SGLang sets the start past the prompt, so every list
    is empty (hotswap gave the last prompt token's [None, id] entry, which only a request that samples gets)."""
    meta = engine.generate(input_ids=IDS, sampling_params={"max_new_tokens": 0}, return_logprob=True)["meta_info"]
    assert meta["input_token_logprobs"] == [] and meta["output_token_logprobs"] == []
    assert meta["finish_reason"] == {"type": "length", "length": 0} and meta["completion_tokens"] == 0
    tops = engine.generate(input_ids=IDS, sampling_params={"max_new_tokens": 0}, return_logprob=True, top_logprobs_num=2)["meta_info"]
    assert [tops[k] for k in LOGPROB_KEYS] == [[], [], [], []]
    sampled = engine.generate(input_ids=IDS, sampling_params=GREEDY, return_logprob=True)["meta_info"]
    assert [(lp, t) for lp, t, _ in sampled["input_token_logprobs"]] == [(None, IDS[-1])]


def test_output_top_logprobs_is_present_whenever_asked(engine):
    meta = engine.generate(input_ids=IDS, sampling_params=GREEDY, return_logprob=True, top_logprobs_num=2)["meta_info"]
    assert len(meta["output_top_logprobs"]) == 2 and all(len(top) == 2 for top in meta["output_top_logprobs"])
    assert meta["input_top_logprobs"] == [None]


def test_logprob_start_len_edges(engine, http):
    """Up to the prompt's length is a start (the length itself scores nothing); past it is refused; without
    return_logprob it is ignored, as SGLang's scheduler resets it to -1."""
    for mnt in (0, 2):
        sp = {**GREEDY, "max_new_tokens": mnt}
        meta = engine.generate(input_ids=IDS, sampling_params=sp, return_logprob=True, logprob_start_len=len(IDS))["meta_info"]
        assert meta["input_token_logprobs"] == [] and len(meta["output_token_logprobs"]) == mnt
        with pytest.raises(HotswapError, match="logprob_start_len"):
            engine.generate(input_ids=IDS, sampling_params=sp, return_logprob=True, logprob_start_len=len(IDS) + 1)
    one = engine.generate(input_ids=IDS[:1], sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)["meta_info"]
    assert [(lp, t) for lp, t, _ in one["input_token_logprobs"]] == [(None, IDS[0])]
    plain = engine.generate(input_ids=IDS, sampling_params=GREEDY, logprob_start_len=len(IDS) + 7)
    assert "input_token_logprobs" not in plain["meta_info"] and len(plain["output_ids"]) == 2
    r = http.post("/generate", json={"input_ids": IDS, "sampling_params": GREEDY, "logprob_start_len": 50})
    assert r.status_code == 200
    r = http.post("/generate", json={"input_ids": IDS, "sampling_params": GREEDY, "logprob_start_len": 50, "return_logprob": True})
    assert r.status_code == 400 and "logprob_start_len" in r.text


def test_sglang_sampling_dict_edges(engine, http):
    """SGLang's SamplingParams.__post_init__ drops None from stop_token_ids (hotswap refused the list); a bad
    sampling_seed is refused under its own name (the refusal named `seed`, a field the caller never sent)."""
    with_none = engine.generate(input_ids=IDS, sampling_params={**GREEDY, "stop_token_ids": [None, 7]})
    assert with_none["output_ids"] == engine.generate(input_ids=IDS, sampling_params={**GREEDY, "stop_token_ids": [7]})["output_ids"]
    for seed in (-1, 2**63, "3"):
        with pytest.raises(HotswapError, match="sampling_seed"):
            engine.generate(input_ids=IDS, sampling_params={**GREEDY, "sampling_seed": seed})
    r = http.post("/generate", json={"input_ids": IDS, "sampling_params": {**GREEDY, "sampling_seed": -1}})
    assert r.status_code == 400 and "sampling_seed" in r.text
