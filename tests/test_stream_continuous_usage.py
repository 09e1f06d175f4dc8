"""stream_options.continuous_usage_stats counts per choice: each chunk's usage is its own choice's prompt and the
tokens that choice has so far, as vLLM's (chat_completion_stream_generator: previous_num_tokens[i], and
completion_stream_generator: num_prompt_tokens[prompt_idx]) and SGLang's (serving_chat / serving_completions
_generate_*_stream: prompt_tokens[index], completion_tokens[index]) do; the final usage chunk sums them all."""

from __future__ import annotations

import json


def _chunks(http, route: str, body: dict) -> list[dict]:
    with http.stream("POST", route, json=body) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(x[len("data: "):]) for x in resp.iter_lines() if x.startswith("data: {")]


def _per_choice(chunks: list[dict]) -> dict[int, list[dict]]:
    seen: dict[int, list[dict]] = {}
    for c in chunks:
        if c["choices"] and c.get("usage") is not None:
            seen.setdefault(c["choices"][0]["index"], []).append(c["usage"])
    return seen


def test_chat_continuous_usage_is_per_choice(http, engine):
    body = {"messages": [{"role": "user", "content": "count"}], "max_tokens": 5, "ignore_eos": True, "n": 2, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = _chunks(http, "/v1/chat/completions", body)
    final = chunks[-1]["usage"]
    assert final["completion_tokens"] == 10
    per = _per_choice(chunks)
    assert set(per) == {0, 1}
    for usages in per.values():
        counts = [u["completion_tokens"] for u in usages]
        assert counts == sorted(counts) and counts[-1] == 5, usages  # its own 5 tokens, never the other choice's
        assert all(u["prompt_tokens"] == final["prompt_tokens"] for u in usages)
        assert all(u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"] for u in usages)


def test_completions_continuous_usage_is_per_prompt_and_choice(http, engine):
    short, long = engine.tokenizer.encode("ab"), engine.tokenizer.encode("a much longer prompt here")
    body = {"prompt": [short, long], "max_tokens": 4, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    chunks = _chunks(http, "/v1/completions", body)
    per = _per_choice(chunks)
    assert {i: us[-1]["completion_tokens"] for i, us in per.items()} == {0: 4, 1: 4}
    assert {u["prompt_tokens"] for u in per[0]} == {len(short)} and {u["prompt_tokens"] for u in per[1]} == {len(long)}
    assert chunks[-1]["usage"]["prompt_tokens"] == len(short) + len(long) and chunks[-1]["usage"]["completion_tokens"] == 8
