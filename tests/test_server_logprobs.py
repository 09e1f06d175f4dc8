"""Prompt logprobs, penalties, keep-sets and no_stop_trim over HTTP, each reply parsed as the framework
that sends the request parses it."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from hf_reference import assert_penalized_greedy_matches_hf

from hotswap.sampling_params import SamplingParams

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
IDS = [11, 52, 7, 300, 41, 9, 120, 77]


def test_generate_returns_sglang_input_token_logprobs(http, engine):
    """verl's HttpServerAdapter.generate sends logprob_start_len and top_logprobs_num and returns the dict."""
    ref = engine.generate(input_ids=IDS, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0, top_logprobs_num=2)
    body = {"input_ids": IDS, "sampling_params": GREEDY, "return_logprob": True, "logprob_start_len": 0, "top_logprobs_num": 2,
            "return_text_in_logprobs": True}
    meta = http.post("/generate", json=body).json()["meta_info"]
    assert [x[1] for x in meta["input_token_logprobs"]] == IDS and meta["input_token_logprobs"][0][0] is None
    assert [x[0] for x in meta["input_token_logprobs"]] == [x[0] for x in ref["meta_info"]["input_token_logprobs"]]
    assert all(isinstance(x[2], str) for x in meta["input_token_logprobs"])
    assert meta["input_top_logprobs"][0] is None and all(len(t) == 2 for t in meta["input_top_logprobs"][1:])


def test_openai_echo_with_logprobs_prepends_the_prompt(oai, engine):
    ref = engine.generate(input_ids=IDS, sampling_params=dict(GREEDY, max_new_tokens=4), return_logprob=True, logprob_start_len=0)
    c = oai.completions.create(model="tiny", prompt=IDS, max_tokens=4, temperature=0, echo=True, logprobs=1)
    lp = c.choices[0].logprobs
    want = [x[0] for x in ref["meta_info"]["input_token_logprobs"]] + [x[0] for x in ref["meta_info"]["output_token_logprobs"]]
    assert lp.token_logprobs == want and lp.token_logprobs[0] is None
    assert len(lp.tokens) == len(IDS) + 4 and lp.top_logprobs[0] is None and len(lp.top_logprobs) == len(IDS) + 4

    stream = oai.completions.create(model="tiny", prompt=IDS, max_tokens=4, temperature=0, echo=True, logprobs=1, stream=True)
    streamed = [x for chunk in stream for ch in chunk.choices if ch.logprobs for x in ch.logprobs.token_logprobs]
    assert streamed == want


def test_vllm_prompt_logprobs_on_completions(http, engine):
    """prime-rl's prefill_logprobs reads prompt_logprobs[i] (None at 0, else {token_id: {logprob}}, first value)."""
    ref = engine.generate(input_ids=IDS, sampling_params=dict(GREEDY, max_new_tokens=1), return_logprob=True, logprob_start_len=0)
    r = http.post("/v1/completions", json={"model": "tiny", "prompt": IDS, "max_tokens": 1, "temperature": 1.0, "prompt_logprobs": 1})
    assert r.status_code == 200, r.text
    pl = r.json()["choices"][0]["prompt_logprobs"]
    assert pl[0] is None and len(pl) == len(IDS)
    for j in range(1, len(IDS)):
        assert pl[j][str(IDS[j])]["logprob"] == ref["meta_info"]["input_token_logprobs"][j][0]
        assert 1 <= len(pl[j]) <= 2


def test_penalties_and_bias_over_http(http, oai, engine):
    sp = dict(GREEDY, frequency_penalty=1.0, presence_penalty=0.5, repetition_penalty=1.5, min_new_tokens=2)
    ref = engine.generate(input_ids=IDS, sampling_params=sp)
    assert http.post("/generate", json={"input_ids": IDS, "sampling_params": sp}).json()["output_ids"] == ref["output_ids"]
    c = oai.completions.create(model="tiny", prompt=IDS, max_tokens=3, temperature=0, logit_bias={"123": 100})
    plain = engine.generate(input_ids=IDS, sampling_params={"max_new_tokens": 3, "temperature": 0})["output_ids"]
    assert plain != [123] * 3 and c.choices[0].text == engine.tokenizer.decode([123] * 3)


def test_native_generate_refuses_the_vllm_penalty_rule(http):
    """vllm_penalty_rule is the vLLM routes' own switch; SGLang's /generate knows no such sampling parameter."""
    r = http.post("/generate", json={"input_ids": IDS, "sampling_params": dict(GREEDY, vllm_penalty_rule=True)})
    assert r.status_code == 400 and "vllm_penalty_rule" in r.text
    assert http.post("/generate", json={"input_ids": IDS, "sampling_params": dict(GREEDY, vllm_penalty_rule=False)}).status_code == 200


PENALIZED = {"repetition_penalty": 1.8, "frequency_penalty": 0.7, "presence_penalty": 0.3, "logit_bias": {str(IDS[0]): 1.5, str(IDS[2]): -1.0}}


