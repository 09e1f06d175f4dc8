"""Fused Triton kernels against the PyTorch reference layers (GPU only)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytestmark = pytest.mark.gpu
triton = pytest.importorskip("triton")

from hotswap.kernels import fused  # noqa: E402
from hotswap.models.layers import RotaryEmbedding  # noqa: E402


def ref_rmsnorm(x, w, eps):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("n", [64, 1024, 4096, 5120])
def test_rmsnorm_and_fused_residual(dtype, tol, n):
    x = torch.randn(37, n, device="cuda", dtype=dtype)
    r = torch.randn(37, n, device="cuda", dtype=dtype)
    w = torch.randn(n, device="cuda", dtype=dtype)
    assert rel(fused.rmsnorm(x, w, 1e-6), ref_rmsnorm(x, w, 1e-6)) < tol
    want_res = x + r
    want = ref_rmsnorm(want_res, w, 1e-6)
    got = fused.rmsnorm(x, w, 1e-6, residual=r)
    assert torch.equal(r, want_res)
    assert rel(got, want) < tol


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 1e-2)])
@pytest.mark.parametrize("head_dim,hq,hk,norm", [(128, 16, 8, True), (64, 8, 1, False), (128, 32, 8, False)])
@pytest.mark.parametrize("T", [19, 70])  # below and above fused.TOKEN_GRID_MIN_TOKENS: both kernels
def test_qk_norm_rope_in_place_on_fused_qkv(dtype, tol, head_dim, hq, hk, norm, T):
    rot = RotaryEmbedding(head_dim, 4096, 1e6, None, torch.device("cuda"))
    qkv = torch.randn(T, (hq + 2 * hk) * head_dim, device="cuda", dtype=dtype)
    q, k, _ = qkv.split([hq * head_dim, hk * head_dim, hk * head_dim], dim=-1)
    q, k = q.view(T, hq, head_dim), k.view(T, hk, head_dim)
    qw = torch.randn(head_dim, device="cuda", dtype=dtype) if norm else None
    kw = torch.randn(head_dim, device="cuda", dtype=dtype) if norm else None
    pos = torch.randint(0, 4000, (T,), device="cuda")
    rq, rk = (ref_rmsnorm(q, qw, 1e-6), ref_rmsnorm(k, kw, 1e-6)) if norm else (q.clone(), k.clone())
    rq, rk = rot(pos, rq, rk)
    v_before = qkv[:, (hq + hk) * head_dim :].clone()
    fused.qk_norm_rope(q, k, qw, kw, rot.cos_sin, pos, 1e-6)
    assert rel(q, rq) < tol and rel(k, rk) < tol
    assert torch.equal(qkv[:, (hq + hk) * head_dim :], v_before)  # v untouched


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 1e-2)])
def test_silu_and_mul(dtype, tol):
    x = torch.randn(23, 2 * 3072, device="cuda", dtype=dtype)
    gate, up = x.chunk(2, -1)
    assert rel(fused.silu_and_mul(x), F.silu(gate) * up) < tol


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("T", [7, 70])
def test_qk_norm_rope_writes_kv_cache(dtype, T):
    hq, hk, d = 16, 8, 128
    rot = RotaryEmbedding(d, 4096, 1e6, None, torch.device("cuda"))
    qkv = torch.randn(T, (hq + 2 * hk) * d, device="cuda", dtype=dtype)
    q, k, v = qkv.split([hq * d, hk * d, hk * d], dim=-1)
    q, k, v = q.view(T, hq, d), k.view(T, hk, d), v.view(T, hk, d)
    qw, kw = torch.randn(d, device="cuda", dtype=dtype), torch.randn(d, device="cuda", dtype=dtype)
    pos = torch.randint(0, 4000, (T,), device="cuda")
    rq, rk = rot(pos, ref_rmsnorm(q, qw, 1e-6), ref_rmsnorm(k, kw, 1e-6))
    k_cache = torch.full((9, 16, hk, d), float("nan"), device="cuda", dtype=dtype)
    v_cache = torch.full_like(k_cache, float("nan"))
    slots = torch.randperm(9 * 16, device="cuda")[:T]
    fused.qk_norm_rope(q, k, qw, kw, rot.cos_sin, pos, 1e-6, kv_store=(v, k_cache, v_cache, slots))
    assert rel(q, rq) < 1e-2 and rel(k, rk) < 1e-2
    assert torch.equal(k_cache.view(-1, hk, d)[slots], k) and torch.equal(v_cache.view(-1, hk, d)[slots], v)
    untouched = torch.ones(9 * 16, dtype=torch.bool, device="cuda")
    untouched[slots] = False
    assert k_cache.view(-1, hk, d)[untouched].isnan().all() and v_cache.view(-1, hk, d)[untouched].isnan().all()


@pytest.mark.parametrize("hq,hk,norm", [(16, 8, True), (12, 3, False)])
def test_qk_norm_rope_token_grid_equals_head_grid(monkeypatch, hq, hk, norm):
    """The per-token kernel (many tokens) and the per-(token, head) kernel (few) agree: the same values up to
    the order of the norm's fp32 sum (a last-bit difference in bf16), and the same bits for v."""
    T, d = 33, 128
    g = torch.Generator().manual_seed(hq + hk)
    rot = RotaryEmbedding(d, 4096, 1e6, None, torch.device("cuda"))
    qkv = torch.randn(T, (hq + 2 * hk) * d, generator=g).to("cuda", torch.bfloat16)
    qw, kw = (torch.randn(d, generator=g).to("cuda", torch.bfloat16), torch.randn(d, generator=g).to("cuda", torch.bfloat16)) if norm else (None, None)
    pos = torch.randint(0, 4000, (T,), generator=g).to("cuda")
    slots = torch.randperm(9 * 16, generator=g)[:T].to("cuda")
    results = []
    for min_tokens in (1, 10**9):
        monkeypatch.setattr(fused, "TOKEN_GRID_MIN_TOKENS", min_tokens)
        x = qkv.clone()
        q, k, v = (t.view(T, -1, d) for t in x.split([hq * d, hk * d, hk * d], dim=-1))
        k_cache = torch.zeros((9, 16, hk, d), device="cuda", dtype=torch.bfloat16)
        v_cache = torch.zeros_like(k_cache)
        fused.qk_norm_rope(q, k, qw, kw, rot.cos_sin, pos, 1e-6, kv_store=(v, k_cache, v_cache, slots))
        results.append((x, k_cache, v_cache))
    (x1, k1, v1), (x2, k2, v2) = results
    # a last-bit difference of the normalised q/k (values up to ~10 here) shows through rotary's differences
    # x1 * cos - x2 * sin at several bf16 steps of a small result: judged over the whole tensor
    for a, b in ((x1, x2), (k1, k2)):
        assert ((a.float() - b.float()).norm() / b.float().norm()).item() < 2e-3
    assert torch.equal(v1, v2) and torch.equal(x1[:, (hq + hk) * d :], x2[:, (hq + hk) * d :])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n,k", [(4096, 1024), (1024, 2048), (6144, 1024), (1000, 3000)])
