"""Stop strings as SGLang matches them (managers/schedule_batch.py, Req._check_str_based_finish): of two stop strings
completed by the same token the first in the request's list ends it (vLLM's check_stop_strings too) and the text is cut
before it (trim_matched_stop); a stop string holding a piece of a special token's text ("<|im_st") is matched in the
raw decode of the last tokens, as one holding all of it is, though skip_special_tokens leaves it out of the text."""

from __future__ import annotations

import pytest
from engine_support import make_engine


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3) as engine:
        yield engine


def last(out, stream: bool) -> dict:
    return list(out)[-1] if stream else out


@pytest.mark.parametrize("stream", [False, True])
def test_the_first_listed_stop_string_wins(engine, stream):
    tok = engine.tokenizer
    tid, word = next((i, t) for i in range(len(tok)) if (t := tok.decode([i])).isalpha() and len(t) >= 3)
    sp = {"max_new_tokens": 3, "temperature": 0, "logit_bias": {str(tid): 100.0}, "stop": [word[1:3], word[:2]]}
    out = last(engine.generate(input_ids=[1, 2, 3], sampling_params=sp, stream=stream), stream)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": word[1:3]}
    assert out["text"] == word[:1] and out["output_ids"] == [tid]


@pytest.mark.parametrize("stop", ["<|im_st", "art|>", "|><|im"])
@pytest.mark.parametrize("stream", [False, True])
def test_a_piece_of_a_special_token_stops(engine, stop, stream):
    special = engine.tokenizer.convert_tokens_to_ids("<|im_start|>")
    sp = {"max_new_tokens": 4, "temperature": 0, "logit_bias": {str(special): 100.0}, "stop": [stop]}
    out = last(engine.generate(input_ids=[1, 2, 3], sampling_params=sp, stream=stream), stream)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
    assert out["output_ids"] == [special] * (2 if stop == "|><|im" else 1) and out["text"] == ""
