"""A matched stop string kept in the text: SGLang's `no_stop_trim` keeps all the text the output's tokens decode to
(detokenizer_manager.trim_matched_stop returns it untouched, so text == decode(output_ids)); vLLM's
`include_stop_str_in_output` cuts the text right after the stop string (check_stop_strings). A stop string ending inside
a token tells them apart."""

from __future__ import annotations

import pytest


def _word(engine) -> tuple[int, str]:
    tok = engine.tokenizer
    return next((i, t) for i in range(len(tok)) if (t := tok.decode([i])).isalpha() and len(t) >= 3)


@pytest.mark.parametrize("stream", [False, True])
def test_no_stop_trim_keeps_the_whole_token_and_include_stop_str_cuts_after_it(engine, stream):
    tid, word = _word(engine)
    base = {"max_new_tokens": 3, "temperature": 0, "logit_bias": {str(tid): 100.0}, "stop": [word[:2]]}
    for extra, text in (({}, ""), ({"no_stop_trim": True}, word), ({"include_stop_str_in_output": True}, word[:2])):
        out = engine.generate(input_ids=[1, 2, 3], sampling_params={**base, **extra}, stream=stream)
        out = list(out)[-1] if stream else out
        assert (out["text"], out["output_ids"], out["meta_info"]["finish_reason"]) == (text, [tid], {"type": "stop", "matched": word[:2]})


def test_the_openai_fields_keep_their_own_rules(http, engine):
    tid, word = _word(engine)
    body = {"model": "m", "prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0, "logit_bias": {str(tid): 100}, "stop": [word[:2]]}
    for extra, text in (({"no_stop_trim": True}, word), ({"include_stop_str_in_output": True}, word[:2])):
        choice = http.post("/v1/completions", json={**body, **extra}).json()["choices"][0]
        assert (choice["text"], choice["matched_stop"]) == (text, word[:2])
