"""The sampler: the PyTorch reference against float64 and its own definitions, the fused Triton kernels
against the reference at real sizes on a GPU (in Triton's interpreter on the CPU: test_sampling_interpreted.py), graph buckets."""

from __future__ import annotations

import math

import pytest
import torch

from hotswap.runner.cuda_graph import graph_bucket, graph_buckets
from hotswap.runner.sampler import SamplingBatch, gumbel_noise, kept, reference_sample


def batch(temps, top_ks, top_ps, min_ps, seeds=None, steps=None, logprobs=True, original=False, device="cpu") -> SamplingBatch:
    n = len(temps)
    f = lambda v: torch.tensor(v, dtype=torch.float32, device=device)
    i = lambda v: torch.tensor(v, dtype=torch.int64, device=device)
    return SamplingBatch(temperatures=f(temps), top_ks=i(top_ks), top_ps=f(top_ps), min_ps=f(min_ps),
                         seeds=i(seeds if seeds is not None else [17 * r + 3 for r in range(n)]),
                         steps=i(steps if steps is not None else list(range(n))), all_greedy=False, needs_filter=True,
                         needs_logprobs=logprobs, max_top_logprobs=0, original_logprobs=original)


def kept_by_definition(x: list[float], t: float, k: int, p: float, min_p: float) -> set[int]:
    """float64, token by token: the set kernels/sampling.py documents."""
    m = max(x)
    mass = [math.exp((v - m) / t) for v in x]
    total = sum(mass)
    kth = sorted(x, reverse=True)[k - 1] if k < len(x) else -math.inf
    out = set()
    for i, v in enumerate(x):
        above = sum(w for u, w in zip(x, mass) if u > v)
        if v >= kth and above <= p * total + 1e-9 * total and (v - m) / t >= (math.log(min_p) if min_p > 0 else -math.inf):
            out.add(i)
    return out


@pytest.mark.parametrize("original", [False, True])
def test_logprobs_equal_a_float64_reference(original):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 300, generator=g) * 4
    temps = [0.0, 1.0, 0.6, 1.7, 1.0, 0.3]
    sb = batch(temps, [300, 300, 10, 300, 300, 40], [1.0, 1.0, 1.0, 0.7, 0.9, 1.0], [0.0, 0.0, 0.0, 0.0, 0.1, 0.0], original=original)
    ids, lps, lse = reference_sample(x, sb)
    te = torch.tensor([1.0 if original or t == 0 else t for t in temps], dtype=torch.float64)
    ref = torch.log_softmax(x.double() / te.unsqueeze(1), dim=-1)
    torch.testing.assert_close(lps.double(), ref.gather(1, ids.unsqueeze(1)).squeeze(1), atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double() / te.unsqueeze(1), dim=-1), atol=2e-5, rtol=0)
    assert ids[0] == x[0].argmax()  # the greedy row


def test_kept_set_is_its_definition_with_ties():
    """Integer-valued logits make ties at every boundary; the kept set is whole tie groups."""
    g = torch.Generator().manual_seed(2)
    cases = [(0.7, 5, 1.0, 0.0), (1.0, 64, 0.6, 0.0), (1.3, 64, 1.0, 0.2), (0.9, 8, 0.85, 0.05), (1.0, 3, 0.3, 0.0), (2.0, 64, 0.95, 0.01)]
    x = torch.randint(-4, 5, (len(cases), 64), generator=g).float()
    t, k, p, mp = (list(c) for c in zip(*cases))
    mask = kept(x, torch.tensor(t).unsqueeze(1), batch(t, k, p, mp))
    for r, (tr, kr, pr, mr) in enumerate(cases):
        got = set(torch.nonzero(mask[r]).flatten().tolist())
        assert got == kept_by_definition(x[r].tolist(), tr, kr, pr, mr), cases[r]
        assert int(x[r].argmax()) in got


