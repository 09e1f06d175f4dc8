"""Penalties, logit_bias and min_new_tokens on the device against float64 references (hf_reference.py: SGLang's
rule and vLLM's), greedy and sampled; neutral values change nothing; out-of-range values are refused by name."""

from __future__ import annotations

import pytest
import torch
from hf_reference import assert_penalized_greedy_matches_hf, hf_penalized_greedy, prompt_ids, reference_penalties

from hotswap import Engine, HotswapError
from hotswap.runner.batch_entry import BatchEntry
from hotswap.runner.penalties import apply_penalties
from hotswap.runner.row_params import SamplerRow
from hotswap.runner.sampler import SamplingBatch, reference_sample, sample
from hotswap.sampling_params import SamplingParams

V = 64


def entry(params: SamplingParams, prompt: list[int], output: list[int], prev_row: int = -1, banned=None) -> BatchEntry:
    return BatchEntry(input_ids=[0], start_pos=0, pages=[0], sample=True, params=params, row=SamplerRow.of(params, 3), step=len(output),
                      prev_row=prev_row, prompt_ids=prompt, output_ids=output, banned_ids=banned)


@pytest.mark.parametrize("vllm_rule", [False, True])
def test_penalties_equal_a_float64_reference_with_the_token_in_flight(vllm_rule):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, V, generator=g) * 3
    prev = torch.tensor([7, 11, 7])  # the previous step's sampled ids, still on the device
    params = [
        SamplingParams(repetition_penalty=1.7, frequency_penalty=0.6, presence_penalty=-0.4, logit_bias={2: 3.0, 40: -2.0},
                       vllm_penalty_rule=vllm_rule),
        SamplingParams(),  # neutral row in the same batch
        SamplingParams(frequency_penalty=1.5, logit_bias={3: 5.0, 9: -100.0}, min_new_tokens=9),
        SamplingParams(repetition_penalty=0.6, vllm_penalty_rule=not vllm_rule),  # the other rule in the same batch
    ]
    prompts = [[1, 2, 3, 3, 40], [5], [6, 6, 6], [2, 9, 9]]
    outputs = [[2, 2, 50, 7], [1], [6, 30, 30], [1]]
    entries = [entry(params[0], prompts[0], outputs[0], prev_row=2), entry(params[1], prompts[1], outputs[1]),
               entry(params[2], prompts[2], outputs[2], prev_row=1, banned=[0, 63]), entry(params[3], prompts[3], outputs[3])]
    got = apply_penalties(x.to(torch.bfloat16), entries, prev, torch.from_numpy)
    xb = x.to(torch.bfloat16).float()
    seen_out = [outputs[0] + [7], outputs[1], outputs[2] + [11], outputs[3]]
    for r in range(4):
        want = reference_penalties(xb[r], params[r], prompts[r], seen_out[r], [0, 63] if r == 2 else [])
        torch.testing.assert_close(got[r].double(), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got[1], xb[1])


def test_min_new_tokens_masks_each_rows_own_ids():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, V, generator=g)
    params = [SamplingParams(min_new_tokens=3), SamplingParams(logit_bias={8: 1.0}), SamplingParams(min_new_tokens=2, presence_penalty=0.5)]
    banned = [[2, 9, 63], None, [0, 9]]
    entries = [entry(p, [1], [4], banned=b) for p, b in zip(params, banned)]
    got = apply_penalties(x, entries, None, torch.from_numpy)
    for r in range(3):
        want = reference_penalties(x[r], params[r], [1], [4], banned[r] or [])
        torch.testing.assert_close(got[r].double(), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("greedy", [True, False])
def test_sampling_reads_the_penalized_logits(greedy):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, V, generator=g)
    p = SamplingParams(temperature=0.0 if greedy else 0.8, top_p=0.9, repetition_penalty=1.9, frequency_penalty=1.0,
                       logit_bias={5: 2.0}, vllm_penalty_rule=not greedy)
    entries = [entry(p, [1, 2, 3], [4, 4, 5]), entry(p, [9], [])]
    y = apply_penalties(x, entries, None, torch.from_numpy)
    wants = torch.stack([reference_penalties(x[0], p, [1, 2, 3], [4, 4, 5], []), reference_penalties(x[1], p, [9], [], [])]).float()
    if greedy:
        sb = SamplingBatch(None, None, None, None, None, None, all_greedy=True, needs_filter=False, needs_logprobs=True, max_top_logprobs=0)
    else:
        sb = SamplingBatch(torch.tensor([0.8, 0.8]), torch.tensor([0.9, 0.9]), torch.tensor([V, V]), torch.tensor([0.0, 0.0]),
                           torch.tensor([5, 6]), torch.tensor([3, 0]), all_greedy=False, needs_filter=True, needs_logprobs=True, max_top_logprobs=0)
    got = sample(y, sb)
    ref_ids, ref_lps, _ = reference_sample(wants, sb)
    assert got.token_ids.tolist() == ref_ids.tolist()
    torch.testing.assert_close(got.logprobs, ref_lps, atol=1e-5, rtol=1e-5)


