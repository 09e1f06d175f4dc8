"""Decode matmuls of a few rows: kernels/rows_matmul.py beside cuBLAS (`F.linear`) and beside the HBM limit, on
a model shape's four layer matmuls at 16-64 rows.

    python bench/rows_matmul.py --shape qwen3-0.6b --rows 16,64 --sweep

Each case is captured in a CUDA graph over 8 weight copies used in turn (more bytes than L2 holds), so a call
reads its weights from HBM, as in a decode step. "alone" chains the matmuls back to back; "after norm" puts
the RMSNorm kernel a decode layer runs before q/k/v and gate/up (launched with PDL) in front of each, which is
the neighbour whose tail our kernel's L2 prefetch overlaps and cuBLAS's does not.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, d2d_bytes_per_s, device_name, graph_time_us, print_table  # noqa: E402

from hotswap.kernels import fused  # noqa: E402
from hotswap.kernels import rows_matmul as rm  # noqa: E402

COPIES = 8


def cases(shape: dict) -> list[tuple[str, int, int]]:
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    return [("qkv", qkv, h), ("o_proj", h, shape["num_attention_heads"] * d), ("gate_up", 2 * i, h), ("down", h, i)]


def sweep_tiles(n: int, k: int, device: torch.device) -> list[rm.Tiles]:
    base = rm.tiles_for(n, k, device)
    out = []
    for block_n, block_k, split, stages in itertools.product(
            (32, 64), (128, 256), (base.split_k // 2, base.split_k, base.split_k * 2), (3, 5)):
        if split < 1 or n % block_n or k % (split * block_k) or (block_n == 32 and n > 1024):
            continue
        pf = base.prefetch_k
        while (k // split) % pf:
            pf //= 2
        out.append(rm.Tiles(block_n, block_k, split, stages, 4, pf))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--rows", default="16,32,64")
    ap.add_argument("--sweep", action="store_true", help="also time tile variants at the largest row count")
    args = ap.parse_args()
    dev, dt = torch.device("cuda"), torch.bfloat16
    bw = d2d_bytes_per_s(dev)
    row_counts = [int(r) for r in args.rows.split(",")]
    table, totals = [], {}
    for rows in row_counts:
        for name, n, k in cases(SHAPES[args.shape]):
            ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(COPIES)]
            x = torch.randn(rows, k, device=dev, dtype=dt)
            r = torch.randn(rows, k, device=dev, dtype=dt)
            nw = torch.randn(k, device=dev, dtype=dt)
            it = itertools.count()
            err = (rm.rows_linear(x, ws[0]).float() - F.linear(x, ws[0]).float()).abs().max().item()

            def ours(tiles=None):
                return rm.rows_linear(x, ws[next(it) % COPIES], tiles=tiles)

            def cublas():
                return F.linear(x, ws[next(it) % COPIES])

            def after_norm(mm):
                return lambda: mm(fused.rmsnorm(x, nw, 1e-6, residual=r))

            no_prefetch = dataclasses.replace(rm.tiles_for(n, k, dev), prefetch_k=0)
            t = {"ours": graph_time_us(ours, COPIES), "cublas": graph_time_us(cublas, COPIES),
                 "ours_no_prefetch": graph_time_us(lambda: ours(no_prefetch), COPIES),
                 "ours_norm": graph_time_us(after_norm(lambda h: rm.rows_linear(h, ws[next(it) % COPIES])), COPIES),
                 "cublas_norm": graph_time_us(after_norm(lambda h: F.linear(h, ws[next(it) % COPIES])), COPIES),
                 "ours_norm_no_prefetch": graph_time_us(after_norm(lambda h: rm.rows_linear(h, ws[next(it) % COPIES],
                                                                                           tiles=no_prefetch)), COPIES)}
            floor = n * k * 2 / bw * 1e6
            for key, v in (*t.items(), ("floor", floor)):
                totals[(rows, key)] = totals.get((rows, key), 0.0) + v
            table.append([rows, name, f"{n}x{k}", str(rm.tiles_for(n, k, dev)), f"{t['ours']:.2f}", f"{t['ours_no_prefetch']:.2f}",
                          f"{t['cublas']:.2f}", f"{t['ours_norm']:.2f}", f"{t['ours_norm_no_prefetch']:.2f}",
                          f"{t['cublas_norm']:.2f}", f"{floor:.2f}",
                          f"{100 * floor / t['ours']:.0f}% / {100 * floor / t['cublas']:.0f}%", f"{err:.1e}"])
            if args.sweep and rows == max(row_counts):
                results = []
                for tl in sweep_tiles(n, k, dev):
                    try:
                        results.append((graph_time_us(lambda tl=tl: ours(tl), COPIES, reps=10), tl))
                    except triton.runtime.errors.OutOfResources:  # too many stages of too wide a tile for shared memory
                        continue
                results.sort()
                best = "; ".join(f"{tl} {us:.2f}" for us, tl in results[:5])
                print(f"sweep {name} {n}x{k} rows {rows}: heuristic {t['ours']:.2f} us, cuBLAS {t['cublas']:.2f}; best: {best}",
                      flush=True)
        table.append([rows, "layer total", "", "", *(f"{totals[(rows, key)]:.2f}" for key in
                                                      ("ours", "ours_no_prefetch", "cublas", "ours_norm",
                                                       "ours_norm_no_prefetch", "cublas_norm", "floor")),
                      f"{100 * totals[(rows, 'floor')] / totals[(rows, 'ours')]:.0f}% / "
                      f"{100 * totals[(rows, 'floor')] / totals[(rows, 'cublas')]:.0f}%", ""])
    print_table(f"decode matmuls of a few rows, {args.shape}, {device_name(dev)}, bf16, D2D {bw / 1e9:,.0f} GB/s "
                "(us per call, weights from HBM)",
                ["rows", "matmul", "N x K", "tiles", "ours us", "ours, no L2 prefetch", "cuBLAS us", "norm + ours us",
                 "norm + ours, no prefetch", "norm + cuBLAS us",
                 "floor us (W at D2D)", "% of floor ours / cuBLAS", "max |ours - cuBLAS|"], table)


if __name__ == "__main__":
    main()
