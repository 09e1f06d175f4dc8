"""The decode attention kernels compile for Hopper (sm_90) on a machine without a GPU: Triton's own compiler and
ptxas, no driver. A kernel change that Triton's GPU frontend rejects (a construct the CPU interpreter accepts) fails
here, in CI, instead of on the lent GPU. Skipped where Triton or its CUDA backend is absent."""

from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")

from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from hotswap.kernels import triton_attention as ta  # noqa: E402

HOPPER = GPUTarget("cuda", 90, 32)
_POINTER = {torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.float32: "*fp32", torch.int32: "*i32", torch.int64: "*i64"}


def compile_for_hopper(fn, values: dict, constexprs: dict, **options):
    """Compile `fn` for sm_90: `values` gives each runtime argument as a dtype (a pointer to it), an int or a float."""
    signature = {}
    for param in fn.params:
        if param.is_constexpr:
            signature[param.name] = "constexpr"
        else:
            v = values[param.name]
            signature[param.name] = _POINTER[v] if isinstance(v, torch.dtype) else ("i32" if isinstance(v, int) else "fp32")
    try:
        return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs), target=HOPPER, options=options)
    except RuntimeError as exc:  # no CUDA backend in this Triton build (ptxas): nothing to check here
        if "ptxas" in str(exc) or "backend" in str(exc).lower():
            pytest.skip(f"Triton's CUDA backend cannot compile here: {exc}")
        raise


@pytest.mark.parametrize("dtype,group", [(torch.bfloat16, 2), (torch.bfloat16, 4), (torch.float16, 8), (torch.float32, 1)])
@pytest.mark.parametrize("direct,ordered", [(True, True), (False, True), (False, False)])
def test_decode_split_kernel_compiles_for_hopper(dtype, group, direct, ordered):
    values = dict(Q=dtype, K=dtype, V=dtype, PT=torch.int32, SEQ=torch.int32, ORDER=torch.int32, MID_O=torch.float32,
                  MID_LSE=torch.float32, OUT=dtype, qk_scale=0.1, stride_qb=1, stride_qh=1, stride_kp=1, stride_vp=1,
                  stride_ptb=1, stride_ob=1, stride_oh=1, num_splits=1)
    cfg = ta._decode_config(128, dtype, 1 if direct else 4)
    constexprs = dict(NUM_KV_HEADS=8, GROUP=group, BLOCK_H=max(16, group), HEAD_DIM=128, BLOCK_D=128, PAGE_SIZE=16,
                      BLOCK_N=cfg["block_n"], DIRECT=direct, MIN_CHUNK=cfg["block_n"], HAS_ORDER=ordered, USE_PDL=True,
                      PREC=ta._precision(torch.empty(0, dtype=dtype)))
    kernel = compile_for_hopper(ta._decode_split_kernel, values, constexprs, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    assert kernel.asm["cubin"]


@pytest.mark.parametrize("block_s", [2, 64])
def test_decode_merge_kernel_compiles_for_hopper(block_s):
    values = dict(MID_O=torch.float32, MID_LSE=torch.float32, SEQ=torch.int32, OUT=torch.bfloat16, stride_ob=1, stride_oh=1,
                  num_splits=block_s)
    constexprs = dict(NUM_HEADS=16, HEAD_DIM=128, BLOCK_D=128, BLOCK_S=block_s, MIN_CHUNK=64, USE_PDL=True)
    assert compile_for_hopper(ta._decode_reduce_kernel, values, constexprs, num_warps=4).asm["cubin"]
