"""Where a run's device time goes: torch.profiler over one call, the kernels summed by what they do, and how much
of the wall the device spent idle (waiting on the host: scheduling, launches, read-back, Python).

    from kernel_profile import profile_call
    table = profile_call(lambda: engine.generate(...), device)

The categories follow the kernels' names (ours are Triton functions named in hotswap/kernels/; cuBLAS and
PyTorch kernels by their library prefixes). CUDA only: kernel activity is recorded process-wide, whichever
thread launched it (the engine's scheduler thread does).
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
from torch.profiler import ProfilerActivity, profile

# (category, substrings of a kernel's name), first match wins; matched on the lower-cased name
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("attention", ("attention", "_decode_split", "_decode_reduce", "_prefill_kernel", "flash", "sdpa")),
    ("MoE experts", ("_pairs_kernel", "_grouped_kernel", "topk_softmax")),
    ("batch-1 matmuls", ("_skinny_kernel",)),
    ("matmuls (cuBLAS)", ("gemm", "gemv", "cutlass", "xmma", "nvjet", "matmul", "addmm", " mm", "linear")),
    ("sampling", ("_partials_kernel", "_finish_kernel", "_chunk_max", "_pick_kernel", "sample", "softmax", "topk",
                  "sort", "argmax", "gumbel")),
    ("norms, rotary, KV store", ("rmsnorm", "norm_rope", "silu", "embed", "layer_norm", "rotary")),
    ("copies", ("memcpy", "memset", "copy", "fill")),  # PyTorch's cat is CatArrayBatchedCopy
)


def category(name: str) -> str:
    low = name.lower()
    for label, keys in CATEGORIES:
        if any(k in low for k in keys):
            return label
    return "other"


def profile_call(fn: Callable[[], object], device: torch.device) -> tuple[list[list], float, float]:
    """Run `fn` once under the profiler. Returns (rows [category, device ms, % of device time, kernels] sorted by
    time, the wall seconds, the device-busy seconds: the kernels' time summed, so idle = wall - busy)."""
    if device.type != "cuda":
        raise ValueError("profile_call records CUDA kernels; it needs a CUDA device")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize(device)
        wall = time.perf_counter() - start
    totals: dict[str, list[float]] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CUDA:
            continue
        us = evt.time_range.elapsed_us()
        slot = totals.setdefault(category(evt.name), [0.0, 0])
        slot[0] += us
        slot[1] += 1
    busy_us = sum(t for t, _ in totals.values())
    rows = [[label, f"{t / 1e3:,.1f}", f"{100 * t / busy_us:.1f}%" if busy_us else "-", f"{n:,}"]
            for label, (t, n) in sorted(totals.items(), key=lambda kv: -kv[1][0])]
    return rows, wall, busy_us / 1e6
