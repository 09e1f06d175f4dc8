"""Prompt logprobs (SGLang's input_token_logprobs / input_top_logprobs) against HF log_softmax over the
whole sequence: plain, across chunked prefill, and with a warm prefix cache."""

from __future__ import annotations

import pytest
import torch
from hf_reference import hf_model, prompt_ids

from hotswap import Engine, HotswapError

GREEDY = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}


def make_engine(path, **kw) -> Engine:
    kw.setdefault("page_size", 4)
    return Engine(str(path), device="cpu", **kw)


@torch.no_grad()
def hf_prompt_logprobs(path, ids: list[int]) -> torch.Tensor:
    """float64 [len(ids), V]: log_softmax of HF's logits at every prompt position."""
    logits = hf_model(str(path))(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), dim=-1)


def check_against_hf(path, ids: list[int], out: dict, start: int, top: int = 0) -> None:
    ref = hf_prompt_logprobs(path, ids)
    got = out["meta_info"]["input_token_logprobs"]
    assert [t for _, t, _ in got] == ids[start:]
    assert got[0][0] is None
    want = [ref[j - 1, ids[j]].item() for j in range(start + 1, len(ids))]
    torch.testing.assert_close(torch.tensor([lp for lp, _, _ in got[1:]], dtype=torch.float64), torch.tensor(want, dtype=torch.float64),
                               atol=1e-4, rtol=1e-4)
    if top:
        tops = out["meta_info"]["input_top_logprobs"]
        assert len(tops) == len(got) and tops[0] is None
        for j, row in zip(range(start + 1, len(ids)), tops[1:]):
            got_vals = torch.tensor([v for v, _, _ in row], dtype=torch.float64)
            torch.testing.assert_close(got_vals, ref[j - 1].topk(top).values, atol=1e-4, rtol=1e-4)
            # each id carries its own logprob (robust to near-ties swapping ids between ranks)
            torch.testing.assert_close(ref[j - 1, [t for _, t, _ in row]], got_vals, atol=1e-4, rtol=1e-4)
            assert len(row) == top


@pytest.mark.parametrize("start", [0, 5])
def test_prompt_logprobs_match_hf(tiny_qwen3, start):
    ids = prompt_ids(11, 23)
    with make_engine(tiny_qwen3) as engine:
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=start, top_logprobs_num=3)
        check_against_hf(tiny_qwen3, ids, out, start, top=3)
        assert len(out["meta_info"]["output_token_logprobs"]) == 3


def test_default_start_gives_only_the_last_prompt_token(tiny_qwen3):
    ids = prompt_ids(12, 9)
    with make_engine(tiny_qwen3) as engine:
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
        assert out["meta_info"]["input_token_logprobs"] == [(None, ids[-1], None)]
        assert "input_token_logprobs" not in engine.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]


def test_prompt_logprobs_across_chunked_prefill(tiny_qwen3):
    """Each chunk scores its own positions: a 37-token prompt in chunks of 8, in a batch with others."""
    prompts = [prompt_ids(13, 37), prompt_ids(14, 21)]
    with make_engine(tiny_qwen3, chunked_prefill_size=8, max_num_batched_tokens=8) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True, logprob_start_len=2, top_logprobs_num=2)
        for ids, out in zip(prompts, outs):
            check_against_hf(tiny_qwen3, ids, out, 2, top=2)
        assert engine.check_invariants().success


def test_prompt_logprobs_with_a_warm_prefix_cache(tiny_qwen3):
    """A cached prefix is recomputed from the logprob start on, so its positions still get logprobs;
    before the start the cache is used."""
    prefix = prompt_ids(15, 32)
    ids = prefix + prompt_ids(16, 6)
    with make_engine(tiny_qwen3) as engine:
        engine.generate(input_ids=ids, sampling_params=GREEDY)  # warms the cache with the whole prompt
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)
        check_against_hf(tiny_qwen3, ids, out, 0)
        assert out["meta_info"]["cached_tokens"] == 0
        out = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=20)
        check_against_hf(tiny_qwen3, ids, out, 20)
        assert 0 < out["meta_info"]["cached_tokens"] <= 20
        assert engine.check_invariants().success


def test_prompt_logprobs_streamed_once(tiny_qwen3):
    ids = prompt_ids(17, 12)
    with make_engine(tiny_qwen3) as engine:
        ref = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0)
        chunks = list(engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True, logprob_start_len=0, stream=True))
        assert chunks[-1]["meta_info"]["input_token_logprobs"] == ref["meta_info"]["input_token_logprobs"]