def _as_meta(ids: list[int], lps: list[float]) -> dict:
    return {"output_ids": ids, "meta_info": {"output_token_logprobs": [(lp, t, None) for lp, t in zip(lps, ids)]}}


@pytest.mark.parametrize("route", ["/generate", "/v1/completions", "/v1/chat/completions", "/inference/v1/generate"])
def test_penalized_logprobs_follow_each_routes_engine(http, tiny_qwen3, route):
    """Returned logprobs equal a float64 reference from HF logits of the engine the route serves as: SGLang's rule
    (repetition over the output only, logit_bias last) on SGLang's routes and the OpenAI ones, vLLM's (repetition
    over the prompt too, logit_bias first) on vLLM's token route."""
    n = 6
    if route == "/generate":
        body = {"input_ids": IDS, "sampling_params": dict(GREEDY, **PENALIZED), "return_logprob": True}
        meta = http.post(route, json=body).json()
        prompt, ids, lps = IDS, meta["output_ids"], [x[0] for x in meta["meta_info"]["output_token_logprobs"]]
    elif route == "/v1/completions":
        body = {"model": "tiny", "prompt": IDS, "max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 0,
                "return_token_ids": True, **PENALIZED}
        c = http.post(route, json=body).json()["choices"][0]
        prompt, ids, lps = IDS, c["token_ids"], c["logprobs"]["token_logprobs"]
    elif route == "/v1/chat/completions":
        body = {"model": "tiny", "messages": [{"role": "user", "content": "hello hello world"}], "max_tokens": n,
                "temperature": 0, "ignore_eos": True, "logprobs": True, "return_token_ids": True, **PENALIZED}
        c = http.post(route, json=body).json()["choices"][0]
        prompt, ids, lps = c["prompt_token_ids"], c["token_ids"], [x["logprob"] for x in c["logprobs"]["content"]]
    else:
        sp = {"max_tokens": n, "temperature": 0, "ignore_eos": True, "logprobs": 0, **PENALIZED}
        c = http.post(route, json={"model": "tiny", "token_ids": IDS, "sampling_params": sp}).json()["choices"][0]
        prompt, ids, lps = IDS, c["token_ids"], [x["logprob"] for x in c["logprobs"]["content"]]
    params = SamplingParams.from_dict(dict(PENALIZED, max_new_tokens=n, vllm_penalty_rule=route == "/inference/v1/generate"))
    assert_penalized_greedy_matches_hf(tiny_qwen3, prompt, _as_meta(ids, lps), params)


def test_keep_sets_over_http_as_slime_reads_them(http):
    sp = {"max_new_tokens": 5, "temperature": 1.0, "top_p": 0.7, "top_k": 30, "seed": 1, "ignore_eos": True,
          "custom_params": {"return_top_p_token_ids": True}}
    out = http.post("/generate", json={"input_ids": IDS, "sampling_params": sp, "return_logprob": True}).json()
    meta = out["meta_info"]
    ids = np.frombuffer(base64.b64decode(meta["top_p_token_ids"]), dtype="<i4")
    offsets = np.frombuffer(base64.b64decode(meta["top_p_token_offsets"]), dtype="<i4")
    assert len(offsets) == len(out["output_ids"]) + 1
    for j, tok in enumerate(out["output_ids"]):
        assert tok in ids[offsets[j] : offsets[j + 1]].tolist()


def test_no_stop_trim_on_every_path(http, oai, engine):
    base = engine.generate(input_ids=IDS, sampling_params=dict(GREEDY, max_new_tokens=12))["text"]
    stop = next(base[i : i + 2] for i in range(2, len(base) - 2) if base[i : i + 2].strip() and base.find(base[i : i + 2]) == i)
    cut = base[: base.index(stop)]
    sp = dict(GREEDY, max_new_tokens=12, stop=[stop])
    # SGLang's no_stop_trim keeps all the text of the tokens up to the one completing the stop string; vLLM's
    # include_stop_str_in_output cuts right after the stop string
    kept = engine.generate(input_ids=IDS, sampling_params=dict(sp, no_stop_trim=True))
    whole = engine.tokenizer.decode(kept["output_ids"])
    assert kept["text"] == whole and whole.startswith(cut + stop)
    assert engine.generate(input_ids=IDS, sampling_params=dict(sp, include_stop_str_in_output=True))["text"] == cut + stop
    assert engine.generate(input_ids=IDS, sampling_params=sp)["text"] == cut
    for extra, text in (({"no_stop_trim": True}, whole), ({"include_stop_str_in_output": True}, cut + stop)):
        c = oai.completions.create(model="tiny", prompt=IDS, max_tokens=12, temperature=0, stop=[stop], extra_body={**extra, "ignore_eos": True})
        assert c.choices[0].text == text
    with http.stream("POST", "/generate", json={"input_ids": IDS, "sampling_params": dict(sp, no_stop_trim=True), "stream": True}) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    assert events[-1]["text"] == whole and "".join(e["delta_text"] for e in events) == whole
