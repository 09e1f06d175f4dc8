"""The few-rows decode matmul (kernels/rows_matmul.py) through Triton's interpreter on the CPU (float32): equal to
x @ W^T at every row count it takes, with and without a bias, with K unsplit and split (whose partials the last
program of a tile sums), and the same bits whichever program of a tile finishes last; its SiLU-and-mul and q/k/v
heads epilogues give what the matmul followed by the kernel each replaces gives, and its partials left to the norm
after it (SplitSum) the bits of its own sum. Only under TRITON_INTERPRET=1 (tests/test_kernels_interpreted.py runs
it so in CI); on a GPU, tests/test_fused_kernels.py checks it in bf16."""

from __future__ import annotations

import os

import pytest
import torch

if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("Triton interpreter run: set TRITON_INTERPRET=1", allow_module_level=True)
pytest.importorskip("triton")

from hotswap.kernels import arrival, fused  # noqa: E402
from hotswap.kernels import rows_matmul as rm  # noqa: E402
from hotswap.kernels.skinny_matmul import HeadsEpilogue  # noqa: E402
from hotswap.kernels.split_sum import SplitSum  # noqa: E402
from hotswap.models.layers import RotaryEmbedding  # noqa: E402


@pytest.fixture
def kernel_only(monkeypatch):
    """rows_linear must run its kernel: its cuBLAS fallback fails the test, and so does an epilogue run as a kernel of
    its own after the matmul."""

    def fallback(*args, **kwargs):
        raise AssertionError("rows_linear fell back to F.linear")

    def unfused(*args, **kwargs):
        raise AssertionError("the epilogue ran as a kernel of its own")

    monkeypatch.setattr(rm.torch.nn.functional, "linear", fallback)
    monkeypatch.setattr(rm, "_unfused_epilogue", unfused)


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
    # steps in flight by rows, as measured in whole decode graphs (rows_matmul.stages_for)
    assert [rm.tiles_for(1024, 3072, cpu, 64, rows).stages for rows in (32, 64)] == [5, 4]  # down: 6 steps a program
    assert [rm.tiles_for(1024, 2048, cpu, 64, rows).stages for rows in (32, 64)] == [4, 3]  # o_proj: 4 steps a program
    with pytest.raises(ValueError, match="do not divide"):
        rm.rows_linear(torch.randn(4, 96), torch.randn(64, 96), tiles=rm.Tiles(64, 64, 1, 1, 0))


@pytest.mark.parametrize("rows", [2, 9, 64])
@pytest.mark.parametrize("split_k", [2, 4])
def test_split_sums_left_to_the_norm_give_its_bits(rows, split_k, kernel_only):
    """A split-K matmul asked for a SplitSum leaves its float32 partials [splits, rows, N]; the residual add + RMSNorm
    that sums them gives the bits, residual included, of the norm after the matmul's own last-program sum."""
    gen = torch.Generator().manual_seed(rows + split_k)
    n, k = 128, 512
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    residual, norm_w = torch.randn(rows, n, generator=gen), torch.rand(n, generator=gen) + 0.5
    tiles = rm.Tiles(block_n=64, block_k=64, split_k=split_k, stages=2, prefetch_k=0)
    sums = rm.rows_linear(x, w, tiles=tiles, split_sum=True)
    assert isinstance(sums, SplitSum) and sums.partials.shape == (split_k, rows, n) and sums.shape == (rows, n)
    torch.testing.assert_close(sums.partials.sum(0).double(), x.double() @ w.double().T, rtol=1e-5, atol=1e-5)
    r_want, r_got = residual.clone(), residual.clone()
    want = fused.rmsnorm(rm.rows_linear(x, w, tiles=tiles), norm_w, 1e-6, residual=r_want)
    got = fused.rmsnorm(sums, norm_w, 1e-6, residual=r_got)
    assert torch.equal(got, want) and torch.equal(r_got, r_want)


