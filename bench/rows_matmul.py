"""Decode matmuls of a few rows: kernels/rows_matmul.py beside cuBLAS (`F.linear`) and beside the HBM limit, on
a model shape's four layer matmuls at 16-64 rows.

    python bench/rows_matmul.py --shape qwen3-0.6b --rows 16,64 --sweep

Each case is captured in a CUDA graph over 8 weight copies used in turn (more bytes than L2 holds), so a call
reads its weights from HBM, as in a decode step. The first columns chain the matmuls back to back; "in layer"
puts the kernel a decode layer runs before each in front of it: RMSNorm (launched with PDL) before q/k/v and
gate/up, SiLU-and-mul before down.
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
KEYS = ("ours", "ours_no_prefetch", "cublas", "layer_ours", "layer_cublas")


def cases(shape: dict) -> list[tuple[str, int, int, str]]:
    """(name, N, K, the kernel a decode layer runs before it: "norm" (RMSNorm), "silu" (SiLU-and-mul) or "")."""
    h, i, d = shape["hidden_size"], shape["intermediate_size"], shape["head_dim"]
    qkv = (shape["num_attention_heads"] + 2 * shape["num_key_value_heads"]) * d
    return [("qkv", qkv, h, "norm"), ("o_proj", h, shape["num_attention_heads"] * d, ""), ("gate_up", 2 * i, h, "norm"),
            ("down", h, i, "silu")]


def sweep_tiles(n: int, k: int, device: torch.device, rows: int) -> list[rm.Tiles]:
    base = rm.tiles_for(n, k, device, 64, rows)
    out = []
    splits = sorted({1, base.split_k // 2, base.split_k, base.split_k * 2})  # unsplit too: no partials' round trip
    for block_n, block_k, split, stages in itertools.product((32, 64, 128), (128, 256), splits, (3, 4, 5)):  # 128: x read half as often
        if split < 1 or n % block_n or k % (split * block_k) or (block_n == 32 and n > 1024):
            continue
        out.append(rm.Tiles(block_n, block_k, split, stages, rm.prefetch_k(k // split)))
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
        for name, n, k, before in cases(SHAPES[args.shape]):
            ws = [torch.randn(n, k, device=dev, dtype=dt) * k**-0.5 for _ in range(COPIES)]
            x = torch.randn(rows, 2 * k if before == "silu" else k, device=dev, dtype=dt)
            r = torch.randn(rows, k, device=dev, dtype=dt)
            nw = torch.randn(k, device=dev, dtype=dt)
            it = itertools.count()
            x_mm = fused.silu_and_mul(x) if before == "silu" else x  # what the matmul itself multiplies
            err = (rm.rows_linear(x_mm, ws[0]).float() - F.linear(x_mm, ws[0]).float()).abs().max().item()
            heuristic = rm.tiles_for(n, k, dev, 64, rows)  # what rows_linear picks at these rows
            no_prefetch = dataclasses.replace(heuristic, prefetch_k=0)
            # rows_linear keeps larger weights on cuBLAS: there "ours" times cuBLAS too, and the table says so
            tiles_label = (str(heuristic) if n * k * 2 <= rm.MAX_WEIGHT_BYTES
                           else f"cuBLAS (weight over {rm.MAX_WEIGHT_BYTES >> 20} MiB)")

            def ours(tiles=None):
                return rm.rows_linear(x_mm, ws[next(it) % COPIES], tiles=tiles)

            def cublas():
                return F.linear(x_mm, ws[next(it) % COPIES])

            def in_layer(mm):
                """The matmul with the kernel a decode layer runs before it."""
                if before == "norm":
                    return lambda: mm(fused.rmsnorm(x, nw, 1e-6, residual=r))
                if before == "silu":
                    return lambda: mm(fused.silu_and_mul(x))
                return lambda: mm(x)

            t = {"ours": graph_time_us(ours, COPIES), "ours_no_prefetch": graph_time_us(lambda: ours(no_prefetch), COPIES),
                 "cublas": graph_time_us(cublas, COPIES),
                 "layer_ours": graph_time_us(in_layer(lambda h: rm.rows_linear(h, ws[next(it) % COPIES])), COPIES),
                 "layer_cublas": graph_time_us(in_layer(lambda h: F.linear(h, ws[next(it) % COPIES])), COPIES)}
            floor = n * k * 2 / bw * 1e6
            for key, v in (*t.items(), ("floor", floor)):
                totals[(rows, key)] = totals.get((rows, key), 0.0) + v
            table.append([rows, name + (f" ({before} before)" if before else ""), f"{n}x{k}", tiles_label,
                          *(f"{t[key]:.2f}" for key in KEYS), f"{floor:.2f}",
                          f"{100 * floor / t['ours']:.0f}% / {100 * floor / t['cublas']:.0f}%", f"{err:.1e}"])
            if args.sweep and rows == max(row_counts):
                results = []
                for tl in sweep_tiles(n, k, dev, rows):
                    try:
                        results.append((graph_time_us(lambda tl=tl: ours(tl), COPIES, reps=10), tl))
                    except triton.runtime.errors.OutOfResources:  # too many stages of too wide a tile for shared memory
                        continue
                results.sort()
                best = "; ".join(f"{tl} {us:.2f}" for us, tl in results[:5])
                print(f"sweep {name} {n}x{k} rows {rows}: heuristic {t['ours']:.2f} us, cuBLAS {t['cublas']:.2f}; best: {best}",
                      flush=True)
        table.append([rows, "layer total", "", "", *(f"{totals[(rows, key)]:.2f}" for key in (*KEYS, "floor")),
                      f"{100 * totals[(rows, 'floor')] / totals[(rows, 'ours')]:.0f}% / "
                      f"{100 * totals[(rows, 'floor')] / totals[(rows, 'cublas')]:.0f}%", ""])
    print_table(f"decode matmuls of a few rows, {args.shape}, {device_name(dev)}, bf16, D2D {bw / 1e9:,.0f} GB/s "
                "(us per call, weights from HBM)",
                ["rows", "matmul", "N x K", "tiles", "ours us", "ours, no L2 prefetch", "cuBLAS us",
                 "in layer: kernel before + ours", "in layer: kernel before + cuBLAS",
                 "floor us (W at D2D)", "% of floor ours / cuBLAS", "max |ours - cuBLAS|"], table)


if __name__ == "__main__":
    main()