def test_skinny_matmul_prologues(dtype, n, k):
    m = 1
    from hotswap.kernels import skinny_matmul as sm

    x = torch.randn(m, k, device="cuda", dtype=dtype)
    r = torch.randn(m, k, device="cuda", dtype=dtype)
    w = torch.randn(n, k, device="cuda", dtype=dtype) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=dtype)
    nw = torch.randn(k, device="cuda", dtype=dtype)
    y, _ = sm.skinny_linear(x, w, b)
    assert rel(y, F.linear(x, w, b)) < 1e-2
    y, _ = sm.skinny_linear(x, w, prologue=sm.NORM, norm_weight=nw, eps=1e-6)
    assert rel(y, F.linear(ref_rmsnorm(x, nw, 1e-6), w)) < 1e-2
    r_before = r.clone()
    y, new_r = sm.skinny_linear(x, w, prologue=sm.ADD_NORM, residual=r, norm_weight=nw, eps=1e-6)
    assert torch.equal(new_r, x + r) and torch.equal(r, r_before)
    assert rel(y, F.linear(ref_rmsnorm(x + r, nw, 1e-6), w)) < 1e-2
    gu = torch.randn(m, 2 * k, device="cuda", dtype=dtype)
    gate, up = gu.chunk(2, -1)
    y, _ = sm.skinny_linear(gu, w, prologue=sm.SILU_MUL)
    assert rel(y, F.linear(F.silu(gate) * up, w)) < 1e-2


