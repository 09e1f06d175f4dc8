"""The sampled token's keep-set (slime's `custom_params.return_top_p_token_ids`): per output token, the ids
top-k / top-p / min-p kept, returned as slime's base64 int32 `top_p_token_ids` + `top_p_token_offsets`."""

from __future__ import annotations

import base64

import numpy as np
import torch
from hf_reference import hf_model, prompt_ids

from hotswap import Engine
from hotswap.runner.sampler import MIN_TEMPERATURE, SamplingBatch, kept, sample


def decode_sets(meta: dict) -> list[list[int]]:
    """As slime's trainer reads them."""
    ids = np.frombuffer(base64.b64decode(meta["top_p_token_ids"]), dtype="<i4")
    offsets = np.frombuffer(base64.b64decode(meta["top_p_token_offsets"]), dtype="<i4")
    return [ids[a:b].tolist() for a, b in zip(offsets[:-1], offsets[1:])]


def batch(temps, top_ks, top_ps, min_ps, keep_greedy, keep_filtered) -> SamplingBatch:
    n = len(temps)
    return SamplingBatch(torch.tensor(temps), torch.tensor(top_ps), torch.tensor(top_ks), torch.tensor(min_ps),
                         torch.arange(n) + 11, torch.arange(n), all_greedy=False, needs_filter=True, needs_logprobs=False,
                         max_top_logprobs=0, keep_greedy_rows=keep_greedy, keep_filtered_rows=keep_filtered)


def test_keep_sets_are_the_filter_definition_and_hold_the_sampled_token():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(5, 300, generator=g) * 2
    sb = batch([0.0, 0.8, 1.2, 1.0, 1.0], [300, 7, 300, 40, 300], [1.0, 1.0, 0.7, 0.9, 1.0], [0.0, 0.0, 0.0, 0.05, 0.0],
               keep_greedy=[0], keep_filtered=[1, 2, 3])
    res = sample(x, sb)
    sets = res.keep_sets()
    assert sets[0] == [res.token_ids[0].item()] and sets[4] is None
    mask = kept(x, sb.temperatures.clamp_min(MIN_TEMPERATURE).unsqueeze(1), sb)
    for r in (1, 2, 3):
        assert res.token_ids[r].item() in sets[r]
        assert sets[r] == mask[r].nonzero().squeeze(1).tolist()
    assert len(sets[1]) == 7


@torch.no_grad()
def test_engine_returns_each_tokens_keep_set(tiny_qwen3):
    ids = prompt_ids(31, 8)
    sp = {"max_new_tokens": 6, "temperature": 0.9, "top_k": 20, "top_p": 0.9, "seed": 3, "ignore_eos": True,
          "custom_params": {"return_top_p_token_ids": True}}
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as engine:
        out = engine.generate(input_ids=ids, sampling_params=sp)
        sets = decode_sets(out["meta_info"])
        assert len(sets) == len(out["output_ids"]) == 6
        model = hf_model(str(tiny_qwen3))
        for i, (tok, got) in enumerate(zip(out["output_ids"], sets)):
            assert tok in got and 1 <= len(got) <= 20
            logits = model(torch.tensor([ids + out["output_ids"][:i]])).logits[0, -1:].float()
            sb = batch([0.9], [20], [0.9], [0.0], [], [0])
            assert got == kept(logits, torch.tensor([[0.9]]), sb)[0].nonzero().squeeze(1).tolist()

        greedy = engine.generate(input_ids=ids, sampling_params=dict(sp, temperature=0))
        assert decode_sets(greedy["meta_info"]) == [[t] for t in greedy["output_ids"]]
        unfiltered = engine.generate(input_ids=ids, sampling_params=dict(sp, top_k=-1, top_p=1.0))
        assert "top_p_token_ids" not in unfiltered["meta_info"]  # nothing was filtered: slime gets no set
        assert "top_p_token_ids" not in engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 2})["meta_info"]