def test_logprob_start_len_is_validated(tiny_qwen3):
    with make_engine(tiny_qwen3) as engine:
        with pytest.raises(HotswapError, match="logprob_start_len"):
            engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, return_logprob=True, logprob_start_len=4)
        with pytest.raises(HotswapError, match="logprob_start_len"):
            engine.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, return_logprob=True, logprob_start_len=-2)


def test_prompt_logprobs_survive_preemption(tiny_qwen3):
    """A small KV pool preempts requests (mid-prefill too: chunks of 8); a recomputed chunk scores its
    positions again and each position keeps exactly one value."""
    prompts = [prompt_ids(40 + i, 30) for i in range(6)]
    sp = {"max_new_tokens": 40, "temperature": 0, "ignore_eos": True}
    with make_engine(tiny_qwen3, num_pages=40, chunked_prefill_size=8, max_num_batched_tokens=24) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=sp, return_logprob=True, logprob_start_len=0)
        assert engine.scheduler.batcher.num_preemptions > 0
        for ids, out in zip(prompts, outs):
            check_against_hf(tiny_qwen3, ids, out, 0)
        assert engine.check_invariants().success


@pytest.mark.parametrize("original", [False, True])
def test_prompt_logprobs_are_raw_under_temperature(tiny_qwen3, original):
    """SGLang's rule at temperature T: prompt logprobs are log_softmax(logits) whatever T
    (`layers/utils/logprob.py::compute_temp_top_p_normalized_logprobs` divides by T only when
    `temp_scaled_logprobs`, which `managers/schedule_batch.py::Req` leaves False), while output logprobs are
    log_softmax(logits / T) (`layers/sampler.py`), or the raw ones with SGLANG_RETURN_ORIGINAL_LOGPROB
    (our return_original_logprob). Checked against float64 log_softmax over HF's logits of the whole sequence."""
    ids, t = prompt_ids(18, 10), 0.5
    sp = {"max_new_tokens": 4, "temperature": t, "ignore_eos": True, "seed": 3}
    with make_engine(tiny_qwen3, return_original_logprob=original) as engine:
        out = engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True, logprob_start_len=0, top_logprobs_num=3)
    check_against_hf(tiny_qwen3, ids, out, 0, top=3)  # prompt: raw, at temperature 1
    full = ids + out["output_ids"]
    with torch.no_grad():
        logits = hf_model(str(tiny_qwen3))(torch.tensor([full])).logits[0].double()
    ref = torch.log_softmax(logits if original else logits / t, dim=-1)
    want = [ref[len(ids) - 1 + j, tok].item() for j, tok in enumerate(out["output_ids"])]
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(want, dtype=torch.float64), atol=1e-4, rtol=1e-4)
    raw = torch.log_softmax(logits, dim=-1)[len(ids) - 1 :]
    assert original or not torch.allclose(ref[len(ids) - 1 :], raw, atol=1e-2)  # the two rules differ here


def test_sglang_return_original_logprob_variable_is_honoured(tiny_qwen3, monkeypatch):
    """SGLang reads SGLANG_RETURN_ORIGINAL_LOGPROB from the environment (`layers/sampler.py`); frameworks and
    SGLang's own test_original_logprobs.py set it before launching: the same switch here (an explicit
    return_original_logprob argument wins)."""
    sp = {"max_new_tokens": 3, "temperature": 0.5, "ignore_eos": True, "seed": 5}
    ids = prompt_ids(19, 6)
    with make_engine(tiny_qwen3, return_original_logprob=True) as engine:
        raw = engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True)["meta_info"]["output_token_logprobs"]
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "True")
    with make_engine(tiny_qwen3) as engine:
        assert engine.config.return_original_logprob
        assert engine.generate(input_ids=ids, sampling_params=sp, return_logprob=True)["meta_info"]["output_token_logprobs"] == raw
    with make_engine(tiny_qwen3, return_original_logprob=False) as engine:
        assert not engine.config.return_original_logprob
    monkeypatch.setenv("SGLANG_RETURN_ORIGINAL_LOGPROB", "0")
    with make_engine(tiny_qwen3) as engine:
        assert not engine.config.return_original_logprob
