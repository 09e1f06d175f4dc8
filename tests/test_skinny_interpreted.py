"""The batch-1 qkv matmul that finishes its heads (per-head norm, rotary, KV-cache store) in the same launch, through
Triton's interpreter on the CPU (float32): the same bits as the matmul followed by fused.qk_norm_rope, for every
program count per head. Only under TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs it so in CI); on a
GPU, tests/test_fused_kernels.py checks the same in bf16."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from hotswap.kernels import arrival, fused  # noqa: E402
from hotswap.kernels import skinny_matmul as sm  # noqa: E402
from hotswap.models.layers import RotaryEmbedding  # noqa: E402


def _case(seed: int, hq: int, hkv: int, d: int, qk_norm: bool, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    k_in, n = 96, (hq + 2 * hkv) * d
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    rot = RotaryEmbedding(d, 512, 10000.0, None, torch.device("cpu"))
    pages = torch.zeros(4, 8, hkv, d)
    return dict(x=rnd(1, k_in), residual=rnd(1, k_in), w=rnd(n, k_in) * k_in**-0.5, b=rnd(n) if bias else None,
                nw=rnd(k_in), qw=rnd(d) if qk_norm else None, kw=rnd(d) if qk_norm else None, cos_sin=rot.cos_sin,
                pos=torch.tensor([301]), slot=torch.tensor([13]), k_cache=pages, v_cache=pages.clone() - 1.0)


def _unfused(c, hq, hkv, d, blocks):
    y, r = sm.skinny_linear(c["x"], c["w"], c["b"], prologue=sm.ADD_NORM, residual=c["residual"], norm_weight=c["nw"],
                            eps=1e-6, blocks=blocks)
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    q, k, v = (t.view(1, -1, d) for t in y.split([hq * d, hkv * d, hkv * d], dim=-1))
    fused.qk_norm_rope(q, k, c["qw"], c["kw"], c["cos_sin"], c["pos"], 1e-5, kv_store=(v, k_cache, v_cache, c["slot"]))
    return y, r, k_cache, v_cache


def _fused(c, hq, hkv, d, blocks):
    k_cache, v_cache = c["k_cache"].clone(), c["v_cache"].clone()
    heads = sm.HeadsEpilogue(hq, hkv, d, c["qw"], c["kw"], 1e-5, c["cos_sin"], c["pos"], k_cache, v_cache, c["slot"])
    y, r = sm.skinny_linear(c["x"], c["w"], c["b"], prologue=sm.ADD_NORM, residual=c["residual"], norm_weight=c["nw"],
                            eps=1e-6, blocks=blocks, heads=heads)
    return y, r, k_cache, v_cache


@pytest.mark.parametrize("qk_norm,bias", [(True, False), (False, True)])  # Qwen3; Qwen2 (bias, no q/k norm)
@pytest.mark.parametrize("blocks", [None, (4, 32, 4), (32, 64, 4)])  # 16, 8 and 1 program(s) a 32-wide head
def test_heads_finished_in_the_matmul_equal_the_separate_kernel(qk_norm, bias, blocks):
    hq, hkv, d = 4, 2, 32
    c = _case(7, hq, hkv, d, qk_norm, bias)
    want = _unfused(c, hq, hkv, d, blocks)
    got = _fused(c, hq, hkv, d, blocks)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a, b)
    k_cache, v_cache = got[2], got[3]
    assert bool((k_cache.view(-1, hkv, d)[13] != 0).any()) and bool((v_cache.view(-1, hkv, d)[13] != -1).any())
    others = torch.ones(32, dtype=torch.bool)
    others[13] = False  # every other slot untouched
    assert bool((k_cache.view(-1, hkv, d)[others] == 0).all()) and bool((v_cache.view(-1, hkv, d)[others] == -1).all())
    assert int(arrival.counters(c["x"].device).abs().sum()) == 0  # zero again for the next launch


def test_heads_epilogue_refuses_what_it_cannot_finish():
    hq, hkv, d = 4, 2, 32
    c = _case(8, hq, hkv, d, True, False)
    base = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=c["qw"], k_norm=c["kw"], eps=1e-5,
                cos_sin=c["cos_sin"], positions=c["pos"], k_cache=c["k_cache"], v_cache=c["v_cache"], slots=c["slot"])
    bad = {"q/k/v heads": dict(num_q_heads=5), "power of two": dict(head_dim=24),
           "rotary table": dict(cos_sin=c["cos_sin"][:, :16]), "one position": dict(positions=torch.tensor([1, 2])),
           "KV cache": dict(k_cache=c["k_cache"].transpose(0, 1))}
    for words, change in bad.items():
        heads = sm.HeadsEpilogue(**{**base, **change})
        w = c["w"][: (heads.num_q_heads + 2 * hkv) * 24] if words == "power of two" else c["w"]
        cache_before = c["k_cache"].clone()
        with pytest.raises(ValueError, match=words):
            sm.skinny_linear(c["x"], w, heads=heads)
        assert torch.equal(c["k_cache"], cache_before)
    with pytest.raises(ValueError, match="divide"):  # 64-column blocks over 32-wide heads
        sm.skinny_linear(c["x"], c["w"], blocks=(64, 32, 4), heads=sm.HeadsEpilogue(**base))


# Qwen3-MoE's layer 1 is dense (mlp_only_layers), so it holds dense Qwen3's path (q/k norm heads, SiLU prologue) besides the MoE one
@pytest.mark.parametrize("family,layers", [("tiny_qwen2", 2), ("tiny_qwen3_moe", 3)])
def test_a_one_row_decode_through_the_fused_kernels_equals_the_reference_path(family, layers, request, monkeypatch):
    """The decoder's one-row path with Triton's kernels (interpreted, float32): q/k/v with its heads finished in the
    matmul (each layer's K/V written to that layer's cache at the token's slot, read back by attention), the
    batch-1 matmuls' norm and SiLU prologues (and the MoE decode kernels on the MoE model), against the PyTorch
    layers: the same greedy tokens and logprobs within float32 tolerance."""
    from engine_support import make_engine

    from hotswap.kernels import fused_moe

    path = request.getfixturevalue(family)
    prompts = [[3 + (5 * j) % 200 for j in range(6)]]
    sp = dict(temperature=0.0, max_new_tokens=3, ignore_eos=True)  # the second decode step reads the K/V the first wrote

    def run():
        with make_engine(path, enable_cuda_graph=False) as eng:
            out = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)[0]
        return out["output_ids"], [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]

    want_ids, want_lps = run()
    calls = []
    real_linear = sm.skinny_linear

    def spy_linear(*args, heads=None, **kwargs):
        calls.append(heads is not None)
        return real_linear(*args, heads=heads, **kwargs)

    with monkeypatch.context() as patch:  # the kernels' path, as on a GPU at batch 1 (CPU tensors, interpreted)
        patch.setattr(fused, "available", lambda x: True)
        patch.setattr(fused_moe, "available", lambda x: True)
        patch.setattr(sm, "enabled", lambda rows, dtype, device, on: on and rows == 1)
        patch.setattr(sm, "skinny_linear", spy_linear)
        got_ids, got_lps = run()
    assert sum(calls) == layers * 2  # each layer's q/k/v with its heads, at each of the 2 one-row decode steps
    assert got_ids == want_ids
    assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) < 1e-4