def test_split_sums_only_where_nothing_comes_between(kernel_only):
    """Unsplit K, a bias (added before rounding) or an epilogue keep the matmul's own output."""
    gen = torch.Generator().manual_seed(1)
    x, w, b = torch.randn(4, 256, generator=gen), torch.randn(128, 256, generator=gen), torch.randn(128, generator=gen)
    split, whole = rm.Tiles(64, 64, 2, 1, 0), rm.Tiles(64, 64, 1, 1, 0)
    assert isinstance(rm.rows_linear(x, w, tiles=split, split_sum=True), SplitSum)
    assert isinstance(rm.rows_linear(x, w, tiles=whole, split_sum=True), torch.Tensor)
    assert isinstance(rm.rows_linear(x, w, b, tiles=split, split_sum=True), torch.Tensor)
    assert isinstance(rm.rows_linear(x, w, tiles=split, silu_mul=True, split_sum=True), torch.Tensor)
    with pytest.raises(ValueError, match="float32 partials"):
        SplitSum(torch.zeros(1, 4, 128), torch.float32)


@pytest.mark.parametrize("rows", [2, 9, 64])
@pytest.mark.parametrize("split_k,bias", [(1, False), (2, True)])
def test_silu_mul_epilogue_equals_the_separate_kernel(rows, split_k, bias, kernel_only):
    """gate_up's tiles pair gate rows with the matching up rows; silu(gate) * up comes out as fused.silu_and_mul
    rounds it (bit for bit on a GPU, tests/test_fused_kernels.py; under the interpreter numpy evaluates the two
    kernels' exp with this CPU's vector code, which may differ in the last bits: float32 rounding allowed here)."""
    gen = torch.Generator().manual_seed(rows + split_k)
    n, k = 256, 256
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(n, k, generator=gen) * k**-0.5
    b = torch.randn(n, generator=gen) if bias else None
    tiles = rm.Tiles(block_n=64, block_k=64, split_k=split_k, stages=2, prefetch_k=0)
    got = rm.rows_linear(x, w, b, tiles=tiles, silu_mul=True)
    assert got.shape == (rows, n // 2)
    torch.testing.assert_close(got, fused.silu_and_mul(rm.rows_linear(x, w, b, tiles=tiles)), rtol=1e-5, atol=1e-5)
    gate, up = (x.double() @ w.double().T + (0 if b is None else b.double())).chunk(2, dim=-1)
    torch.testing.assert_close(got.double(), torch.nn.functional.silu(gate) * up, rtol=1e-5, atol=1e-5)
    assert int(arrival.counters(x.device).abs().sum()) == 0


def _heads_case(seed: int, rows: int, hq: int, hkv: int, d: int, qk_norm: bool, bias: bool):
    gen = torch.Generator().manual_seed(seed)
    k_in, n = 128, (hq + 2 * hkv) * d
    rnd = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    rot = RotaryEmbedding(d, 512, 10000.0, None, torch.device("cpu"))
    pages = torch.zeros(16, 8, hkv, d)
    slots = torch.randperm(128, generator=gen)[:rows]
    return dict(x=rnd(rows, k_in), w=rnd(n, k_in) * k_in**-0.5, b=rnd(n) if bias else None, qw=rnd(d) if qk_norm else None,
                kw=rnd(d) if qk_norm else None, cos_sin=rot.cos_sin, pos=torch.randint(0, 512, (rows,), generator=gen),
                slots=slots, k_cache=pages, v_cache=pages.clone() - 1.0)


def _heads(c, hq, hkv, d, k_cache, v_cache):
    return HeadsEpilogue(hq, hkv, d, c["qw"], c["kw"], 1e-5, c["cos_sin"], c["pos"], k_cache, v_cache, c["slots"])


@pytest.mark.parametrize("rows", [2, 7, 64])
@pytest.mark.parametrize("qk_norm,bias,split_k", [(True, False, 1), (True, False, 2), (False, True, 2)])  # Qwen3; Qwen2
def test_heads_epilogue_equals_the_separate_kernel(rows, qk_norm, bias, split_k, kernel_only):
    """q normalised and rotated, k normalised, rotated and stored at each row's KV slot, v stored: what the matmul
    followed by fused.qk_norm_rope(..., kv_store=...) gives (v bit for bit; q and k within rounding, the head's sum of
    squares being reduced in another order), and no other slot touched."""
    hq, hkv, d = 4, 2, 32
    c = _heads_case(rows, rows, hq, hkv, d, qk_norm, bias)
    tiles = rm.Tiles(block_n=d, block_k=64, split_k=split_k, stages=2, prefetch_k=0)
    k_want, v_want = c["k_cache"].clone(), c["v_cache"].clone()
    y = rm.rows_linear(c["x"], c["w"], c["b"], tiles=tiles)
    q, k, v = (t.view(rows, -1, d) for t in y.split([hq * d, hkv * d, hkv * d], dim=-1))
    fused.qk_norm_rope(q, k, c["qw"], c["kw"], c["cos_sin"], c["pos"], 1e-5, kv_store=(v, k_want, v_want, c["slots"]))
    k_got, v_got = c["k_cache"].clone(), c["v_cache"].clone()
    got = rm.rows_linear(c["x"], c["w"], c["b"], tiles=tiles, heads=_heads(c, hq, hkv, d, k_got, v_got))
    assert got.shape == (rows, hq * d)
    torch.testing.assert_close(got, y[:, :hq * d], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_got, k_want, rtol=1e-6, atol=1e-6)
    assert torch.equal(v_got, v_want)
    written = torch.zeros(128, dtype=torch.bool)
    written[c["slots"]] = True
    assert bool((k_got.view(128, hkv, d)[~written] == 0).all()) and bool((v_got.view(128, hkv, d)[~written] == -1).all())
    assert bool((v_got.view(128, hkv, d)[written] != -1).any())
    assert int(arrival.counters(c["x"].device).abs().sum()) == 0


def test_heads_epilogue_refuses_what_it_cannot_finish(kernel_only):
    hq, hkv, d, rows = 4, 2, 32, 3
    c = _heads_case(5, rows, hq, hkv, d, True, False)
    tiles = rm.Tiles(block_n=d, block_k=64, split_k=1, stages=1, prefetch_k=0)
    base = dict(num_q_heads=hq, num_kv_heads=hkv, head_dim=d, q_norm=c["qw"], k_norm=c["kw"], eps=1e-5,
                cos_sin=c["cos_sin"], positions=c["pos"], k_cache=c["k_cache"], v_cache=c["v_cache"], slots=c["slots"])
    bad = {"q/k/v heads": dict(num_q_heads=5), "rotary table": dict(cos_sin=c["cos_sin"][:, :16]),
           "each of the 3 rows": dict(slots=c["slots"][:2]), "KV cache": dict(k_cache=c["k_cache"].transpose(0, 1))}
    for words, change in bad.items():
        cache_before = c["k_cache"].clone()
        with pytest.raises(ValueError, match=words):
            rm.rows_linear(c["x"], c["w"], tiles=tiles, heads=HeadsEpilogue(**{**base, **change}))
        assert torch.equal(c["k_cache"], cache_before)
    with pytest.raises(ValueError, match="tile's width"):  # 64-column tiles over 32-wide heads
        rm.rows_linear(c["x"], c["w"], tiles=rm.Tiles(64, 64, 1, 1, 0), heads=HeadsEpilogue(**base))


def _greedy(path, prompts: list[list[int]]) -> tuple[list[list[int]], list[float]]:
    """Four greedy tokens of each prompt, eagerly, and their logprobs."""
    from engine_support import make_engine

    with make_engine(path, enable_cuda_graph=False) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=dict(temperature=0.0, max_new_tokens=4, ignore_eos=True),
                            return_logprob=True)
    return [o["output_ids"] for o in outs], [lp for o in outs for lp, _, _ in o["meta_info"]["output_token_logprobs"]]


