"""A request whose prompt fits the KV cache but whose prompt + max_new_tokens does not: SGLang cuts max_new_tokens to
what the cache holds (scheduler.init_req_max_new_tokens, max_req_len = max_total_num_tokens - 1) and the request
finishes with "length"; it is never aborted half way (AReaL re-sends an abort as prompt + output, which no longer fits)."""

from __future__ import annotations

from hotswap import Engine

PROMPT = list(range(10, 30))  # 20 tokens
SP = {"max_new_tokens": 200, "temperature": 0, "ignore_eos": True}


def test_a_request_longer_than_the_kv_cache_finishes_with_length_at_the_cache(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, num_pages=32) as engine:  # 128 tokens of KV
        out = engine.generate(input_ids=PROMPT, sampling_params=SP, return_logprob=True)
        limit = 32 * 4 - 2 - len(PROMPT)  # SGLang: max_total_num_tokens - 1 - prompt - 1
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": limit}
        assert len(out["output_ids"]) == out["meta_info"]["completion_tokens"] == limit
        # the same with company, sampled, n > 1: every sample ends with length, none aborted
        outs = engine.generate(input_ids=[PROMPT, PROMPT[:12]], sampling_params=dict(SP, temperature=1.0, n=3))
        assert [o["meta_info"]["finish_reason"]["type"] for o in outs] == ["length"] * 6
        assert sorted({len(o["output_ids"]) for o in outs}) == [limit, limit + 8]
        # a request that fits is untouched
        short = engine.generate(input_ids=PROMPT, sampling_params=dict(SP, max_new_tokens=50))
        assert short["meta_info"]["finish_reason"] == {"type": "length", "length": 50}
