"""SGLang's per-request sampling_params.stream_interval (SamplingParams.stream_interval; its scheduler's
stream_output_generation takes `req.sampling_params.stream_interval or the server's`): a streamed /generate request
that asks for outputs every 4 tokens gets them every 4 tokens, not every token."""

from __future__ import annotations

import json


def _lengths(http, sp: dict) -> list[int]:
    body = {"text": "Alice likes", "stream": True, "sampling_params": {"max_new_tokens": 12, "ignore_eos": True, **sp}}
    with http.stream("POST", "/generate", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        return [len(json.loads(x[len("data: "):])["output_ids"]) for x in resp.iter_lines() if x.startswith("data: {")]


def test_request_stream_interval_spaces_the_chunks(http):
    lengths = _lengths(http, {"stream_interval": 4})
    assert lengths[-1] == 12 and len(lengths) <= 4, lengths
    steps = [b - a for a, b in zip([0, *lengths], lengths)]
    assert all(s >= 4 for s in steps[1:-1]), lengths
    assert len(_lengths(http, {})) >= 6  # the server's interval (1) otherwise: about a chunk a token


def test_bad_request_stream_interval_is_refused(http):
    r = http.post("/generate", json={"text": "a", "sampling_params": {"max_new_tokens": 2, "stream_interval": 0}})
    assert r.status_code == 400 and "stream_interval" in r.text, r.text


def test_first_token_is_not_held_back_by_the_interval(http):
    """SGLang sends at output lengths 1, 1 + N, 1 + 2N... (stream_output_generation: len(output_ids) % N == 1 for
    N > 1): a larger interval never delays the first token."""
    for _ in range(3):
        assert _lengths(http, {"stream_interval": 4})[0] == 1