def test_top_k_keeps_the_whole_tie_group_at_its_boundary():
    x = torch.tensor([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    mask = kept(x, torch.ones(1, 1), batch([1.0], [2], [1.0], [0.0]))
    assert mask[0].tolist() == [True, True, True, True, False, False]


def test_sampled_rows_never_leave_the_kept_set_and_follow_the_distribution():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(1, 64, generator=g) * 2
    rows = 4000
    sb = batch([0.8] * rows, [10] * rows, [0.9] * rows, [0.02] * rows, seeds=list(range(rows)), steps=[0] * rows, logprobs=False)
    ids, _, _ = reference_sample(logits.expand(rows, -1).contiguous(), sb)
    allowed = kept(logits, torch.full((1, 1), 0.8), batch([0.8], [10], [0.9], [0.02]))[0]
    assert allowed[ids].all() and len(set(ids.tolist())) > 1
    probs = torch.softmax(logits[0] / 0.8, -1) * allowed
    counts = torch.bincount(ids, minlength=64).float() / rows
    torch.testing.assert_close(counts, probs / probs.sum(), atol=0.03, rtol=0)


def test_seeded_rows_draw_the_same_token_in_any_batch():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(5, 200, generator=g)
    sb = batch([1.0, 0.7, 1.0, 1.2, 0.5], [200, 20, 200, 200, 200], [1.0, 1.0, 0.8, 1.0, 1.0], [0.0] * 5, seeds=[9, 8, 7, 6, 5], steps=[3, 3, 1, 0, 2])
    together, _, _ = reference_sample(x, sb)
    for r in range(5):
        alone = batch([sb.temperatures[r].item()], [sb.top_ks[r].item()], [sb.top_ps[r].item()], [0.0], seeds=[sb.seeds[r].item()], steps=[sb.steps[r].item()])
        assert reference_sample(x[r : r + 1], alone)[0].item() == together[r].item()


def test_noise_is_the_counter_hash_of_seed_step_and_token():
    a = gumbel_noise(torch.tensor([5, 5, 6]), torch.tensor([0, 1, 0]), 1000)
    b = gumbel_noise(torch.tensor([6, 5]), torch.tensor([0, 0]), 1000)
    assert torch.equal(a[0], b[1]) and torch.equal(a[2], b[0]) and not torch.equal(a[0], a[1])
    assert abs(a.mean().item() - 0.5772) < 0.05  # Gumbel(0, 1) has mean Euler's gamma


def test_graph_buckets_reach_max_running_requests():
    assert graph_buckets(256)[-3:] == [192, 224, 256]
    assert graph_buckets(300)[-2:] == [256, 300]
    assert graph_buckets(1000)[-5:] == [512, 640, 768, 896, 1000]
    assert graph_buckets(1) == [1]
    assert all(a < b for a, b in zip(graph_buckets(1000), graph_buckets(1000)[1:]))


def test_a_batch_replays_in_the_smallest_bucket_that_holds_it():
    buckets = graph_buckets(300)
    assert [graph_bucket(buckets, n) for n in (1, 3, 4, 5, 256, 257, 300)] == [1, 4, 4, 8, 256, 300, 300]


@torch.no_grad()
def assert_logprobs_match_float64(path, outs, prompts, temperature: float, original: bool) -> None:
    """Each sampled token's logprob against HF's logits in float64: of the raw distribution (`original`,
    SGLang's SGLANG_RETURN_ORIGINAL_LOGPROB) or of the temperature-scaled one (SGLang's default)."""
    from hf_reference import hf_model

    model = hf_model(str(path))
    scale = 1.0 if original else temperature
    for out, ids in zip(outs, prompts):
        got = [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]
        toks = out["output_ids"]
        logits = model(torch.tensor([ids + toks])).logits[0, len(ids) - 1 : -1].double()
        want = torch.log_softmax(logits / scale, dim=-1).gather(1, torch.tensor(toks).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(torch.tensor(got, dtype=torch.float64), want, atol=1e-4, rtol=0)


ORIGINAL_PROMPTS = [[5, 9, 14, 3, 77], [40, 2, 8]]
ORIGINAL_PARAMS = {"max_new_tokens": 8, "temperature": 0.7, "seed": 5, "ignore_eos": True}


def test_return_original_logprob_reaches_the_eager_sampler(tiny_qwen3):
    """The engine config switches between raw and temperature-scaled logprobs; the tokens do not change."""
    from hotswap import Engine

    outs = {}
    for original in (False, True):
        with Engine(str(tiny_qwen3), device="cpu", page_size=4, return_original_logprob=original) as engine:
            outs[original] = engine.generate(input_ids=ORIGINAL_PROMPTS, sampling_params=ORIGINAL_PARAMS, return_logprob=True)
        assert_logprobs_match_float64(tiny_qwen3, outs[original], ORIGINAL_PROMPTS, 0.7, original)
    assert [o["output_ids"] for o in outs[False]] == [o["output_ids"] for o in outs[True]]


@pytest.mark.gpu
def test_gpu_return_original_logprob_reaches_the_graph_sampler(tiny_qwen3):
    """The same on CUDA, where the decode steps sample inside the CUDA graphs."""
    from hotswap import Engine

    for original in (False, True):
        with Engine(str(tiny_qwen3), device="cuda", dtype="float32", return_original_logprob=original) as engine:
            graphs = engine.model_runner.cuda_graphs
            replays = []
            real = graphs.replay
            graphs.replay = lambda hb, fix, rows, prev=None: (replays.append(len(hb.input_ids)), real(hb, fix, rows, prev))[1]
            outs = engine.generate(input_ids=ORIGINAL_PROMPTS, sampling_params=ORIGINAL_PARAMS, return_logprob=True)
        assert len(replays) >= ORIGINAL_PARAMS["max_new_tokens"] - 1  # every decode step ran a graph
        assert_logprobs_match_float64(tiny_qwen3, outs, ORIGINAL_PROMPTS, 0.7, original)


# ---- real sizes, on a GPU ----

V_REAL = 151936


def _real_logits(rows: int, seed: int) -> torch.Tensor:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return (torch.randn(rows, V_REAL, device="cuda", generator=g) * 3).to(torch.bfloat16)


def _rows(n: int, filtered: bool) -> SamplingBatch:
    temps = [0.0 if r % 7 == 0 else 0.6 + (r % 5) * 0.2 for r in range(n)]
    ks = [[V_REAL, 50, V_REAL, 20][r % 4] if filtered else V_REAL for r in range(n)]
    ps = [[1.0, 1.0, 0.9, 0.95][r % 4] if filtered else 1.0 for r in range(n)]
    mps = [[0.0, 0.0, 0.0, 0.05][r % 4] if filtered else 0.0 for r in range(n)]
    return batch(temps, ks, ps, mps, seeds=[1000 + r for r in range(n)], steps=[r % 11 for r in range(n)], device="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 64, 512])
@pytest.mark.parametrize("filtered", [False, True])
def test_gpu_kernels_match_the_reference_at_real_sizes(rows, filtered):
    from hotswap.kernels import sampling

    x = _real_logits(rows, rows)
    sb = _rows(rows, filtered)
    out = torch.full((rows,), -7, dtype=torch.int64, device="cuda")  # poisoned: every row must be written
    ids, lps, lse = sampling.sample_rows(x, sb.temperatures, sb.top_ks, sb.top_ps, sb.min_ps, sb.seeds, sb.steps, original=False, out_ids=out)
    rids, _, _ = reference_sample(x, sb)
    assert (ids >= 0).all()
    assert (ids == rids).float().mean().item() >= 0.998  # only float32 near-ties may differ (log implementations)
    te = torch.where(sb.temperatures > 0, sb.temperatures, 1.0).double().unsqueeze(1)
    ref = torch.log_softmax(x.double() / te, dim=-1)
    torch.testing.assert_close(lps.double(), ref.gather(1, ids.unsqueeze(1)).squeeze(1), atol=1e-4, rtol=0)
    torch.testing.assert_close(lse.double(), torch.logsumexp(x.double() / te, dim=-1), atol=1e-4, rtol=1e-6)
    if filtered:
        allowed = kept(x.float(), sb.temperatures.clamp_min(1e-5).unsqueeze(1), sb)
        sampled = sb.temperatures > 0
        assert allowed.gather(1, ids.unsqueeze(1)).squeeze(1)[sampled].all()


@pytest.mark.gpu
def test_gpu_kernels_are_batch_invariant_and_never_leave_the_filter_set():
    from hotswap.kernels import sampling

    x = _real_logits(1, 9).expand(512, -1).contiguous()
    n = 512
    sb = batch([0.9] * n, [40] * n, [0.8] * n, [0.01] * n, seeds=list(range(n)), steps=[0] * n, device="cuda")
    ids, _, _ = sampling.sample_rows(x, sb.temperatures, sb.top_ks, sb.top_ps, sb.min_ps, sb.seeds, sb.steps, original=False)
    allowed = kept(x[:1].float(), torch.full((1, 1), 0.9, device="cuda"), batch([0.9], [40], [0.8], [0.01], device="cuda"))[0]
    assert allowed[ids].all() and len(set(ids.tolist())) > 1
    for r in (0, 17, 511):
        one = sampling.sample_rows(x[r : r + 1], sb.temperatures[r : r + 1], sb.top_ks[r : r + 1], sb.top_ps[r : r + 1],
                                   sb.min_ps[r : r + 1], sb.seeds[r : r + 1], sb.steps[r : r + 1], original=False)[0]
        assert one.item() == ids[r].item()


@pytest.mark.gpu
def test_gpu_kernels_sample_the_distribution():
    from hotswap.kernels import sampling

    rows = 20000
    x = torch.full((1, V_REAL), -40.0, device="cuda")
    x[0, :4] = torch.tensor([2.0, 1.0, 0.0, -1.0], device="cuda")
    x = x.to(torch.bfloat16).expand(rows, -1).contiguous()
    sb = batch([1.0] * rows, [V_REAL] * rows, [1.0] * rows, [0.0] * rows, seeds=list(range(rows)), steps=[0] * rows, device="cuda")
    ids, _, _ = sampling.sample_rows(x, sb.temperatures, sb.top_ks, sb.top_ps, sb.min_ps, sb.seeds, sb.steps, original=False)
    counts = torch.bincount(ids, minlength=4)[:4].float().cpu() / rows
    torch.testing.assert_close(counts, torch.softmax(torch.tensor([2.0, 1.0, 0.0, -1.0]), -1), atol=0.015, rtol=0)


@pytest.mark.gpu
def test_gpu_decode_graphs_reach_max_running_requests_and_sample_inside(tiny_qwen3):
    """600 sequences in flight replay a 600-row decode graph (not eager), sampled with logprobs inside it."""
    from hotswap import Engine

    with Engine(str(tiny_qwen3), device="cuda", dtype="float32", max_running_requests=600, num_pages=4096) as eng:
        graphs = eng.model_runner.cuda_graphs
        assert graphs.buckets[-1] == 600
        rows = []
        real = graphs.replay
        graphs.replay = lambda hb, fix, params, prev=None: (rows.append(len(hb.input_ids)), real(hb, fix, params, prev))[1]
        outs = eng.generate(input_ids=[[5 + i % 50, 7, 9] for i in range(600)],
                            sampling_params={"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True, "seed": 11},
                            return_logprob=True)
        assert max(rows) == 600
        for o in outs:
            lps = [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]
            assert len(o["output_ids"]) == 6 and all(math.isfinite(lp) and lp <= 0 for lp in lps)
