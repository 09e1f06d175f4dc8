"""Decode attention's logic through Triton's interpreter on the CPU (float32; the interpreter's bf16 is not
faithful): split counts, the in-place merge by the last split to finish against the merge kernel, programs in
a given order, empty rows. Only under TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs it so in CI);
on a GPU, tests/test_triton_attention.py covers the same in every dtype."""

from __future__ import annotations

import os
from dataclasses import replace

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from test_triton_attention import _gen, make_paged_kv, ref_decode, rel_err  # noqa: E402

from hotswap.kernels import arrival, fused  # noqa: E402
from hotswap.kernels import triton_attention as ta  # noqa: E402
from hotswap.models.layers import RMSNorm, RotaryEmbedding  # noqa: E402

LENS = [1, 40, 700, 65, 300, 0, 129, 64]


def _case(seed: int, hq: int = 8, hkv: int = 4, d: int = 64):
    gen = _gen(seed)
    k, v, pt = make_paged_kv(LENS, 16, hkv, d, torch.float32, gen)
    q = torch.randn(len(LENS), hq, d, generator=gen)
    return q, k, v, pt, torch.tensor(LENS, dtype=torch.int32)


class _NoLaunch:
    """Stands in for the merge kernel where the splits must be merged in place: any launch fails the test."""

    def __getitem__(self, grid):
        raise AssertionError("the merge kernel was launched")


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_splits_merged_in_place_equal_the_merge_kernel_and_the_reference(monkeypatch, num_splits):
    """In place (no merge kernel launched), the same bits as the merge kernel; the merge kernel also serves a
    launch of more (sequence, KV head) groups than there are arrival counters."""
    q, k, v, pt, seq_lens = _case(num_splits)
    ref = ref_decode(q, k, v, pt, seq_lens, 0.125)
    with monkeypatch.context() as patch:
        patch.setattr(ta, "_decode_reduce_kernel", _NoLaunch())
        merged = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    if num_splits > 1:
        assert int(arrival.counters(q.device).abs().sum()) == 0  # zero again for the next launch
    with monkeypatch.context() as patch:
        patch.setattr(ta, "_MERGE_IN_PLACE", False)
        kernel = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    with monkeypatch.context() as patch:
        patch.setattr(arrival, "SIZE", len(LENS) * 4 - 1)  # one group short of this launch's 8 rows x 4 KV heads
        too_many = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    assert torch.equal(merged, kernel) and torch.equal(kernel, too_many)
    assert rel_err(merged, ref) < 2e-3
    assert bool((merged[LENS.index(0)] == 0).all())  # an empty row (graph padding) is zeros, never NaN


@pytest.mark.parametrize("num_splits", [1, 4])
def test_programs_in_a_given_order_compute_the_same_rows(num_splits):
    q, k, v, pt, seq_lens = _case(7 + num_splits, hq=4, hkv=2)
    order = torch.argsort(seq_lens, descending=True).to(torch.int32)
    plain = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    ordered = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits, order=order)
    assert torch.equal(plain, ordered)


def test_split_rule_splits_only_long_sequences_of_mid_size_batches():
    """On a 132-SM GPU (the interpreter's stand-in) with 8 KV heads: small batches split every sequence into
    chunks of at least 64 keys; from 2 programs an SM up to 8, only sequences longer than 256 keys split (in
    up to 4) and one pipeline stage; beyond that one program a sequence and KV head. Chunks are capped by the
    page table's capacity."""
    plan = ta.decode_plan
    assert plan(1, 8, 4096) == ta.DecodePlan(33, 64, 2)
    assert plan(16, 8, 4096) == ta.DecodePlan(3, 64, 2)
    assert plan(33, 8, 4096) == ta.DecodePlan(4, 256, 1)  # most sequences of a rollout's mid-size batch run one split
    assert plan(132, 8, 4096) == ta.DecodePlan(4, 256, 1)
    assert plan(133, 8, 4096) == ta.DecodePlan(1, 64, 2)
    assert plan(64, 8, 512) == ta.DecodePlan(2, 256, 1)  # two chunks of 256 keys fill the table
    assert plan(64, 8, 256) == ta.DecodePlan(1, 256, 1)


