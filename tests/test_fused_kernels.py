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
def test_qk_norm_rope_in_place_on_fused_qkv(dtype, tol, head_dim, hq, hk, norm):
    T = 19
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
