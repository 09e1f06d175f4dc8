"""Every Triton kernel the engine launches compiles for Hopper (sm_90) on a machine without a GPU: the kernels' own
wrappers run on CPU tensors while Triton's driver is replaced by one that compiles (Triton's compiler and ptxas) and
launches nothing, with PDL on as on a Hopper device. A construct Triton's GPU frontend rejects (one its CPU
interpreter accepts) fails here, in CI, instead of on the lent GPU. Skipped where Triton or its CUDA backend is absent.
"""

from __future__ import annotations

import re

import pytest
import torch

triton = pytest.importorskip("triton")
if torch.cuda.is_available():  # there the GPU tests compile and run every kernel for real; keep Triton's caches theirs
    pytest.skip("a CUDA device is present: the gpu tests compile these kernels", allow_module_level=True)

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from hotswap.kernels import argmax, fused, fused_moe, l2_prefetch, pdl, rows_matmul, sampling, skinny_matmul  # noqa: E402
from hotswap.kernels import triton_attention as ta  # noqa: E402

BF16 = torch.bfloat16


class HopperWithoutDevice:
    """Triton's active driver, as far as compiling needs one: an sm_90 target, device 0, stream 0."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_current_target(self) -> GPUTarget:
        return GPUTarget("cuda", 90, 32)


@pytest.fixture
def hopper(monkeypatch):
    """Kernel launches compile for sm_90 and run nothing; yields {kernel name: compiled kernels}."""
    compiled: dict[str, list] = {}
    launch = JITFunction.run

    def compile_only(self, *args, grid, warmup, **kwargs):
        kernel = launch(self, *args, grid=grid, warmup=True, **kwargs)
        compiled.setdefault(self.fn.__name__, []).append(kernel)
        return kernel

    try:
        previous = driver._active
        driver.set_active(HopperWithoutDevice())
    except AttributeError as exc:  # another Triton's driver registry: nothing to check with
        pytest.skip(f"this Triton's driver cannot be replaced here: {exc}")
    monkeypatch.setattr(JITFunction, "run", compile_only)
    monkeypatch.setattr(pdl, "enabled", lambda device, rows: rows <= pdl.MAX_ROWS)  # as on a Hopper device
    monkeypatch.setattr(ta, "_require_triton", lambda *tensors: None)  # CPU tensors stand in for CUDA ones
    try:
        yield compiled
    finally:
        driver._active = previous


def loads_before_wait(kernel) -> int:
    """Global loads a PDL-launched kernel's PTX issues before its wait on the previous kernel: what it reads that no
    kernel of the step writes (weights, staged inputs, the rotary table)."""
    ptx = kernel.asm["ptx"]
    assert "griddepcontrol.wait" in ptx
    return len(re.findall(r"\bld\.global", ptx.split("griddepcontrol.wait", 1)[0]))


def assert_compiled(compiled: dict, *names: str) -> None:
    for name in names:
        assert compiled.get(name), f"{name} was not compiled"
        assert all(k.asm["cubin"] for k in compiled[name]), f"{name} has no cubin"


def test_norm_rotary_and_elementwise_kernels(hopper):
    for rows in (1, 128):  # decode (PDL) and prefill (no PDL) launches
        x = torch.randn(rows, 1024, dtype=BF16)
        fused.rmsnorm(x, torch.ones(1024, dtype=BF16), 1e-6)
        fused.rmsnorm(x, torch.ones(1024, dtype=BF16), 1e-6, residual=torch.randn_like(x))
        fused.silu_and_mul(torch.randn(rows, 2 * 3072, dtype=BF16))
        q, k, v = (torch.randn(rows, h, 128, dtype=BF16) for h in (16, 8, 8))
        cache = torch.zeros(64, 16, 8, 128, dtype=BF16)
        positions = torch.arange(rows)
        fused.qk_norm_rope(q, k, torch.ones(128, dtype=BF16), torch.ones(128, dtype=BF16), torch.randn(4096, 128), positions, 1e-6,
                           kv_store=(v, cache, cache.clone(), positions))
    fused.embed_pending(torch.arange(4), torch.full((4,), -1), torch.zeros(8, dtype=torch.int64), torch.randn(100, 1024, dtype=BF16))
    assert_compiled(hopper, "_rmsnorm_kernel", "_silu_mul_kernel", "_qk_norm_rope_kernel", "_qk_norm_rope_token_kernel", "_embed_kernel")
    # the decode norms (PDL) load their weight before the wait
    pdl_norms = [k for k in hopper["_rmsnorm_kernel"] if "griddepcontrol.wait" in k.asm["ptx"]]
    assert pdl_norms and all(loads_before_wait(k) >= 1 for k in pdl_norms)


def test_l2_prefetch_kernel(hopper):
    """ptxas takes the inline TMA bulk prefetch (sm_90): one predicated instruction a lane, and no load or store."""
    l2_prefetch.prefetch(torch.empty(1024, 3072 * 2, dtype=BF16), torch.empty(1024, 3072, dtype=BF16))
    assert_compiled(hopper, "_prefetch_kernel")
    ptx = hopper["_prefetch_kernel"][0].asm["ptx"]
    assert len(re.findall(r"cp\.async\.bulk\.prefetch\.L2\.global", ptx)) == 2  # A's branch and B's
    assert not re.search(r"\b(ld|st)\.global", ptx)


def test_sampling_and_argmax_kernels(hopper):
    logits = torch.randn(8, 151936, dtype=BF16)
    argmax.argmax_rows(logits)
    rows = (torch.ones(8), torch.full((8,), 50, dtype=torch.int64), torch.full((8,), 0.9), torch.zeros(8),
            torch.arange(8, dtype=torch.int64), torch.zeros(8, dtype=torch.int64))
    for original in (False, True):
        sampling.sample_rows(logits, *rows, original=original)
    sampling.sample_rows(logits, None, None, None, None, None, None, original=False)
    assert_compiled(hopper, "_chunk_max_kernel", "_pick_kernel", "_partials_kernel", "_finish_kernel")


@pytest.mark.parametrize("prologue", [skinny_matmul.PLAIN, skinny_matmul.NORM, skinny_matmul.ADD_NORM, skinny_matmul.SILU_MUL])
def test_batch_one_matmul_kernel(hopper, prologue):
    k = 1024
    x = torch.randn(1, 2 * k if prologue == skinny_matmul.SILU_MUL else k, dtype=BF16)
    skinny_matmul.skinny_linear(x, torch.randn(2048, k, dtype=BF16), prologue=prologue,
                                residual=torch.randn(1, k, dtype=BF16) if prologue == skinny_matmul.ADD_NORM else None,
                                norm_weight=torch.ones(k, dtype=BF16) if prologue in (skinny_matmul.NORM, skinny_matmul.ADD_NORM) else None,
                                eps=1e-6)
    assert_compiled(hopper, "_skinny_kernel")


@pytest.mark.parametrize("qk_norm", [True, False])
def test_batch_one_qkv_matmul_finishing_its_heads(hopper, qk_norm):
    """The q/k/v projection with the heads epilogue (per-head norm, rotary, KV store by the last program of a head)."""
    hq, hkv, d, k = 16, 8, 128, 1024
    cache = torch.zeros(64, 16, hkv, d, dtype=BF16)
    heads = skinny_matmul.HeadsEpilogue(hq, hkv, d, torch.ones(d, dtype=BF16) if qk_norm else None,
                                        torch.ones(d, dtype=BF16) if qk_norm else None, 1e-6, torch.randn(4096, d),
                                        torch.tensor([5]), cache, cache.clone(), torch.tensor([70]))
    skinny_matmul.skinny_linear(torch.randn(1, k, dtype=BF16), torch.randn((hq + 2 * hkv) * d, k, dtype=BF16),
                                None if qk_norm else torch.randn((hq + 2 * hkv) * d, dtype=BF16), prologue=skinny_matmul.ADD_NORM,
                                residual=torch.randn(1, k, dtype=BF16), norm_weight=torch.ones(k, dtype=BF16), eps=1e-6,
                                heads=heads)
    assert_compiled(hopper, "_skinny_kernel")
    ptx = "".join(kernel.asm["ptx"] for kernel in hopper["_skinny_kernel"])
    assert "atom.global.gpu.acq_rel.add" in ptx and "ld.global.cg" in ptx
    # the token's slot and position load before the wait, beside the first weight tile
    skinny_matmul.skinny_linear(torch.randn(1, k, dtype=BF16), torch.randn((hq + 2 * hkv) * d, k, dtype=BF16))
    with_heads, without = hopper["_skinny_kernel"]
    assert loads_before_wait(with_heads) >= loads_before_wait(without) + 2


@pytest.mark.parametrize("rows,n,k", [(16, 4096, 1024), (64, 1024, 3072)])  # qkv unsplit, down with K split
def test_few_rows_matmul_kernel(hopper, rows, n, k):
    """The 2-64-row decode matmul with PDL: its L2 prefetch before the wait, split K's arrival counter, and its partials
    left to the norm that sums them (CPU tensors tile as for an H100's 132 SMs)."""
    tiles = rows_matmul.tiles_for(n, k, torch.device("cpu"))
    x, w = torch.randn(rows, k, dtype=BF16), torch.randn(n, k, dtype=BF16)
    rows_matmul.rows_linear(x, w, torch.randn(n, dtype=BF16))
    sums = rows_matmul.rows_linear(x, w, split_sum=True)  # split K: partials left to the norm, which sums them
    fused.rmsnorm(sums, torch.ones(n, dtype=BF16), 1e-6, residual=torch.randn(rows, n, dtype=BF16))
    assert_compiled(hopper, "_rows_kernel", "_rmsnorm_kernel")
    ptx = "".join(kernel.asm["ptx"] for kernel in hopper["_rows_kernel"])
    assert "prefetch.global.L2" in ptx and "griddepcontrol.wait" in ptx
    assert ("atom.global.gpu.acq_rel.add" in ptx) == (tiles.split_k > 1)


@pytest.mark.parametrize("rows", [16, 64])
def test_few_rows_matmul_epilogues(hopper, rows):
    """The 2-64-row matmul's SiLU-and-mul (gate_up of a 0.6B) and q/k/v heads (its qkv, a head a tile, K split)
    epilogues."""
    x = torch.randn(rows, 1024, dtype=BF16)
    rows_matmul.rows_linear(x, torch.randn(6144, 1024, dtype=BF16), silu_mul=True)
    cache = torch.zeros(64, 16, 8, 128, dtype=BF16)
    positions = torch.arange(rows)
    heads = skinny_matmul.HeadsEpilogue(16, 8, 128, torch.ones(128, dtype=BF16), torch.ones(128, dtype=BF16), 1e-6,
                                        torch.randn(4096, 128), positions, cache, cache.clone(), positions)
    assert rows_matmul.tiles_for(4096, 1024, torch.device("cpu"), 128).split_k > 1
    rows_matmul.rows_linear(x, torch.randn(4096, 1024, dtype=BF16), heads=heads)
    assert_compiled(hopper, "_rows_kernel")
    assert len(hopper["_rows_kernel"]) == 2
    # the heads epilogue's slots, positions and cos / sin load before the wait; SiLU-and-mul's tile reads nothing there
    silu_mul, with_heads = hopper["_rows_kernel"]
    assert loads_before_wait(silu_mul) == 0 and loads_before_wait(with_heads) >= 4


def test_moe_kernels(hopper):
    experts, hidden, inter, top_k = 16, 512, 256, 4
    w_gate_up, w_down = torch.randn(experts, 2 * inter, hidden, dtype=BF16), torch.randn(experts, hidden, inter, dtype=BF16)
    table = torch.zeros(16, 2, top_k, dtype=torch.int32)
    x1 = torch.randn(1, hidden, dtype=BF16)
    routed = fused_moe.RoutedWrite(table, torch.tensor([3]), layer=1)
    fused_moe.moe_pairs(x1, w_gate_up, w_down, torch.randn(1, experts, dtype=BF16), top_k, True,  # batch 1: norm + R3
                        fused_moe.InputNorm(torch.ones(hidden, dtype=BF16), 1e-6), routed)
    fused_moe.moe_pairs(x1, w_gate_up, w_down, torch.randn(1, experts, dtype=BF16), top_k, False)
    weights, ids = fused_moe.topk_softmax(torch.randn(64, experts, dtype=BF16), top_k, True,
                                          fused_moe.RoutedWrite(table, torch.zeros(64, dtype=torch.int64), layer=0))
    ids = torch.randint(0, experts, (64, top_k))  # the stand-in launch computed nothing: real ids for the grouping
    fused_moe._moe_grouped(torch.randn(64, hidden, dtype=BF16), w_gate_up, w_down, weights, ids)
    assert_compiled(hopper, "_topk_softmax_kernel", "_gate_up_pairs_kernel", "_down_pairs_kernel",
                    "_gate_up_grouped_kernel", "_down_grouped_kernel")


@pytest.mark.parametrize("dtype", [BF16, torch.float32])
def test_attention_kernels(hopper, dtype):
    lens = [5, 700, 64, 2000]
    pages = torch.randperm(200).to(torch.int32).view(4, 50)
    k_cache, v_cache = torch.randn(200, 16, 8, 128, dtype=dtype), torch.randn(200, 16, 8, 128, dtype=dtype)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(4, 16, 128, dtype=dtype)
    order = torch.argsort(seq_lens, descending=True).to(torch.int32)
    for splits in (1, 8, 64):  # one split writes the output itself; several (up to the most) are merged by the last to finish
        ta.paged_decode_attention(q, k_cache, v_cache, pages, seq_lens, 0.088, num_splits=splits, order=order)
    ta.paged_decode_attention(q, k_cache, v_cache, pages, seq_lens, 0.088)  # batch order, the shape-chosen splits
    mid = ta._decode_config(128, dtype, ta.DecodePlan(4, 256, 1))  # a mid-size batch's plan: long sequences split
    ta._decode_launch(q, k_cache, v_cache, pages, seq_lens, 0.088, torch.empty_like(q), order=order, **mid)
    with pytest.MonkeyPatch.context() as patch:  # or by the merge kernel
        patch.setattr(ta, "_MERGE_IN_PLACE", False)
        ta.paged_decode_attention(q, k_cache, v_cache, pages, seq_lens, 0.088, num_splits=8)
    cu = torch.tensor([0, 5, 37, 38, 102], dtype=torch.int32)
    ta.paged_prefill_attention(torch.randn(102, 16, 128, dtype=dtype), k_cache, v_cache, pages, cu, seq_lens, 64, 0.088)
    assert_compiled(hopper, "_decode_split_kernel", "_decode_reduce_kernel", "_prefill_kernel")
    # unused splits exit before the PDL wait, the others wait (inside the branch) before reading q
    assert all("griddepcontrol.wait" in k.asm["ptx"] for k in hopper["_decode_split_kernel"])
    # keys and values are loaded evict-first (HOTSWAP_EVICT_FIRST)
    assert all("L2::evict_first" in k.asm["ptx"] for k in hopper["_decode_split_kernel"])
