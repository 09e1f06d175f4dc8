"""The fused sampling kernels on small rows through Triton's interpreter on the CPU, against the PyTorch reference:
greedy, plain, top-k, top-p, min-p, all three, a tie at the top-k boundary, in bf16 and float32, and the
unfiltered fast path. Only under TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs it so in CI, in the
one interpreter process the other kernel tests share); on a GPU, tests/test_sampling.py checks real sizes."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from hotswap.kernels import sampling  # noqa: E402
from hotswap.runner.sampler import SamplingBatch, reference_sample  # noqa: E402


def test_kernels_match_the_reference_in_the_triton_interpreter(monkeypatch):
    monkeypatch.setattr(sampling, "_CHUNK", 64)  # several chunks per row, several loop steps per search
    monkeypatch.setattr(sampling, "_BLOCK", 32)
    g = torch.Generator().manual_seed(5)
    V = 150
    temps = torch.tensor([0.0, 1.0, 0.7, 1.3, 1.0, 0.5, 1.0])  # greedy, plain, top-k, top-p, all three, min-p, top-k tie
    topk = torch.tensor([V, V, 5, V, 20, V, 2])
    topp = torch.tensor([1.0, 1.0, 1.0, 0.8, 0.9, 1.0, 1.0])
    minp = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.05, 0.1, 0.0])
    seeds = torch.tensor([1, 2, 3, -4, 2**40 + 5, 6, 7])
    steps = torch.tensor([0, 5, 9, 1, 2, 3, 4])
    for dtype, original in ((torch.bfloat16, False), (torch.float32, True)):
        x = (torch.randn(7, V, generator=g) * 3).to(dtype)
        x[6, :3] = x[6, :3].max()  # a tie at the top-k boundary
        sb = SamplingBatch(temperatures=temps, top_ps=topp, top_ks=topk, min_ps=minp, seeds=seeds, steps=steps,
                           all_greedy=False, needs_filter=True, needs_logprobs=True, max_top_logprobs=0, original_logprobs=original)
        ids, lps, lse = sampling.sample_rows(x, temps, topk, topp, minp, seeds, steps, original=original)
        rids, rlps, rlse = reference_sample(x, sb)
        assert torch.equal(ids, rids), (dtype, original, ids, rids)
        torch.testing.assert_close(lps, rlps, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse, rlse, atol=1e-5, rtol=1e-5)
        ids, lps, _ = sampling.sample_rows(x, None, None, None, None, None, None, original=False)
        assert torch.equal(ids, x.float().argmax(-1))
        torch.testing.assert_close(lps, torch.log_softmax(x.float(), -1).gather(1, ids[:, None])[:, 0], atol=1e-5, rtol=1e-5)
