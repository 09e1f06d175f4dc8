"""Greedy choice over a decode step's logits: our two-pass Triton argmax (`kernels/argmax.py`) beside
`torch.argmax` and beside the time to read the logits once at HBM bandwidth.

    python bench/argmax.py --vocab 151936 --rows 1 64 256

Each case is a CUDA graph of 20 calls on bf16 logits [rows, vocab] (as the LM head leaves them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import d2d_bytes_per_s, device_name, graph_time_us, print_table  # noqa: E402

from hotswap.kernels.argmax import argmax_rows  # noqa: E402

CALLS = 20


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 64, 256])
    args = ap.parse_args()
    dev = torch.device("cuda")
    table = []
    for rows in args.rows:
        x = torch.randn(rows, args.vocab, device=dev).to(torch.bfloat16)
        out = torch.empty(rows, dtype=torch.int64, device=dev)
        assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
        ours = graph_time_us(lambda: argmax_rows(x, out=out), CALLS)
        peer = graph_time_us(lambda: torch.argmax(x, dim=-1, out=out), CALLS)
        floor = x.numel() * x.element_size() / d2d_bytes_per_s(x.device) * 1e6
        table.append([str(rows), f"{ours:.2f}", f"{peer:.2f}", f"{floor:.2f}"])
    print_table(f"argmax over [rows, {args.vocab}] bf16 logits, {device_name(dev)} (us per call)",
                ["rows", "ours us", "torch.argmax us", f"floor us (one read at {d2d_bytes_per_s(x.device) / 1e12:.2f} TB/s, measured)"], table)


if __name__ == "__main__":
    main()