def _small_tiles(n, k, device, block_n=64, rows=64):
    """Tiles for the tiny models' 64-wide K and 16-wide heads, K split in two."""
    block_n = min(block_n, 32)
    return rm.Tiles(block_n, 32, 2, 1, 0) if n % block_n == 0 and k % 64 == 0 else None


PROMPTS = [[3 + (5 * j + i) % 200 for j in range(6 + 3 * i)] for i in range(3)]
STEPS = 1 + 3  # the prefill of 3 x 6-12 tokens, then three 3-row decode steps


def _kernel_decode(path, monkeypatch) -> tuple[list[str], list[list[int]], list[float]]:
    """PROMPTS decoded on the kernels' path, as on a GPU at 2-64 rows (CPU tensors, interpreted): each few-rows matmul
    call by what it returned ("heads", "silu", "sums" for split-K partials left to the norm, "plain"), the tokens and
    their logprobs."""
    calls = []
    real = rm.rows_linear

    def spy(x, weight, bias=None, tiles=None, *, silu_mul=False, heads=None, split_sum=False):
        y = real(x, weight, bias, tiles, silu_mul=silu_mul, heads=heads, split_sum=split_sum)
        calls.append("silu" if silu_mul else "heads" if heads is not None else "sums" if isinstance(y, SplitSum) else "plain")
        return y

    with monkeypatch.context() as patch:
        patch.setattr(fused, "available", lambda x: True)
        patch.setattr(rm, "enabled", lambda rows, dtype, device: 2 <= rows <= rm.MAX_ROWS)
        patch.setattr(rm, "tiles_for", _small_tiles)
        patch.setattr(rm, "rows_linear", spy)
        patch.setattr(rm, "_unfused_epilogue", lambda *a: pytest.fail("an epilogue ran as a kernel of its own"))
        ids, lps = _greedy(path, PROMPTS)
    return calls, ids, lps


