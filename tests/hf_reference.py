"""Hugging Face `transformers` as the reference: greedy tokens and per-step log-probabilities."""

from __future__ import annotations

from functools import lru_cache

import torch
from transformers import AutoModelForCausalLM

from hotswap.sampling_params import SamplingParams


@lru_cache(maxsize=8)
def hf_model(path: str):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@torch.no_grad()
def hf_greedy(path, input_ids: list[int], max_new_tokens: int) -> tuple[list[int], list[float]]:
    """Greedy continuation with no eos stop, and log_softmax of each chosen token."""
    model = hf_model(str(path))
    out = model.generate(torch.tensor([input_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
                         pad_token_id=0, output_scores=True, return_dict_in_generate=True, output_logits=True)
    ids = out.sequences[0, len(input_ids):].tolist()
    lps = [torch.log_softmax(step[0].float(), -1)[t].item() for step, t in zip(out.logits, ids)]
    return ids, lps


def reference_penalties(x: torch.Tensor, p: SamplingParams, prompt: list[int], output: list[int], banned: list[int]) -> torch.Tensor:
    """One row, float64, straight from the definitions, in the rule the request asks for. SGLang's (penaltylib:
    additive frequency and presence, then repetition over the output tokens only; logit_bias last,
    sampling_batch_info.py); vLLM's (v1/sample/sampler.py: logit_bias, then repetition over prompt and output,
    then frequency and presence)."""
    y = x.double().clone()

    def bias():
        for t, b in p.logit_bias.items():
            y[t] += b

    def repetition():
        for t in (set(prompt) if p.vllm_penalty_rule else set()) | set(output):
            y[t] = y[t] / p.repetition_penalty if y[t] > 0 else y[t] * p.repetition_penalty

    def counts():
        for t in set(output):
            y[t] -= p.frequency_penalty * output.count(t) + p.presence_penalty

    for step in (bias, repetition, counts) if p.vllm_penalty_rule else (counts, repetition, bias):
        step()
    for t in banned:
        y[t] = float("-inf")
    return y


@torch.no_grad()
def hf_penalized_greedy(path, ids: list[int], n: int, p: SamplingParams) -> tuple[list[int], list[float]]:
    """Greedy continuation of HF's logits under `p`'s penalties (float64), and each chosen token's logprob in the
    penalized distribution (what hotswap returns, as SGLang and vLLM's processed logprobs do)."""
    model = hf_model(str(path))
    out: list[int] = []
    lps: list[float] = []
    for _ in range(n):
        y = reference_penalties(model(torch.tensor([ids + out])).logits[0, -1], p, ids, out, [])
        out.append(int(y.argmax()))
        lps.append(torch.log_softmax(y, -1)[out[-1]].item())
    return out, lps


def assert_penalized_greedy_matches_hf(path, ids: list[int], out: dict, p: SamplingParams) -> None:
    """`out` (generated with return_logprob) holds the penalized greedy tokens of HF's logits and their logprobs."""
    ref_ids, ref_lps = hf_penalized_greedy(path, ids, p.max_new_tokens, p)
    assert out["output_ids"] == ref_ids
    got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
    torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), torch.tensor(ref_lps, dtype=torch.float64), atol=1e-4, rtol=1e-4)


def prompt_ids(seed: int, length: int, vocab: int = 500) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (length,), generator=g).tolist()


# Shared by the weight-update tests: a short greedy continuation of two prompts of different lengths.
UPDATE_GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
UPDATE_PROMPTS = [prompt_ids(1, 9), prompt_ids(2, 21)]


def greedy_ids(engine, prompts=UPDATE_PROMPTS) -> list[list[int]]:
    return [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=UPDATE_GREEDY)]


def reference_ids(path, prompts=UPDATE_PROMPTS) -> list[list[int]]:
    """HF's greedy tokens for the same prompts: what an engine holding `path`'s weights must produce."""
    return [hf_greedy(path, ids, UPDATE_GREEDY["max_new_tokens"])[0] for ids in prompts]


def assert_greedy_matches_hf(path, prompts: list[list[int]], outs: list[dict], max_new_tokens: int) -> None:
    """Each output (generated with return_logprob) holds HF's greedy tokens for its prompt, and HF's
    log-probabilities within 1e-4."""
    assert len(outs) == len(prompts)
    for ids, out in zip(prompts, outs):
        ref_ids, ref_lps = hf_greedy(path, ids, max_new_tokens)
        assert out["output_ids"] == ref_ids
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        torch.testing.assert_close(torch.tensor(got), torch.tensor(ref_lps), atol=1e-4, rtol=1e-4)


def assert_bf16_greedy_agrees(hf, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """bf16 kernels round differently from HF's op-by-op bf16, so exact token equality can break at a
    near-tie. Each of our greedy tokens is judged against HF's bf16 logits (`hf` on CUDA), teacher-forced on
    our own sequence: it must be HF's argmax, or within bf16 rounding (1% of the logit scale) of HF's
    maximum; the first token (prefill only) must match exactly."""
    for ids, ours in zip(prompts, outputs):
        with torch.no_grad():
            logits = hf(torch.tensor([ids + ours], device="cuda")).logits[0, len(ids) - 1 : -1].float()
        assert ours[0] == logits[0].argmax().item()
        best = logits.max(-1).values
        mine = logits.gather(1, torch.tensor(ours, device="cuda").unsqueeze(1)).squeeze(1)
        assert bool(((best - mine) <= 0.01 * logits.abs().max(-1).values).all()), (best - mine).tolist()


def assert_bf16_greedy_within_hf_rounding(path, prompts: list[list[int]], outputs: list[list[int]]) -> None:
    """Judges bf16 greedy tokens by HF's own bf16 error instead of a fixed share of the logit scale: teacher-forced on
    our sequence, HF's float32 logits are the truth and |HF bf16 - HF float32| (its largest over the vocabulary, per
    position) the rounding a bf16 model carries there. Each of our tokens must be within twice that of the float32
    maximum: a token some bf16 rounding may rank first."""
    models = {dt: AutoModelForCausalLM.from_pretrained(path, dtype=dt).cuda().eval() for dt in (torch.float32, torch.bfloat16)}
    for ids, ours in zip(prompts, outputs):
        seq = torch.tensor([ids + ours], device="cuda")
        with torch.no_grad():
            exact, rounded = (models[dt](seq).logits[0, len(ids) - 1 : -1].float() for dt in (torch.float32, torch.bfloat16))
        noise = (rounded - exact).abs().max(-1).values
        gap = exact.max(-1).values - exact.gather(1, torch.tensor(ours, device="cuda").unsqueeze(1)).squeeze(1)
        assert bool((gap <= 2 * noise).all()), list(zip(gap.tolist(), noise.tolist()))
