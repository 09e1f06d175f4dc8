"""Correctness tests for the Triton paged-attention kernels (GPU only; skipped without CUDA/Triton).

Every case draws fresh random inputs, shuffles page ids (non-contiguous page tables), fills
unused page-table slots and the unused tail of each sequence's last page with NaN ("poison"),
pre-fills the output with NaN, and compares against a float64 PyTorch reference that gathers
the pages and applies the causal offset: ||out - ref|| / ||ref|| < 1e-2 for bf16.
"""

import math
import os

import pytest
import torch

pytest.importorskip("triton")
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"  # CPU debugging through Triton's interpreter
if not torch.cuda.is_available() and not _INTERPRET:
    pytest.skip("Triton attention kernels need a CUDA GPU", allow_module_level=True)

from hotswap.kernels.triton_attention import (  # noqa: E402
    MAX_DECODE_SPLITS,
    paged_decode_attention,
    paged_prefill_attention,
)

pytestmark = pytest.mark.gpu

DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 2e-3}
MAX_CTX = int(os.environ.get("HOTSWAP_TEST_MAX_CTX", "3000"))


def _gen(seed):
    g = torch.Generator(device="cpu")
    g.manual_seed(seed)
    return g


def make_paged_kv(kv_lens, page_size, hkv, d, dtype, gen, extra_pages=5, extra_cols=2):
    """Random paged K/V holding sequences of the given lengths at shuffled page ids.

    Unused page-table entries point at a NaN-filled page; slots past the end of each sequence in
    its last page are NaN too, so any read outside the valid KV range poisons the result.
    """
    pages_per = [max(1, -(-int(n) // page_size)) for n in kv_lens]
    num_pages = sum(pages_per) + extra_pages
    perm = torch.randperm(num_pages, generator=gen)
    poison = int(perm[-1])
    k = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
    v = torch.randn(num_pages, page_size, hkv, d, generator=gen).to(dtype)
    max_pages = max(pages_per) + extra_cols
    pt = torch.full((len(kv_lens), max_pages), poison, dtype=torch.int32)
    nxt = 0
    for b, n in enumerate(kv_lens):
        ids = perm[nxt:nxt + pages_per[b]]
        nxt += pages_per[b]
        pt[b, : pages_per[b]] = ids.to(torch.int32)
        tail = int(n) % page_size
        if tail:
            k[int(ids[-1]), tail:] = float("nan")
            v[int(ids[-1]), tail:] = float("nan")
        if int(n) == 0:
            k[int(ids[0])] = float("nan")
            v[int(ids[0])] = float("nan")
    k[poison] = float("nan")
    v[poison] = float("nan")
    return k.to(DEV), v.to(DEV), pt.to(DEV)


def gather_kv(k_cache, v_cache, page_table, b, n):
    ps = k_cache.shape[1]
    pos = torch.arange(n, device=k_cache.device)
    pages = page_table[b, pos // ps].long()
    return k_cache[pages, pos % ps], v_cache[pages, pos % ps]  # [n, Hkv, D]


def ref_attention(q, k, v, q_pos, scale):
    """float64 reference. q [n, Hq, D]; k, v [L, Hkv, D]; q_pos [n] absolute positions."""
    n, hq, d = q.shape
    L, hkv, _ = k.shape
    if L == 0:
        return torch.zeros(n, hq, d, dtype=torch.float64, device=q.device)
    g = hq // hkv
    kk = k.double().repeat_interleave(g, dim=1)
    vv = v.double().repeat_interleave(g, dim=1)
    s = torch.einsum("nhd,lhd->hnl", q.double(), kk) * scale
    mask = torch.arange(L, device=q.device)[None, :] <= q_pos.to(q.device)[:, None]
    s = s.masked_fill(~mask[None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.einsum("hnl,lhd->nhd", p, vv)


def rel_err(out, ref):
    assert torch.isfinite(out).all(), "output has NaN/inf (unwritten or poisoned reads)"
    num = (out.double() - ref).norm()
    den = ref.norm()
    return float(num / den) if den > 0 else float(num)


def ref_decode(q, k_cache, v_cache, pt, seq_lens, scale):
    outs = []
    for b in range(q.shape[0]):
        n = int(seq_lens[b])
        k, v = gather_kv(k_cache, v_cache, pt, b, n)
        outs.append(ref_attention(q[b : b + 1], k, v, torch.tensor([n - 1]), scale))
    return torch.cat(outs)


def _interleave_kv(k, v):
    """K and V as strided views of one [num_pages, 2, page_size, Hkv, D] buffer."""
    buf = torch.stack([k, v], dim=1)
    return buf[:, 0], buf[:, 1]


def run_decode_case(seed, lens, page_size, hq, hkv, d, dtype, num_splits=None, q_view=False,
                    strided_pages=False):
    gen = _gen(seed)
    k, v, pt = make_paged_kv(lens, page_size, hkv, d, dtype, gen)
    if strided_pages:
        k, v = _interleave_kv(k, v)
    B = len(lens)
    if q_view:  # q as a strided view of a fused qkv buffer
        qkv = torch.randn(B, hq + 2 * hkv, d, generator=gen).to(dtype).to(DEV)
        q = qkv[:, :hq]
    else:
        q = torch.randn(B, hq, d, generator=gen).to(dtype).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(d)
    out = torch.full((B, hq, d), float("nan"), dtype=dtype, device=DEV)
    res = paged_decode_attention(q, k, v, pt, seq_lens, scale, out=out, num_splits=num_splits)
    assert res is out and res.dtype == dtype
    ref = ref_decode(q, k, v, pt, seq_lens, scale)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3e}"
    for b, n in enumerate(lens):
        if n == 0:
            assert (out[b] == 0).all()
    return err


def _rand_lens(gen, B, lo=1, hi=MAX_CTX):
    lens = torch.randint(lo, hi + 1, (B,), generator=gen).tolist()
    lens[0] = 1  # a fresh single-token context
    if B > 1:
        lens[1] = hi
    return lens


GQA = [(8, 8), (16, 8), (16, 4), (32, 4), (8, 1)]  # ratios 1, 2, 4, 8 and MQA


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_decode_matches_reference(page_size, d, hq, hkv):
    seed = 1000 * page_size + 10 * d + hq + hkv
    lens = _rand_lens(_gen(seed), 6)
    run_decode_case(seed, lens, page_size, hq, hkv, d, torch.bfloat16)


@pytest.mark.parametrize("num_splits", [1, 2, 3, 7, MAX_DECODE_SPLITS])
def test_decode_explicit_splits(num_splits):
    lens = [1, 2, 127, 128, 129, 1000, MAX_CTX, 64 * 128 + 5]
    run_decode_case(77 + num_splits, lens, 16, 16, 8, 128, torch.bfloat16, num_splits=num_splits)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [32, 128, 256])
def test_decode_dtypes_and_head_dims(dtype, d):
    lens = _rand_lens(_gen(5 + d), 5, hi=1500)
    run_decode_case(5 + d, lens, 16, 16, 4, d, dtype)


@pytest.mark.parametrize("page_size", [2, 8, 32, 128, 256])
def test_decode_other_page_sizes(page_size):
    lens = _rand_lens(_gen(page_size), 5, hi=2000)
    run_decode_case(page_size, lens, page_size, 16, 8, 128, torch.bfloat16)


def test_decode_never_reads_splits_it_left_empty(monkeypatch):
    """Short sequences use few of the launched splits: the others write no partial result, and the merge
    must not read them. The scratch is NaN here, so reading one would poison the output."""
    real_empty = torch.empty

    def nan_empty(*args, **kwargs):
        t = real_empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", nan_empty)
    run_decode_case(11, [1, 3, 64, 65, 200, 1000], 16, 16, 8, 128, torch.bfloat16, num_splits=MAX_DECODE_SPLITS)


def test_decode_strided_q_and_zero_len_rows():
    # seq_len 0 rows (CUDA-graph batch padding) must give zeros, never NaN.
    lens = [0, 5, 0, 700, 2500]
    run_decode_case(9, lens, 16, 16, 8, 128, torch.bfloat16, q_view=True)
    run_decode_case(10, lens, 16, 16, 8, 128, torch.bfloat16, q_view=True, num_splits=1)


def test_decode_sequence_of_one_split_writes_its_output_itself():
    """In a launch of several splits, a sequence short enough for one writes its final output directly (the merge
    skips it): the same bits as a one-split launch, beside longer sequences that are merged."""
    lens = [1, 40, 64, 65, 700, 2000, 0, 63]
    gen = _gen(41)
    k, v, pt = make_paged_kv(lens, 16, 8, 128, torch.bfloat16, gen)
    q = torch.randn(len(lens), 16, 128, generator=gen).to(torch.bfloat16).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    one = paged_decode_attention(q, k, v, pt, seq_lens, 0.088, num_splits=1)
    many = paged_decode_attention(q, k, v, pt, seq_lens, 0.088, num_splits=8)
    short = [b for b, n in enumerate(lens) if n <= 64]
    assert torch.equal(one[short], many[short])
    assert rel_err(many, ref_decode(q, k, v, pt, seq_lens, 0.088)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("batch", [64, 160])
def test_decode_plan_of_mid_size_and_large_batches(batch):
    """The shape-derived plan on a rollout's mixed lengths: at batch 64 (2-8 programs an SM on an H100 / H200) 4
    splits of at least 256 keys, so rows up to 256 keys run one split and equal a one-split launch bit for bit
    while the long ones are merged; at batch 160 one split and two pipeline stages, all rows bit for bit."""
    from hotswap.kernels.triton_attention import decode_plan

    gen = _gen(batch)
    lens = torch.randint(1, 2001, (batch,), generator=gen).tolist()
    lens[:4] = [1, 256, 257, 2000]
    k, v, pt = make_paged_kv(lens, 16, 8, 128, torch.bfloat16, gen)
    q = torch.randn(batch, 16, 128, generator=gen).to(torch.bfloat16).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    plan = decode_plan(batch, 8, pt.shape[1] * 16, q.device)
    # the rule on a GPU of 64-159 SMs (the H100 and H200 have 132): batch 64 has 2-8 (sequence, KV head) programs an SM,
    # batch 160 more than 8
    want = (4, 256, 1) if batch == 64 else (1, 64, 2)
    assert (plan.num_splits, plan.min_chunk, plan.num_stages) == want
    planned = paged_decode_attention(q, k, v, pt, seq_lens, 0.088)
    one = paged_decode_attention(q, k, v, pt, seq_lens, 0.088, num_splits=1)
    whole = [b for b, n in enumerate(lens) if n <= plan.min_chunk or plan.num_splits == 1]
    assert torch.equal(planned[whole], one[whole])
    assert rel_err(planned, ref_decode(q, k, v, pt, seq_lens, 0.088)) < TOL[torch.bfloat16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_splits_merged_by_the_last_to_finish_equal_the_merge_kernel(monkeypatch, dtype):
    """Each sequence's splits are merged by whichever finishes last (a counter per sequence and KV head): the
    rows equal the merge kernel's within float32 rounding, across launches of any split count, and every
    counter is zero again after each launch (the next launch, or a graph replay, starts from zero)."""
    from hotswap.kernels import arrival
    from hotswap.kernels import triton_attention as ta

    lens = [1, 40, 700, 65, 2000, 0, 129, 300]
    gen = _gen(57)
    k, v, pt = make_paged_kv(lens, 16, 4, 64, dtype, gen)
    q = torch.randn(len(lens), 8, 64, generator=gen).to(dtype).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    ref = ref_decode(q, k, v, pt, seq_lens, 0.125)
    for num_splits in (2, 7, 16):
        merged = paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
        assert int(arrival.counters(q.device).abs().sum()) == 0
        with monkeypatch.context() as patch:
            patch.setattr(ta, "_MERGE_IN_PLACE", False)
            kernel = paged_decode_attention(q, k, v, pt, seq_lens, 0.125, num_splits=num_splits)
        torch.testing.assert_close(merged.float(), kernel.float(), rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)
        assert rel_err(merged, ref) < TOL[dtype]


@pytest.mark.parametrize("num_splits", [1, 4])
def test_decode_in_a_given_order_is_bit_identical(num_splits):
    """Programs started longest sequence first (`order`, as the runner passes every decode step) compute the
    same rows bit for bit as in batch order; an order of the wrong shape or dtype is refused by name."""
    lens = [3, 2000, 17, 640, 1, 1200, 64, 900]
    gen = _gen(31 + num_splits)
    k, v, pt = make_paged_kv(lens, 16, 8, 128, torch.bfloat16, gen)
    q = torch.randn(len(lens), 16, 128, generator=gen).to(torch.bfloat16).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    plain = paged_decode_attention(q, k, v, pt, seq_lens, 0.088, num_splits=num_splits)
    order = torch.argsort(seq_lens, descending=True).to(torch.int32)
    ordered = paged_decode_attention(q, k, v, pt, seq_lens, 0.088, num_splits=num_splits, order=order)
    assert torch.equal(plain, ordered)
    assert rel_err(ordered, ref_decode(q, k, v, pt, seq_lens, 0.088)) < TOL[torch.bfloat16]
    with pytest.raises(ValueError, match="order must be int32"):
        paged_decode_attention(q, k, v, pt, seq_lens, 0.088, order=order.long())
    with pytest.raises(ValueError, match="order must be int32"):
        paged_decode_attention(q, k, v, pt, seq_lens, 0.088, order=order[:4])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("B,cap", [(1, MAX_CTX), (8, MAX_CTX), (64, 800)])
def test_decode_cuda_graph_replay(B, cap):
    hq, hkv, d, ps, dtype = 16, 8, 128, 16, torch.bfloat16
    gen = _gen(123 + B)
    scale = 1.0 / math.sqrt(d)
    # Static buffers sized by capacity, as an engine would allocate them.
    k, v, pt = make_paged_kv([cap] * B, ps, hkv, d, dtype, gen)
    q = torch.randn(B, hq, d, generator=gen).to(dtype).to(DEV)
    seq_lens = torch.full((B,), cap, dtype=torch.int32, device=DEV)
    out = torch.empty(B, hq, d, dtype=dtype, device=DEV)

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):  # compile + warm up outside capture
            paged_decode_attention(q, k, v, pt, seq_lens, scale, out=out)
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()

    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        paged_decode_attention(q, k, v, pt, seq_lens, scale, out=out)

    for trial in range(4):
        lens = torch.randint(1, cap + 1, (B,), generator=gen)
        if trial == 1:
            lens[0] = 1
        if trial == 2 and B > 1:
            lens[-1] = 0  # padding row
        if trial == 3:
            lens[:] = torch.randint(1, 200, (B,), generator=gen)  # short: fewer splits in use
        # fresh data in the static buffers: new q, new cache contents, reshuffled page table
        q.copy_(torch.randn(B, hq, d, generator=gen).to(dtype))
        k.normal_()
        v.normal_()
        pt.copy_(pt.flatten()[torch.randperm(pt.numel(), generator=gen).to(DEV)].view_as(pt))
        seq_lens.copy_(lens.to(torch.int32))
        out.fill_(float("nan"))
        g.replay()
        torch.cuda.synchronize()
        ref = ref_decode(q, k, v, pt, seq_lens, scale)
        err = rel_err(out, ref)
        assert err < TOL[dtype], f"trial {trial}: rel err {err:.3e}"


# ------------------------------------------------------------------------------------------
# prefill / extend
# ------------------------------------------------------------------------------------------
def run_prefill_case(seed, prefixes, q_lens, page_size, hq, hkv, d, dtype, max_q_len=None,
                     strided_pages=False, tiles_width=None):
    gen = _gen(seed)
    kv_lens = [p + n for p, n in zip(prefixes, q_lens)]
    k, v, pt = make_paged_kv(kv_lens, page_size, hkv, d, dtype, gen)
    if strided_pages:
        k, v = _interleave_kv(k, v)
    T = sum(q_lens)
    q = torch.randn(T, hq, d, generator=gen).to(dtype).to(DEV)
    cu = torch.zeros(len(q_lens) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor(q_lens), 0)
    cu = cu.to(DEV)
    seq_lens = torch.tensor(kv_lens, dtype=torch.int32, device=DEV)
    scale = 1.0 / math.sqrt(d)
    out = torch.full((T, hq, d), float("nan"), dtype=dtype, device=DEV)
    tiles = None
    if tiles_width is not None:  # the CUDA-graph work list: grid fixed by its width, padded with -1
        from hotswap.kernels.triton_attention import prefill_tile_tokens
        from hotswap.runner.host_batch import prefill_tiles

        tok = prefill_tile_tokens(d, hq, hkv, dtype)
        tiles = torch.from_numpy(prefill_tiles(cu.cpu().numpy(), seq_lens.cpu().numpy(), tok, tiles_width)).to(DEV)
    res = paged_prefill_attention(
        q, k, v, pt, cu, seq_lens, max_q_len or max(q_lens), scale, out=out, tiles=tiles
    )
    assert res is out and res.dtype == dtype
    refs = []
    for b, (p, n) in enumerate(zip(prefixes, q_lens)):
        kk, vv = gather_kv(k, v, pt, b, p + n)
        rows = q[int(cu[b]) : int(cu[b + 1])]
        refs.append(ref_attention(rows, kk, vv, torch.arange(p, p + n), scale))
    ref = torch.cat(refs)
    err = rel_err(out, ref)
    assert err < TOL[dtype], f"rel err {err:.3e}"
    return err


def _rand_extend(gen, B, max_q=300, max_ctx=MAX_CTX):
    q_lens = torch.randint(1, max_q + 1, (B,), generator=gen).tolist()
    prefixes = [int(torch.randint(0, max_ctx - n + 1, (1,), generator=gen)) for n in q_lens]
    # fixed corner cases: a pure prefill from 0, a single-token row, a long-prefix extend
    q_lens[0], prefixes[0] = max_q, 0
    if B > 1:
        q_lens[1], prefixes[1] = 1, int(torch.randint(0, max_ctx, (1,), generator=gen))
    if B > 2:
        q_lens[2], prefixes[2] = 37, max_ctx - 37
    return prefixes, q_lens


@pytest.mark.parametrize("page_size", [1, 16, 64])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("hq,hkv", GQA)
def test_prefill_matches_reference(page_size, d, hq, hkv):
    seed = 7 + 1000 * page_size + 10 * d + hq + hkv
    prefixes, q_lens = _rand_extend(_gen(seed), 5)
    run_prefill_case(seed, prefixes, q_lens, page_size, hq, hkv, d, torch.bfloat16)


def test_prefill_single_token_rows_and_loose_max_q_len():
    prefixes = [0, 10, 500, 0, 2999]
    q_lens = [1, 1, 1, 1, 1]
    run_prefill_case(3, prefixes, q_lens, 16, 16, 8, 128, torch.bfloat16, max_q_len=64)
    prefixes = [0, 0, 100, 1000]
    q_lens = [1, 513, 1, 129]
    run_prefill_case(4, prefixes, q_lens, 16, 16, 8, 128, torch.bfloat16, max_q_len=600)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prefill_work_list_matches_reference(dtype):
    """The tile work list (extend CUDA graphs) gives the reference result; padding entries do nothing."""
    prefixes, q_lens = _rand_extend(_gen(21), 6)
    run_prefill_case(21, prefixes, q_lens, 16, 16, 8, 128, dtype, tiles_width=64)
    run_prefill_case(22, [0, 40, 0], [0, 1, 300], 16, 16, 8, 128, dtype, tiles_width=40)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [32, 128, 256])
def test_prefill_dtypes_and_head_dims(dtype, d):
    prefixes, q_lens = _rand_extend(_gen(11 + d), 4, max_q=200, max_ctx=1200)
    run_prefill_case(11 + d, prefixes, q_lens, 16, 16, 4, d, dtype)


@pytest.mark.parametrize("hq,hkv", [(12, 4), (14, 2), (40, 8)])  # non-power-of-two groups
def test_odd_gqa_groups(hq, hkv):
    lens = _rand_lens(_gen(hq), 5, hi=2000)
    run_decode_case(hq, lens, 16, hq, hkv, 128, torch.bfloat16)
    prefixes, q_lens = _rand_extend(_gen(hq + 1), 4, max_q=200, max_ctx=2000)
    run_prefill_case(hq + 1, prefixes, q_lens, 16, hq, hkv, 128, torch.bfloat16)


@pytest.mark.parametrize("page_size", [2, 256])
def test_prefill_other_page_sizes(page_size):
    prefixes, q_lens = _rand_extend(_gen(page_size), 4, max_q=200, max_ctx=2000)
    run_prefill_case(page_size, prefixes, q_lens, page_size, 16, 8, 128, torch.bfloat16)


def test_strided_pages_and_bad_layout():
    # pages strided (K and V interleaved in one buffer) are fine ...
    run_decode_case(21, [1, 300, 1200], 16, 16, 8, 128, torch.bfloat16, strided_pages=True)
    run_decode_case(22, [1, 300, 1200], 16, 16, 8, 128, torch.bfloat16, strided_pages=True, num_splits=4)
    run_prefill_case(23, [0, 100, 900], [50, 1, 130], 16, 16, 8, 128, torch.bfloat16, strided_pages=True)
    # ... but the inside of a page must be a dense [page_size, Hkv, D] block
    k = torch.zeros(4, 16, 128, 8, dtype=torch.bfloat16, device=DEV).transpose(2, 3)
    q = torch.zeros(1, 16, 128, dtype=torch.bfloat16, device=DEV)
    pt = torch.zeros(1, 4, dtype=torch.int32, device=DEV)
    sl = torch.ones(1, dtype=torch.int32, device=DEV)
    with pytest.raises(ValueError):
        paged_decode_attention(q, k, k, pt, sl, 0.1)


@pytest.mark.parametrize("hq,hkv", [(32, 4), (14, 2)])
def test_prefill_packed_gqa_variant(monkeypatch, hq, hkv):
    # the GQA group packed into one tile (token-major rows) instead of one query head per program
    from hotswap.kernels import triton_attention as ta

    orig = ta._prefill_config
    monkeypatch.setattr(ta, "_prefill_config", lambda d, dt: dict(orig(d, dt), pack_gqa=True))
    prefixes, q_lens = _rand_extend(_gen(99 + hq), 4, max_q=300, max_ctx=2000)
    run_prefill_case(99 + hq, prefixes, q_lens, 16, hq, hkv, 128, torch.bfloat16)