@pytest.mark.parametrize("hq,hk,d,k,norm,bias", [(16, 8, 128, 1024, True, False), (32, 4, 128, 2048, True, False),
                                                 (14, 2, 64, 896, False, True)])  # 0.6B, 30B-A3B, Qwen2-0.5B shapes
def test_skinny_qkv_finishing_its_heads_equals_the_separate_kernel(hq, hk, d, k, norm, bias):
    """The batch-1 qkv matmul that normalises, rotates and stores its heads in the same launch, against the matmul
    followed by qk_norm_rope: v and the KV slots bit for bit, q and k up to FMA contraction in the rotary."""
    from hotswap.kernels import arrival
    from hotswap.kernels import skinny_matmul as sm

    g = torch.Generator().manual_seed(hq * k)
    cuda = lambda t: t.to("cuda", torch.bfloat16)  # noqa: E731
    n = (hq + 2 * hk) * d
    x, r, nw = cuda(torch.randn(1, k, generator=g)), cuda(torch.randn(1, k, generator=g)), cuda(torch.randn(k, generator=g))
    w = cuda(torch.randn(n, k, generator=g) * k**-0.5)
    b = cuda(torch.randn(n, generator=g)) if bias else None
    qw, kw = (cuda(torch.randn(d, generator=g)), cuda(torch.randn(d, generator=g))) if norm else (None, None)
    rot = RotaryEmbedding(d, 4096, 1e6, None, torch.device("cuda"))
    pos, slot = torch.tensor([2999], device="cuda"), torch.tensor([77], device="cuda")
    empty = torch.full((9, 16, hk, d), float("nan"), device="cuda", dtype=torch.bfloat16)
    y, new_r = sm.skinny_linear(x, w, b, prologue=sm.ADD_NORM, residual=r, norm_weight=nw, eps=1e-6)
    k_want, v_want = empty.clone(), empty.clone()
    q, kk, v = (t.view(1, -1, d) for t in y.split([hq * d, hk * d, hk * d], dim=-1))
    fused.qk_norm_rope(q, kk, qw, kw, rot.cos_sin, pos, 1e-6, kv_store=(v, k_want, v_want, slot))
    k_got, v_got = empty.clone(), empty.clone()
    heads = sm.HeadsEpilogue(hq, hk, d, qw, kw, 1e-6, rot.cos_sin, pos, k_got, v_got, slot)
    got, got_r = sm.skinny_linear(x, w, b, prologue=sm.ADD_NORM, residual=r, norm_weight=nw, eps=1e-6, heads=heads)
    assert torch.equal(got_r, new_r) and torch.equal(got[:, (hq + hk) * d:], y[:, (hq + hk) * d:])
    assert torch.equal(v_got.view(-1, hk, d)[77], v_want.view(-1, hk, d)[77])
    assert rel(got[:, :(hq + hk) * d], y[:, :(hq + hk) * d]) < 2e-3
    assert rel(k_got.view(-1, hk, d)[77], k_want.view(-1, hk, d)[77]) < 2e-3
    assert torch.equal(k_got.view(-1, hk, d)[77], got[0, hq * d:(hq + hk) * d].view(hk, d))
    assert int(k_got.isnan().sum()) == int(v_got.isnan().sum()) == (9 * 16 - 1) * hk * d  # other slots untouched
    assert int(arrival.counters(x.device).abs().sum()) == 0


