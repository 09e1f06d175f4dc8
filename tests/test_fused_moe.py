"""The MoE layer math: the router against transformers', the expert alignment, and the fused Triton
kernels against the PyTorch reference (on CUDA; on the CPU through Triton's interpreter when asked)."""

from __future__ import annotations

import os

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts, Qwen3MoeTopKRouter

from hotswap.kernels import arrival, fused_moe

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def _layer(t: int, e: int, k: int, h: int, i: int, dtype: torch.dtype, device: str, seed: int = 0):
    """x, the stacked experts and the router's logits of one random layer."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(device, dtype)
    w_gate_up = (torch.randn(e, 2 * i, h, generator=g) * h**-0.5).to(device, dtype)
    w_down = (torch.randn(e, h, i, generator=g) * i**-0.5).to(device, dtype)
    logits = torch.nn.functional.linear(x, torch.randn(e, h, generator=g).to(device, dtype))
    return x, w_gate_up, w_down, logits


def _reference(x, w_gate_up, w_down, logits, k, renormalize=True):
    """The layer in PyTorch (float32): torch's router on the same logits, the per-expert loop."""
    weights, ids = fused_moe.topk_softmax_reference(logits, k, renormalize)
    return fused_moe.moe_reference(x.float(), w_gate_up.float(), w_down.float(), weights.float(), ids), ids


