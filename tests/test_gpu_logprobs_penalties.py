"""On CUDA, under the decode and extend CUDA graphs: prompt logprobs, penalties (rows run eagerly, SGLang's rule
and vLLM's) and keep-sets equal the CPU engine's. Skipped without CUDA."""

from __future__ import annotations

import pytest
import torch
from hf_reference import prompt_ids

from hotswap import Engine

pytestmark = pytest.mark.gpu


def test_cuda_prompt_logprobs_penalties_and_keep_sets_equal_cpu(tiny_qwen3):
    prompts = [prompt_ids(60 + i, 9 + 13 * i) for i in range(4)]
    penalized = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True, "repetition_penalty": 1.6, "frequency_penalty": 0.5,
                 "presence_penalty": 0.2, "logit_bias": {"17": 0.5}, "min_new_tokens": 3}
    plain = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
    filtered = {"max_new_tokens": 6, "temperature": 0.8, "top_k": 12, "top_p": 0.8, "seed": 2, "ignore_eos": True,
                "custom_params": {"return_top_p_token_ids": True}}

    def run(engine):
        # SGLang's rule (the default) and vLLM's (its routes' `vllm_penalty_rule`) in one batch
        mixed = engine.generate(input_ids=prompts, sampling_params=[penalized, plain, dict(penalized, vllm_penalty_rule=True), plain],
                                return_logprob=True, logprob_start_len=1, top_logprobs_num=2)
        keep = engine.generate(input_ids=prompts[:2], sampling_params=filtered)
        return mixed, keep

    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as cpu:
        ref_mixed, ref_keep = run(cpu)
    with Engine(str(tiny_qwen3), device="cuda", dtype="float32", page_size=16, chunked_prefill_size=16) as gpu:
        assert gpu.model_runner.cuda_graphs is not None
        mixed, keep = run(gpu)
        assert gpu.check_invariants().success
    for got, ref in zip(mixed, ref_mixed):
        assert got["output_ids"] == ref["output_ids"]
        g = [x[0] for x in got["meta_info"]["input_token_logprobs"][1:]]
        r = [x[0] for x in ref["meta_info"]["input_token_logprobs"][1:]]
        torch.testing.assert_close(torch.tensor(g), torch.tensor(r), atol=1e-4, rtol=1e-4)
    for got, ref in zip(keep, ref_keep):
        assert got["output_ids"] == ref["output_ids"]
        assert got["meta_info"]["top_p_token_ids"] == ref["meta_info"]["top_p_token_ids"]