def test_embed_pending_takes_device_inputs():
    w = torch.randn(1000, 1024, device="cuda", dtype=torch.bfloat16)
    ids = torch.randint(0, 1000, (37,), device="cuda")
    src = torch.full((37,), -1, dtype=torch.int64, device="cuda")
    src[[0, 5, 36]] = torch.tensor([2, 0, 1], device="cuda")
    prev = torch.tensor([7, 999, 3], device="cuda")
    tok = torch.where(src >= 0, prev[src.clamp(min=0)], ids)
    assert torch.equal(fused.embed_pending(ids, src, prev, w), F.embedding(tok, w))


def test_staged_inputs_upload_one_span():
    from hotswap.runner.staged_inputs import StagedInputs

    staged = StagedInputs({"a": ((5,), torch.int64), "b": ((3,), torch.int32), "table": ((4, 6), torch.int32)}, torch.device("cuda"))
    for step in range(3):
        h = staged.stage()
        h["a"][:] = step + torch.arange(5).numpy()
        h["b"][:] = -step
        h["table"][:] = step * 10
        staged.upload(2)
        d = staged.device
        torch.cuda.synchronize()
        assert d["a"].tolist() == [step + i for i in range(5)] and d["b"].tolist() == [-step] * 3
        assert d["table"][:2].eq(step * 10).all() and d["table"][2:].eq(0).all()  # rows past the span stay as they were


@pytest.mark.parametrize("rows", [1, 5, 64])
def test_argmax_rows_matches_torch_with_ties(rows):
    from hotswap.kernels.argmax import argmax_rows

    x = torch.randn(rows, 151936, device="cuda").to(torch.bfloat16)
    x[0, 70000] = x[0, 150000] = 50.0  # a tie across chunks: the first index wins, as in torch
    x[-1, 4095] = x[-1, 4096] = 60.0  # a tie on a chunk boundary
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    out = torch.empty(rows, dtype=torch.int64, device="cuda")
    assert argmax_rows(x, out=out) is out and torch.equal(out, x.argmax(dim=-1))


@pytest.mark.parametrize("rows", [2, 17, 64])
@pytest.mark.parametrize("n,k,bias", [(4096, 1024, False), (1024, 3072, False), (6144, 1024, True), (1024, 2048, False)])
def test_rows_matmul_against_cublas(rows, n, k, bias, monkeypatch):
    """The few-rows decode matmul (0.6B shapes: qkv, down, gate_up with a bias, o_proj) within bf16 rounding of
    float32 cuBLAS, on weights that cross more than one tile and K split, and the same bits on a second call; its
    kernel runs (the cuBLAS fallback fails the test)."""
    from hotswap.kernels import rows_matmul as rm

    torch.manual_seed(rows + n)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16) if bias else None
    want = F.linear(x.float(), w.float(), None if b is None else b.float())
    monkeypatch.setattr(rm.torch.nn.functional, "linear", lambda *a, **kw: pytest.fail("rows_linear fell back to cuBLAS"))
    got = rm.rows_linear(x, w, b)
    assert rel(got, want) < 5e-3
    assert torch.equal(got, rm.rows_linear(x, w, b))


@pytest.mark.parametrize("rows", [2, 17, 64])
@pytest.mark.parametrize("n,k", [(1024, 2048), (1024, 3072)])
def test_rows_matmul_split_sums_into_the_norm(rows, n, k, monkeypatch):
    """o_proj's and down_proj's shapes (K split) in bf16 under PDL: the partials left to the residual add + RMSNorm give
    the bits, residual included, of the matmul's own sum followed by the norm."""
    from hotswap.kernels import rows_matmul as rm
    from hotswap.kernels.split_sum import SplitSum

    torch.manual_seed(rows + k)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(rows, k, device=dev, dtype=bf)
    w = torch.randn(n, k, device=dev, dtype=bf) * k**-0.5
    residual = torch.randn(rows, n, device=dev, dtype=bf)
    norm_w = torch.rand(n, device=dev, dtype=bf) + 0.5
    monkeypatch.setattr(rm.torch.nn.functional, "linear", lambda *a, **kw: pytest.fail("rows_linear fell back to cuBLAS"))
    r_want, r_got = residual.clone(), residual.clone()
    want = fused.rmsnorm(rm.rows_linear(x, w), norm_w, 1e-6, residual=r_want)
    sums = rm.rows_linear(x, w, split_sum=True)
    assert isinstance(sums, SplitSum)
    got = fused.rmsnorm(sums, norm_w, 1e-6, residual=r_got)
    assert torch.equal(got, want) and torch.equal(r_got, r_want)