def test_a_mid_size_launch_merges_its_long_sequences_and_leaves_short_ones_whole(monkeypatch):
    """Splits of at least 256 keys: sequences up to 256 keys take one split and write their output themselves
    (the same bits as a one-split launch), longer ones take up to 4 and are merged, in place or by the kernel."""
    q, k, v, pt, seq_lens = _case(23)
    out = torch.empty_like(q)
    whole = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=1)
    cfg = ta._decode_config(q.shape[-1], q.dtype, ta.DecodePlan(4, 256, 1))  # the one-split launch's tiles
    split = ta._decode_launch(q, k, v, pt, seq_lens, 0.125, out.clone(), **cfg)
    with monkeypatch.context() as patch:
        patch.setattr(ta, "_MERGE_IN_PLACE", False)
        kernel = ta._decode_launch(q, k, v, pt, seq_lens, 0.125, out.clone(), **cfg)
    short = [b for b, n in enumerate(LENS) if n <= 256]
    assert torch.equal(split[short], whole[short]) and torch.equal(split, kernel)
    assert not torch.equal(split[LENS.index(700)], whole[LENS.index(700)])  # 3 chunks merged: another sum order
    assert rel_err(split, ref_decode(q, k, v, pt, seq_lens, 0.125)) < 2e-3
    assert int(arrival.counters(q.device).abs().sum()) == 0