def _grouped(x, w_gate_up, w_down, logits, k, renormalize=True):
    """The large-batch path at any size (fused_moe picks it above SMALL_BATCH_MAX_TOKENS only)."""
    return fused_moe._moe_grouped(x, w_gate_up, w_down, *fused_moe.topk_softmax(logits, k, renormalize))


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_and_reference_equal_transformers(norm_topk_prob):
    cfg = Qwen3MoeConfig(hidden_size=32, num_experts=8, num_experts_per_tok=3, moe_intermediate_size=16, norm_topk_prob=norm_topk_prob)
    router, experts = Qwen3MoeTopKRouter(cfg), Qwen3MoeExperts(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in (router.weight, experts.gate_up_proj, experts.down_proj):
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        x = torch.randn(21, 32, generator=g)
        _, hf_weights, hf_ids = router(x)
        weights, ids = fused_moe.topk_softmax_reference(torch.nn.functional.linear(x, router.weight), 3, norm_topk_prob)
        assert torch.equal(ids, hf_ids) and torch.equal(weights, hf_weights)
        ours = fused_moe.moe_reference(x, experts.gate_up_proj, experts.down_proj, weights, ids)
        torch.testing.assert_close(ours, experts(x, hf_ids, hf_weights), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("t,e,k,block_m", [(1, 8, 1, 16), (5, 8, 8, 16), (37, 16, 4, 32), (300, 64, 8, 64)])
def test_align_by_expert_groups_every_pair_once(t, e, k, block_m):
    ids = torch.stack([torch.randperm(e, generator=torch.Generator().manual_seed(s))[:k] for s in range(t)])
    sorted_pairs, block_expert = fused_moe.align_by_expert(ids, e, block_m)
    p = t * k
    real = sorted_pairs[sorted_pairs < p]
    assert sorted(real.tolist()) == list(range(p))
    assert sorted_pairs.numel() % block_m == 0 and block_expert.numel() == sorted_pairs.numel() // block_m
    for b, expert in enumerate(block_expert.tolist()):
        rows = sorted_pairs[b * block_m : (b + 1) * block_m]
        pairs = rows[rows < p]
        if expert < 0:
            assert pairs.numel() == 0
        else:
            assert pairs.numel() > 0 and bool((ids.reshape(-1)[pairs.long()] == expert).all())
    used = block_expert[block_expert >= 0]
    assert bool((used[1:] > used[:-1]).all())  # each expert's run is one stretch of blocks, in expert order


def test_bad_layer_arguments_are_refused_by_name(monkeypatch):
    """Checked before any kernel runs (no Triton needed): a norm for a path that cannot apply it, logits of another
    shape, a routed-experts table the kernels cannot write, more column blocks than the arrival counters."""
    x, w_gate_up, w_down, logits = _layer(9, 8, 2, 32, 16, torch.float32, "cpu")
    norm = fused_moe.InputNorm(torch.ones(32), 1e-6)
    with pytest.raises(ValueError, match="already normalised"):
        fused_moe.moe(x, w_gate_up, w_down, logits, 2, True, norm)
    with pytest.raises(ValueError, match="grouped MoE path"):
        fused_moe.fused_moe(x, w_gate_up, w_down, logits, 2, True, norm)
    with pytest.raises(ValueError, match=r"router logits \(2, 4\) do not match 2 tokens x 8 experts"):
        fused_moe.moe_pairs(x[:2], w_gate_up, w_down, logits[:2, :4], 2, True)
    with pytest.raises(ValueError, match="must be int32"):
        fused_moe.moe_pairs(x[:2], w_gate_up, w_down, logits[:2], 2, True,
                            routed=fused_moe.RoutedWrite(torch.zeros(4, 2, 2, dtype=torch.int64), torch.arange(2), 0))
    monkeypatch.setattr(arrival, "SIZE", 1)
    with pytest.raises(ValueError, match="exceed the 1 arrival counters"):
        fused_moe.moe_pairs(x[:2], w_gate_up, w_down, logits[:2], 2, True)


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter run: set TRITON_INTERPRET=1 to check the kernels on the CPU")
@pytest.mark.parametrize("t,e,k", [(1, 8, 1), (3, 8, 2), (12, 8, 3), (2, 128, 8)])
def test_kernels_in_the_interpreter(t, e, k):
    x, w_gate_up, w_down, logits = _layer(t, e, k, 32, 16, torch.float32, "cpu")
    ref, _ = _reference(x, w_gate_up, w_down, logits, k)
    small = fused_moe.PairsBlocks(gate_up_n=8, gate_up_k=16, down_n=16, down_k=8)  # several tiles per row and slot
    for path in (fused_moe.moe_pairs, _grouped, lambda *a: fused_moe.moe_pairs(*a, blocks=small)):
        torch.testing.assert_close(path(x, w_gate_up, w_down, logits, k, True), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter run: set TRITON_INTERPRET=1 to check the kernels on the CPU")
@pytest.mark.parametrize("t,e,k,renormalize", [(1, 8, 2, True), (3, 16, 4, False), (2, 128, 8, True)])
def test_decode_kernels_route_normalise_and_record_in_the_interpreter(t, e, k, renormalize):
    """The decode kernels route each token themselves: the output (its top-k sum made by the last of a token's
    k programs to finish), the experts written to the routed-experts table at each token's slot and layer, and
    the RMSNorm they apply to x equal torch's router, the torch norm and the per-expert loop; rows of other
    slots and layers stay as they were."""
    x, w_gate_up, w_down, logits = _layer(t, e, k, 32, 24, torch.float32, "cpu", seed=t + e)
    norm_w = torch.rand(32) + 0.5
    h = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm_w
    ref, ids = _reference(h, w_gate_up, w_down, logits, k, renormalize)
    table = torch.full((20, 3, k), -7, dtype=torch.int32)
    slots = torch.randperm(20)[:t]
    routed = fused_moe.RoutedWrite(table, slots, layer=1)
    small = fused_moe.PairsBlocks(gate_up_n=8, gate_up_k=16, down_n=8, down_k=16)
    for blocks in (None, small):
        table.fill_(-7)
        out = fused_moe.moe_pairs(x, w_gate_up, w_down, logits, k, renormalize, fused_moe.InputNorm(norm_w, 1e-6), routed,
                                  blocks=blocks)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        assert int(arrival.counters(x.device).abs().sum()) == 0  # the top-k sum's counters zeroed for the next launch
        assert torch.equal(table[slots, 1], ids.to(torch.int32))
        untouched = torch.ones(20, 3, dtype=torch.bool)
        untouched[slots, 1] = False
        assert bool((table[untouched] == -7).all())


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter run: set TRITON_INTERPRET=1 to check the kernels on the CPU")
def test_routing_kernel_records_the_routed_experts_in_the_interpreter():
    logits = torch.randn(11, 16, generator=torch.Generator().manual_seed(3))
    table = torch.zeros(30, 4, 6, dtype=torch.int32)
    slots = torch.randperm(30)[:11]
    _, ids = fused_moe.topk_softmax(logits, 6, True, fused_moe.RoutedWrite(table, slots, layer=2))
    assert torch.equal(ids, fused_moe.topk_softmax_reference(logits, 6, True)[1])
    assert torch.equal(table[slots, 2], ids.to(torch.int32)) and int(table.abs().sum()) == int(ids.sum())


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter run: set TRITON_INTERPRET=1 to check the kernels on the CPU")
@pytest.mark.parametrize("t,e,k,renormalize", [(1, 8, 1, True), (5, 60, 4, False), (7, 128, 8, True), (3, 6, 6, True)])
def test_topk_softmax_kernel_equals_the_torch_router(t, e, k, renormalize):
    """Same experts in the same order and the same weights as softmax -> topk -> renormalise in torch."""
    logits = torch.randn(t, e, generator=torch.Generator().manual_seed(e + k))
    want_w, want_ids = fused_moe.topk_softmax_reference(logits, k, renormalize)
    weights, ids = fused_moe.topk_softmax(logits, k, renormalize)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_w, rtol=1e-6, atol=1e-7)


def _nan_rows_pick_real_experts(e: int, k: int, device: str) -> None:
    logits = torch.randn(4, e, generator=torch.Generator().manual_seed(e)).to(device)
    logits[1, 2], logits[2, 0], logits[3] = float("nan"), float("inf"), float("-inf")
    for renormalize in (True, False):
        weights, ids = fused_moe.topk_softmax(logits, k, renormalize)
        want_w, want_ids = fused_moe.topk_softmax_reference(logits, k, renormalize)  # torch's router on the same logits
        assert torch.equal(ids[0], want_ids[0])
        torch.testing.assert_close(weights[0], want_w[0], rtol=1e-6, atol=1e-7)
        assert bool(((ids >= 0) & (ids < e)).all()) and all(len(set(r)) == k for r in ids.tolist())
        assert bool(weights[1:].isnan().all()) and bool(want_w[1:].isnan().all())


@pytest.mark.skipif(not INTERPRET, reason="Triton interpreter run: set TRITON_INTERPRET=1 to check the kernels on the CPU")
@pytest.mark.parametrize("e,k", [(5, 1), (5, 5), (8, 3)])
def test_topk_softmax_kernel_picks_real_experts_for_a_nan_or_infinite_row(e, k):
    """A NaN or infinite logit (weights gone bad) makes the row's probabilities NaN, as in torch: the kernel still
    picks k distinct experts below E (an id past them makes the expert kernels read outside the weights) with NaN
    weights, and the other rows are untouched."""
    _nan_rows_pick_real_experts(e, k, "cpu")


GPU_SHAPES = [  # tokens, experts, top-k, hidden, intermediate
    (1, 8, 1, 256, 128), (1, 128, 8, 2048, 768), (4, 64, 6, 512, 256), (8, 128, 8, 2048, 768),
    (9, 8, 2, 256, 192), (64, 128, 8, 2048, 768), (517, 32, 4, 1024, 512), (2048, 16, 1, 512, 256),
    (8192, 128, 8, 2048, 768),
]


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k,h,i", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_moe_equals_reference_on_cuda(t, e, k, h, i, dtype):
    x, w_gate_up, w_down, logits = _layer(t, e, k, h, i, dtype, "cuda", seed=t + e + k)
    out = fused_moe.fused_moe(x, w_gate_up, w_down, logits, k, True)
    assert out.dtype == dtype and out.shape == x.shape
    ref, _ = _reference(x, w_gate_up, w_down, logits, k)
    err = ((out.float() - ref).norm() / ref.norm()).item()
    assert err < (1e-2 if dtype == torch.bfloat16 else 1e-5), err
    for path in (fused_moe.moe_pairs, _grouped):  # both paths at every size
        if t <= 64:
            got = path(x, w_gate_up, w_down, logits, k, True).float()
            assert ((got - ref).norm() / ref.norm()).item() < (1e-2 if dtype == torch.bfloat16 else 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8, 64])
def test_fused_moe_normalises_and_records_routing_on_cuda(t):
    """bf16 on the device: the decode kernels' own RMSNorm and both paths' routed-experts table writes."""
    e, k, h, i = 128, 8, 2048, 768
    x, w_gate_up, w_down, _ = _layer(t, e, k, h, i, torch.bfloat16, "cuda", seed=t)
    g = torch.Generator().manual_seed(t)  # distinct logits in bf16 (a shuffled ladder): on ties torch may pick another
    logits = torch.stack([(torch.randperm(e, generator=g) - e / 2) * 0.05 for _ in range(t)]).to("cuda", torch.bfloat16)
    table = torch.full((512, 4, k), -1, dtype=torch.int32, device="cuda")
    slots = torch.randperm(512, device="cuda")[:t]
    routed = fused_moe.RoutedWrite(table, slots, layer=3)
    norm = fused_moe.InputNorm((torch.rand(h, device="cuda") + 0.5).to(torch.bfloat16), 1e-6) if t == 1 else None
    h_in = x if norm is None else (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight.float())
    out = fused_moe.fused_moe(x, w_gate_up, w_down, logits, k, True, norm, routed)
    ref, ids = _reference(h_in, w_gate_up, w_down, logits, k)
    assert ((out.float() - ref).norm() / ref.norm()).item() < 1e-2
    assert torch.equal(table[slots, 3], ids.to(torch.int32)) and int((table != -1).sum()) == t * k


@pytest.mark.gpu
@pytest.mark.parametrize("t,e,k", [(1, 8, 1), (8, 128, 8), (300, 60, 4), (64, 128, 8)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_topk_softmax_on_cuda_equals_the_torch_router(t, e, k, dtype):
    """The routing kernel picks the experts torch's top-k picks, weights within the dtype's rounding. The
    logits are distinct in bf16 too (a shuffled ladder): on ties the two may pick different equal experts."""
    g = torch.Generator().manual_seed(t)
    logits = torch.stack([(torch.randperm(e, generator=g) - e / 2) * 0.05 for _ in range(t)]).to("cuda", dtype)
    want_w, want_ids = fused_moe.topk_softmax_reference(logits, k, True)
    weights, ids = fused_moe.topk_softmax(logits, k, True)
    assert torch.equal(ids, want_ids) and weights.dtype == dtype
    torch.testing.assert_close(weights, want_w, rtol=1e-5 if dtype == torch.float32 else 8e-3, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("e,k", [(5, 1), (128, 8)])
def test_topk_softmax_on_cuda_picks_real_experts_for_a_nan_or_infinite_row(e, k):
    """On the device a NaN compares as the max reductions implement it: the ids must still be real experts."""
    _nan_rows_pick_real_experts(e, k, "cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("t", [4, 256])
def test_fused_moe_replays_under_a_cuda_graph(t):
    """No host synchronisation inside: captured once, replayed on new logits, it equals an eager run."""
    x, w_gate_up, w_down, logits = _layer(t, 64, 8, 512, 256, torch.bfloat16, "cuda")
    fused_moe.fused_moe(x, w_gate_up, w_down, logits, 8, True)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fused_moe.fused_moe(x, w_gate_up, w_down, logits, 8, True)
    logits.copy_(_layer(t, 64, 8, 512, 256, torch.bfloat16, "cuda", seed=5)[3])
    graph.replay()
    assert torch.equal(out, fused_moe.fused_moe(x, w_gate_up, w_down, logits, 8, True))