def make_engine(path, **kw) -> Engine:
    kw.setdefault("page_size", 4)
    return Engine(str(path), device="cpu", **kw)


@pytest.mark.parametrize("vllm_rule", [False, True])
def test_greedy_generation_with_penalties_matches_hf(tiny_qwen3, vllm_rule):
    """The offline Engine: tokens and logprobs of the rule asked for (SGLang's by default), and not the other's."""
    ids = prompt_ids(21, 10)
    sp = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True, "repetition_penalty": 1.8, "frequency_penalty": 0.7,
          "presence_penalty": 0.3, "logit_bias": {str(ids[0]): 1.5, str(ids[1]): -1.0}}
    if vllm_rule:
        sp["vllm_penalty_rule"] = True
    with make_engine(tiny_qwen3) as engine:
        out = engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True)
        params = SamplingParams.from_dict(dict(sp))
        assert_penalized_greedy_matches_hf(tiny_qwen3, ids, out, params)
        other = SamplingParams.from_dict(dict(sp, vllm_penalty_rule=not vllm_rule))
        assert hf_penalized_greedy(tiny_qwen3, ids, 12, other) != hf_penalized_greedy(tiny_qwen3, ids, 12, params)
        plain = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 12, "temperature": 0, "ignore_eos": True})
        assert plain["output_ids"] != out["output_ids"]  # the penalties did something


def test_neutral_values_change_nothing(tiny_qwen3):
    prompts = [prompt_ids(22, 7), prompt_ids(23, 15)]
    base = {"max_new_tokens": 8, "temperature": 0.9, "top_p": 0.95, "seed": 4, "ignore_eos": True}
    neutral = dict(base, frequency_penalty=0.0, presence_penalty=0.0, repetition_penalty=1.0, min_new_tokens=0, logit_bias={})
    with make_engine(tiny_qwen3) as engine:
        a = engine.generate(input_ids=prompts, sampling_params=base, return_logprob=True)
        assert engine.flush_cache().success  # the same computation again (a prefix hit rounds differently)
        b = engine.generate(input_ids=prompts, sampling_params=neutral, return_logprob=True)
        assert [o["output_ids"] for o in a] == [o["output_ids"] for o in b]
        assert [o["meta_info"]["output_token_logprobs"] for o in a] == [o["meta_info"]["output_token_logprobs"] for o in b]


def test_min_new_tokens_masks_stop_tokens_until_reached(tiny_qwen3):
    ids = prompt_ids(24, 9)
    with make_engine(tiny_qwen3) as engine:
        plain = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0, "ignore_eos": True})
        stop = plain["output_ids"][0]
        early = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0, "stop_token_ids": [stop]})
        assert early["output_ids"] == [stop]
        late = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 6, "temperature": 0, "stop_token_ids": [stop],
                                                               "min_new_tokens": 4})
        assert stop not in late["output_ids"][:4] and len(late["output_ids"]) >= 4


@pytest.mark.parametrize("bad", [{"frequency_penalty": 2.5}, {"presence_penalty": -3}, {"repetition_penalty": 0},
                                 {"min_new_tokens": -1}, {"logit_bias": {"5": 101}}, {"logit_bias": {"x": 1}},
                                 {"logit_bias": {"100000": 1}}, {"custom_params": [1]}])
def test_out_of_range_values_are_refused_by_name(tiny_qwen3, bad):
    with make_engine(tiny_qwen3) as engine:
        with pytest.raises(HotswapError) as exc:
            engine.generate(input_ids=[5, 6], sampling_params=dict(bad, max_new_tokens=2))
        assert next(iter(bad)) in str(exc.value)