def _new_token_case(seed: int, qk_norm: bool, hq: int = 8, hkv: int = 4, d: int = 64):
    """A decode step's raw q / k / v rows (as the q/k/v projection leaves them) for sequences of LENS keys, whose
    last key is this step's token, and what finishing them gives: the rotary table, positions, slots."""
    gen = _gen(seed)
    q, k_cache, v_cache, pt, seq_lens = _case(seed, hq, hkv, d)
    k_new = torch.randn(len(LENS), hkv, d, generator=gen) * 3
    v_new = torch.randn(len(LENS), hkv, d, generator=gen)
    norms = (1 + 0.1 * torch.randn(d, generator=gen), 1 + 0.1 * torch.randn(d, generator=gen)) if qk_norm else (None, None)
    rotary = RotaryEmbedding(d, 1024, 10000.0, None, torch.device("cpu"))
    positions = torch.tensor([max(n - 1, 0) for n in LENS])
    ps = k_cache.shape[1]
    slots = torch.tensor([int(pt[b, (n - 1) // ps]) * ps + (n - 1) % ps if n else -1 for b, n in enumerate(LENS)])
    token = ta.NewToken(k_new, v_new, *norms, 1e-6, rotary.cos_sin, positions, slots)
    return q * 3, k_cache, v_cache, pt, seq_lens, token, rotary


def _rms_norm(x, weight, eps):
    norm = RMSNorm(x.shape[-1], eps, x.dtype)
    norm.weight.data.copy_(weight)
    return norm(x)


def _finished_by_torch(q, k_cache, v_cache, token, rotary):
    """The layers' PyTorch path: per-head RMSNorm, rotary, k and v stored at their slots (not for empty rows)."""
    k = token.k
    if token.q_norm is not None:
        q, k = _rms_norm(q, token.q_norm, token.eps), _rms_norm(k, token.k_norm, token.eps)
    q, k = rotary(token.positions, q, k)
    k_cache, v_cache = k_cache.clone(), v_cache.clone()
    for b, slot in enumerate(token.slots.tolist()):
        if slot >= 0:
            ps = k_cache.shape[1]
            k_cache[slot // ps, slot % ps] = k[b]
            v_cache[slot // ps, slot % ps] = token.v[b]
    return q, k_cache, v_cache


@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_the_kernel_finishes_the_new_token_as_the_layers_do(qk_norm, num_splits):
    """Given the step's token unfinished, the decode kernel normalises (Qwen3) and rotates q and k, writes k and v
    at the token's slot and attends with that key taken from registers: the same output as the PyTorch layers'
    norm, rotary and store before the attention, every split count, in place merges or not; every other cache slot
    untouched."""
    q, k_cache, v_cache, pt, seq_lens, token, rotary = _new_token_case(31 + num_splits, qk_norm)
    q_ref, k_ref, v_ref = _finished_by_torch(q, k_cache, v_cache, token, rotary)
    ref = ref_decode(q_ref, k_ref, v_ref, pt, seq_lens, 0.125)
    k_out, v_out = k_cache.clone(), v_cache.clone()
    out = ta.paged_decode_attention(q.clone(), k_out, v_out, pt, seq_lens, 0.125, num_splits=num_splits,
                                    new_token=token)
    assert rel_err(out, ref) < 2e-3
    assert bool((out[LENS.index(0)] == 0).all())
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool)
    for slot in token.slots.tolist():
        if slot >= 0:
            written[slot // k_cache.shape[1], slot % k_cache.shape[1]] = True
    assert torch.allclose(k_out[written], k_ref[written], atol=1e-5) and torch.equal(v_out[written], v_ref[written])
    assert torch.equal(k_out[~written].nan_to_num(7.0), k_cache[~written].nan_to_num(7.0))
    assert torch.equal(v_out[~written].nan_to_num(7.0), v_cache[~written].nan_to_num(7.0))
    assert int(arrival.counters(q.device).abs().sum()) == 0


def test_the_new_token_kernel_matches_the_fused_rotary_kernel_before_it():
    """The decode kernel finishing the token against fused.qk_norm_rope then the decode kernel (the switch's other
    side, HOTSWAP_DECODE_NEW_TOKEN=0): the same cache bits for k and v, outputs within float32 rounding."""
    q, k_cache, v_cache, pt, seq_lens, token, _ = _new_token_case(5, True)
    k_a, v_a, k_b, v_b = k_cache.clone(), v_cache.clone(), k_cache.clone(), v_cache.clone()
    fused_out = ta.paged_decode_attention(q.clone(), k_a, v_a, pt, seq_lens, 0.125, new_token=token)
    live = [b for b, n in enumerate(LENS) if n]  # qk_norm_rope writes every row; the empty one has no slot
    q_b, k_new = q.clone()[live], token.k.clone()[live]
    fused.qk_norm_rope(q_b, k_new, token.q_norm, token.k_norm, token.cos_sin, token.positions[live], token.eps,
                       kv_store=(token.v[live], k_b, v_b, token.slots[live]))
    q_full = q.clone()
    q_full[live] = q_b
    before = ta.paged_decode_attention(q_full, k_b, v_b, pt, seq_lens, 0.125)
    assert torch.allclose(k_a.nan_to_num(7.0), k_b.nan_to_num(7.0), atol=1e-6) and torch.equal(v_a.nan_to_num(7.0), v_b.nan_to_num(7.0))
    assert rel_err(fused_out, before) < 1e-5


def test_a_new_token_the_kernel_cannot_take_is_refused():
    q, k_cache, v_cache, pt, seq_lens, token, _ = _new_token_case(3, True)
    with pytest.raises(ValueError, match="new_token.k must be"):
        ta.paged_decode_attention(q, k_cache, v_cache, pt, seq_lens, 0.125, new_token=replace(token, k=token.k[:, :2]))
    with pytest.raises(ValueError, match="normalised together"):
        ta.paged_decode_attention(q, k_cache, v_cache, pt, seq_lens, 0.125, new_token=replace(token, k_norm=None))
    assert not ta.takes_new_token(80) and ta.takes_new_token(128)


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_qwen2"])
def test_engine_decode_batches_finish_their_token_in_the_attention_kernel(family, request, monkeypatch):
    """A ragged batch through the engine with the Triton backend (interpreted, float32): its decode steps hand the
    kernel their token unfinished (q/k norm where the model has one, rotary, the KV store at the runner's slots),
    and the greedy tokens and logprobs equal the PyTorch layers' within float32 tolerance."""
    from engine_support import make_engine

    from hotswap.runner.attention import TritonAttention

    path = request.getfixturevalue(family)
    prompts = [[3 + (5 * j + i) % 200 for j in range(n)] for i, n in enumerate((6, 11, 3))]
    sp = dict(temperature=0.0, max_new_tokens=4, ignore_eos=True)
    tokens = []
    real = ta.paged_decode_attention

    def spy(*args, new_token=None, **kwargs):
        tokens.append(new_token is not None)
        return real(*args, new_token=new_token, **kwargs)

    def run(triton_backend: bool):
        with make_engine(path, enable_cuda_graph=False, enable_skinny_matmul=False) as eng:
            if triton_backend:
                eng.model_runner.attention = TritonAttention(eng.model_runner.kv_cache)
            out = eng.generate(input_ids=prompts, sampling_params=sp, return_logprob=True)
        return [(o["output_ids"], [lp for lp, _, _ in o["meta_info"]["output_token_logprobs"]]) for o in out]

    want = run(False)
    with monkeypatch.context() as patch:  # the kernels' path, as on a GPU (CPU tensors, interpreted)
        patch.setattr(fused, "available", lambda x: True)
        patch.setattr(ta, "paged_decode_attention", spy)
        got = run(True)
    assert tokens and all(tokens)  # every decode launch of every layer took its token unfinished
    for (want_ids, want_lps), (got_ids, got_lps) in zip(want, got, strict=True):
        assert got_ids == want_ids
        assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) < 1e-4
