"""A stop string that holds a special token's text ("<|im_end|>", "<|eot_id|>", "<|end|>": what base-model RL recipes
stop on) stops the request when the token comes, also with skip_special_tokens (the default), as SGLang matches stop
strings in the raw decode of the last tokens (managers/schedule_batch.py, Req._check_str_based_finish). Matched only
in the skip-decoded text, it never matched: the request ran to max_new_tokens."""

from __future__ import annotations

import json

import pytest


def _special(engine) -> int:
    return engine.tokenizer.convert_tokens_to_ids("<|im_start|>")  # special, and not an end of sequence


@pytest.mark.parametrize("skip", [True, False])
def test_generate_stops_on_a_special_token_stop_string(http, engine, skip):
    sp = {"max_new_tokens": 6, "temperature": 0, "logit_bias": {str(_special(engine)): 100}, "stop": ["<|im_start|>"],
          "skip_special_tokens": skip}
    r = http.post("/generate", json={"text": "Alice likes", "sampling_params": sp})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "<|im_start|>"}
    assert out["output_ids"] == [_special(engine)]
    assert out["text"] == ""


def test_chat_and_its_stream_stop_on_a_special_token_stop_string(http, engine):
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 6, "temperature": 0,
            "logit_bias": {str(_special(engine)): 100}, "stop": ["<|im_start|>"], "return_token_ids": True}
    c = http.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert (c["finish_reason"], c["matched_stop"], c["token_ids"], c["message"]["content"]) == ("stop", "<|im_start|>", [_special(engine)], "")
    finishes = []
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                finishes += [ch["finish_reason"] for ch in json.loads(line[6:])["choices"] if ch["finish_reason"]]
    assert finishes == ["stop"]


def test_a_plain_stop_string_is_still_cut_from_the_text(http, engine):
    first = http.post("/generate", json={"text": "Alice likes", "sampling_params": {"max_new_tokens": 8, "temperature": 0}}).json()
    stop = first["text"][2:4]
    assert stop.strip(), first["text"]
    out = http.post("/generate", json={"text": "Alice likes", "sampling_params": {"max_new_tokens": 8, "temperature": 0,
                                                                                   "stop": [stop, "<|im_end|>"]}}).json()
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["text"] == first["text"][: first["text"].index(stop)]
