"""Decode attention's logic through Triton's interpreter on the CPU (float32; the interpreter's bf16 is not
faithful): split counts, the in-place merge by the last split to finish against the merge kernel, programs in
a given order, empty rows. Only under TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs it so in CI);
on a GPU, tests/test_triton_attention.py covers the same in every dtype."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from test_triton_attention import _gen, make_paged_kv, ref_decode, rel_err  # noqa: E402

from hotswap.kernels import arrival  # noqa: E402
from hotswap.kernels import triton_attention as ta  # noqa: E402

LENS = [1, 40, 700, 65, 300, 0, 129, 64]


def _case(seed: int, hq: int = 4, hkv: int = 2, d: int = 64):
    """Two KV heads of two query heads each: the grid still spans KV heads (head offsets, group rows) at half the
    interpreted programs of four."""
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
        patch.setattr(arrival, "SIZE", len(LENS) * k.shape[2] - 1)  # one group short of this launch's 8 rows x 2 KV heads
        too_many = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    assert torch.equal(merged, kernel) and torch.equal(kernel, too_many)
    assert rel_err(merged, ref) < 2e-3
    assert bool((merged[LENS.index(0)] == 0).all())  # an empty row (graph padding) is zeros, never NaN


@pytest.fixture
def nan_scratch(monkeypatch) -> list[torch.Tensor]:
    """torch.empty fills floating tensors with NaN (the kernels' scratch and outputs); yields those it made."""
    real_empty, made = torch.empty, []

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        if t.is_floating_point():
            made.append(t.fill_(float("nan")))
        return t

    monkeypatch.setattr(torch, "empty", nan_empty)
    return made


def test_the_merge_reads_only_the_splits_a_sequence_used(monkeypatch, nan_scratch):
    """16 splits launched, at most 11 used (700 keys in 64-key chunks): the merge's tile of partials masks the rest,
    which here hold NaN, in place and in the merge kernel (as tests/test_triton_attention.py does on a GPU). The rows
    of 2-5 splits merge the 8-row tile, the one of 11 the launch's 16 rows."""
    q, k, v, pt, seq_lens = _case(31)
    ref = ref_decode(q, k, v, pt, seq_lens, 0.125)
    merged = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=16)
    monkeypatch.setattr(ta, "_MERGE_IN_PLACE", False)
    kernel = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=16)
    assert torch.equal(merged, kernel)
    assert rel_err(merged, ref) < 2e-3


def test_a_sequence_of_8_splits_merges_the_small_tile_and_one_of_9_the_launchs(nan_scratch):
    """The small tile's edge: 500 keys in eight 64-key splits merge an 8-row tile, 540 in nine the launch's 16 rows;
    a tile one row short of a sequence's splits would drop a partial (the scratch is NaN past the used splits)."""
    gen = _gen(43)
    lens = [500, 540]
    k, v, pt = make_paged_kv(lens, 16, 2, 64, torch.float32, gen)
    q = torch.randn(len(lens), 4, 64, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    out = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=16)
    assert rel_err(out, ref_decode(q, k, v, pt, seq_lens, 0.125)) < 2e-3


@pytest.mark.parametrize("num_splits", [1, 4])
def test_programs_in_a_given_order_compute_the_same_rows(num_splits):
    q, k, v, pt, seq_lens = _case(7 + num_splits)
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


@pytest.mark.parametrize("num_splits", [1, 3])
def test_keys_loaded_before_the_wait_give_the_same_rows(monkeypatch, num_splits):
    """The first block of cached keys loaded before the PDL wait (the step's own key after it), as at small batches,
    gives the bits of loading them all after it, as at large ones; a split's first block that holds the own key
    (lengths 1, 40, 64) and one that does not (700, 300) both."""
    q, k, v, pt, seq_lens = _case(11)
    with monkeypatch.context() as patch:
        patch.setattr(ta, "_PRELOAD", False)
        after = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    with monkeypatch.context() as patch:
        patch.setattr(ta, "_PRELOAD", True)
        before = ta.paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
    assert torch.equal(before, after)
    assert rel_err(before, ref_decode(q, k, v, pt, seq_lens, 0.125)) < 2e-3
