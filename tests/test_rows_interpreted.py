"""The few-rows decode matmul (kernels/rows_matmul.py) through Triton's interpreter on the CPU (float32): equal to
x @ W^T at every row count it takes, with and without a bias, with K unsplit and split (whose partials the last
program of a tile sums), and the same bits whichever program of a tile finishes last. Only under
TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs it so in CI); on a GPU, tests/test_fused_kernels.py
checks it in bf16."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from hotswap.kernels import arrival  # noqa: E402
from hotswap.kernels import rows_matmul as rm  # noqa: E402


@pytest.fixture
def kernel_only(monkeypatch):
    """rows_linear must run its kernel: its cuBLAS fallback fails the test."""

    def fallback(*args, **kwargs):
        raise AssertionError("rows_linear fell back to F.linear")

    monkeypatch.setattr(rm.torch.nn.functional, "linear", fallback)


@pytest.mark.parametrize("rows", [2, 5, 16, 33, 64])
@pytest.mark.parametrize("split_k,bias", [(1, True), (4, False), (2, True)])
def test_rows_matmul_equals_the_reference(rows, split_k, bias, kernel_only):
    gen = torch.Generator().manual_seed(rows * 10 + split_k)
    n, k = 128, 512
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    b = torch.randn(n, generator=gen) if bias else None
    tiles = rm.Tiles(block_n=64, block_k=64, split_k=split_k, stages=2, prefetch_k=0)
    got = rm.rows_linear(x, w, b, tiles=tiles)
    want = x.double() @ w.double().T + (0 if b is None else b.double())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert int(arrival.counters(x.device).abs().sum()) == 0  # every tile's counter is left at zero for the next launch


def test_a_strided_activation(kernel_only):
    """Rows that are a view into a wider buffer (q of a fused qkv output, the gate half of gate_up)."""
    gen = torch.Generator().manual_seed(3)
    n, k = 64, 256
    x = torch.randn(6, 2 * k, generator=gen)[:, :k]
    w = torch.randn(n, k, generator=gen)
    got = rm.rows_linear(x, w, tiles=rm.Tiles(block_n=64, block_k=64, split_k=4, stages=1, prefetch_k=0))
    torch.testing.assert_close(got.double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-4)


def test_default_tiles_split_narrow_weights_and_refuse_uneven_ones():
    cpu = torch.device("cpu")  # the interpreter stands in for a 132-SM GPU
    assert rm.tiles_for(1024, 3072, cpu).split_k == 4  # down_proj of a 0.6B: 16 column tiles, K split to half the SMs
    assert rm.tiles_for(6144, 1024, cpu).split_k == 1  # gate_up: 96 tiles already
    assert rm.tiles_for(1000, 1024, cpu) is None  # no even 64-column tiling: cuBLAS
    with pytest.raises(ValueError, match="do not divide"):
        rm.rows_linear(torch.randn(4, 96), torch.randn(64, 96), tiles=rm.Tiles(64, 64, 1, 1, 0))