@pytest.mark.parametrize("rows", [2, 17, 64])
def test_rows_matmul_epilogues_against_the_separate_kernels(rows, monkeypatch):
    """The few-rows matmul's epilogues on the 0.6B shapes in bf16: gate_up's SiLU-and-mul the bits of the matmul and
    fused.silu_and_mul; q/k/v's heads (one head a tile, K split) what fused.qk_norm_rope makes of the matmul, within a
    bf16 rounding (K splits otherwise, and the head's sum of squares reduces in another order), its KV rows at each
    row's slot; neither falls back to cuBLAS."""
    from hotswap.kernels import rows_matmul as rm
    from hotswap.kernels.skinny_matmul import HeadsEpilogue

    torch.manual_seed(rows)
    dev, bf = "cuda", torch.bfloat16
    x = torch.randn(rows, 1024, device=dev, dtype=bf)
    w_gate_up = torch.randn(6144, 1024, device=dev, dtype=bf) * 1024**-0.5
    w_qkv = torch.randn(4096, 1024, device=dev, dtype=bf) * 1024**-0.5
    unfused_act = fused.silu_and_mul(rm.rows_linear(x, w_gate_up))
    qkv = rm.rows_linear(x, w_qkv)
    cos_sin = RotaryEmbedding(128, 4096, 1e6, None, torch.device(dev)).cos_sin
    q_w, k_w = (torch.rand(128, device=dev, dtype=bf) + 0.5 for _ in range(2))
    pos = torch.randint(0, 4096, (rows,), device=dev)
    slots = torch.randperm(1024, device=dev)[:rows]
    k_want, v_want = (torch.zeros(64, 16, 8, 128, device=dev, dtype=bf) for _ in range(2))
    q, k, v = (t.view(rows, -1, 128) for t in qkv.split([2048, 1024, 1024], dim=-1))
    fused.qk_norm_rope(q, k, q_w, k_w, cos_sin, pos, 1e-6, kv_store=(v, k_want, v_want, slots))
    k_got, v_got = torch.zeros_like(k_want), torch.zeros_like(v_want)
    heads = HeadsEpilogue(16, 8, 128, q_w, k_w, 1e-6, cos_sin, pos, k_got, v_got, slots)
    monkeypatch.setattr(rm.torch.nn.functional, "linear", lambda *a, **kw: pytest.fail("rows_linear fell back to cuBLAS"))
    monkeypatch.setattr(fused, "silu_and_mul", lambda *a: pytest.fail("the SiLU epilogue ran as its own kernel"))
    monkeypatch.setattr(fused, "qk_norm_rope", lambda *a, **kw: pytest.fail("the heads epilogue ran as its own kernel"))
    assert torch.equal(rm.rows_linear(x, w_gate_up, silu_mul=True), unfused_act)
    got_q = rm.rows_linear(x, w_qkv, heads=heads)
    torch.testing.assert_close(got_q, qkv[:, :2048], rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(k_got, k_want, rtol=8e-3, atol=1e-2)
    torch.testing.assert_close(v_got, v_want, rtol=8e-3, atol=1e-2)  # head-wide tiles split K unlike 64-column ones
    assert int(k_got.view(-1, 8, 128).abs().sum(dim=(1, 2)).ne(0).sum()) == rows  # only the rows' slots written