def _assert_same_decode(path, got_ids: list[list[int]], got_lps: list[float]) -> None:
    """The PyTorch layers' greedy tokens, and logprobs within float32 tolerance."""
    want_ids, want_lps = _greedy(path, PROMPTS)
    assert got_ids == want_ids
    assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) < 1e-4


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_qwen2"])
def test_a_few_rows_decode_through_the_epilogues_equals_the_reference_path(family, request, monkeypatch):
    """The decoder on 2-64 rows with Triton's kernels (interpreted, float32): q/k/v with its heads finished in the
    matmul (each layer's K/V at each token's slot, read back by attention), gate/up with SiLU-and-mul, o_proj's and
    down's split-K partials summed by the norm after them, against the PyTorch layers."""
    path = request.getfixturevalue(family)
    calls, ids, lps = _kernel_decode(path, monkeypatch)
    assert calls == ["heads", "sums", "silu", "sums"] * 2 * STEPS  # two layers: qkv, o_proj, gate_up, down
    _assert_same_decode(path, ids, lps)


def test_a_few_rows_moe_decode_sums_o_proj_in_its_norm(tiny_qwen3_moe, monkeypatch):
    """A MoE layer's o_proj leaves its split-K partials to the block's residual add + norm too (its experts are kernels of
    their own): the PyTorch layers' tokens and logprobs."""
    import json

    config = json.loads((tiny_qwen3_moe / "config.json").read_text())
    layers = [["heads", "sums"] + (["silu", "sums"] if i in config["mlp_only_layers"] else [])  # a dense MLP among them
              for i in range(config["num_hidden_layers"])]
    calls, ids, lps = _kernel_decode(tiny_qwen3_moe, monkeypatch)
    assert calls == sum(layers, []) * STEPS
    _assert_same_decode(tiny_qwen3_moe, ids, lps)


def test_a_few_rows_decode_keeps_a_biased_o_proj_whole(tmp_path, monkeypatch):
    """An o_proj with a bias (Qwen3's attention_bias) adds it after the matmul's sum, so it leaves no partials to the
    norm; down_proj (no bias) still does: the PyTorch layers' tokens and logprobs."""
    from hotswap.testing.tiny_models import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path, "qwen3", attention_bias=True)
    calls, ids, lps = _kernel_decode(path, monkeypatch)
    assert calls == ["heads", "plain", "silu", "sums"] * 2 * STEPS
    _assert_same_decode(path, ids, lps)


def test_a_few_rows_decode_whose_matmuls_the_kernel_does_not_take(tiny_qwen3, monkeypatch):
    """Weights over the kernel's size limit (an 8B's): on 2-64 rows every matmul falls back to cuBLAS and its
    epilogues to kernels of their own, the same tokens and logprobs as the PyTorch layers."""
    prompts = [[3 + (7 * j + i) % 200 for j in range(5 + 2 * i)] for i in range(3)]
    want_ids, want_lps = _greedy(tiny_qwen3, prompts)
    with monkeypatch.context() as patch:
        patch.setattr(fused, "available", lambda x: True)
        patch.setattr(rm, "enabled", lambda rows, dtype, device: 2 <= rows <= rm.MAX_ROWS)
        patch.setattr(rm, "MAX_WEIGHT_BYTES", 0)
        patch.setattr(rm, "_rows_kernel", None)  # launching it would fail
        got_ids, got_lps = _greedy(tiny_qwen3, prompts)
    assert got_ids == want_ids
    assert max(abs(a - b) for a, b in zip(got_lps, want_lps, strict=True)) < 1e-4
