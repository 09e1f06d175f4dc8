"""Batch-1 decode matmuls: the fused skinny kernels beside cuBLAS (`F.linear`, plus the separate
norm / SiLU kernel it needs) and beside the HBM bandwidth limit, on a model shape's four layer matmuls.

    python bench/skinny_matmul.py --shape qwen3-0.6b

Each case is captured in a CUDA graph over 8 weight copies used in turn (more bytes than L2 holds), so
the time is one launch reading its weights from HBM, as in a decode step.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, d2d_bytes_per_s, device_name, graph_time_us, print_table  # noqa: E402

from hotswap.kernels import fused  # noqa: E402
from hotswap.kernels import skinny_matmul as sm  # noqa: E402

COPIES = 8


def cases(shape: dict) -> list[tuple[str, int, int, int]]:
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    return [("qkv (add+norm)", qkv, h, sm.ADD_NORM), ("o_proj", h, shape["num_attention_heads"] * d, sm.PLAIN),
            ("gate_up (add+norm)", 2 * i, h, sm.ADD_NORM), ("down (silu*mul)", h, i, sm.SILU_MUL)]


def sweep(name, n, k, prologue, x, r, nw, ws, t_default) -> None:
    """Time every tile shape for one matmul and print the best few beside the heuristic's choice."""
    results = []
    it = iter(range(10**9))
    for block_n in (1, 2, 4, 8, 16, 32):
        for block_k in (256, 512, 1024, 2048, 4096):
            if block_k > 2 * k or block_n * block_k > 16384:
                continue
            for warps in (2, 4, 8):
                blocks = (block_n, block_k, warps)

                def run():
                    return sm.skinny_linear(x, ws[next(it) % COPIES], prologue=prologue,
                                            residual=r if prologue == sm.ADD_NORM else None, norm_weight=nw, eps=1e-6, blocks=blocks)

                results.append((graph_time_us(run, COPIES, reps=10), blocks))
    results.sort()
    best = ", ".join(f"{b} {t:.2f}" for t, b in results[:4])
    print(f"sweep {name} {n}x{k}: heuristic {t_default:.2f} us; best (BLOCK_N, BLOCK_K, warps) us: {best}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--sweep", action="store_true", help="also time (BLOCK_N, BLOCK_K, warps) variants per matmul")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    rows, totals = [], {"ours": 0.0, "cublas": 0.0, "floor": 0.0}
    for name, n, k, prologue in cases(SHAPES[args.shape]):
        ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(COPIES)]
        nw = torch.randn(k, device=dev, dtype=dt)
        it = iter(range(10**9))
        x = torch.randn(1, 2 * k if prologue == sm.SILU_MUL else k, device=dev, dtype=dt)
        r = torch.randn(1, k, device=dev, dtype=dt)

        def ours():
            return sm.skinny_linear(x, ws[next(it) % COPIES], prologue=prologue, residual=r if prologue == sm.ADD_NORM else None,
                                    norm_weight=nw, eps=1e-6)

        def cublas():
            w = ws[next(it) % COPIES]
            if prologue == sm.ADD_NORM:
                return F.linear(fused.rmsnorm(x, nw, 1e-6, residual=r.clone()), w)
            if prologue == sm.SILU_MUL:
                return F.linear(fused.silu_and_mul(x), w)
            return F.linear(x, w)

        def cublas_alone():
            return F.linear(x[:, :k], ws[next(it) % COPIES])

        t_ours, t_cublas, t_gemm = (graph_time_us(fn, COPIES) for fn in (ours, cublas, cublas_alone))
        if args.sweep:
            sweep(name, n, k, prologue, x, r, nw, ws, t_ours)
        floor = n * k * 2 / d2d_bytes_per_s(torch.device("cuda")) * 1e6  # one read of W at the measured D2D rate, as the decode roofline counts
        for key, t in (("ours", t_ours), ("cublas", t_cublas), ("floor", floor)):
            totals[key] += t
        rows.append([name, f"{n}x{k}", f"{t_ours:.2f}", f"{n * k * 2 / t_ours / 1e3:,.0f}", f"{t_cublas:.2f}",
                     f"{t_gemm:.2f}", f"{floor:.2f}", f"{100 * floor / t_ours:.0f}%"])
    rows.append(["layer total", "", f"{totals['ours']:.2f}", "", f"{totals['cublas']:.2f}", "", f"{totals['floor']:.2f}",
                 f"{100 * totals['floor'] / totals['ours']:.0f}%"])
    print_table(f"batch-1 matmuls, {args.shape}, {device_name(dev)}, bf16 (us per call, weights from HBM)",
                ["matmul", "N x K", "ours us", "ours GB/s", "cuBLAS + separate prologue us", "cuBLAS matmul alone us",
                 "floor us (W at measured D2D)", "% of floor"], rows)


if __name__ == "__main__":
    main()
