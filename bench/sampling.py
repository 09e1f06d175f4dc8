"""The fused sampling kernels (kernels/sampling.py) beside the eager PyTorch sampler they replace
(runner/sampler.py `reference_sample`, the same function), on bf16 logits of a 152K vocabulary, and
beside the floor of reading the logits once at the D2D bandwidth measured in this run. Times are
CUDA-graph replays for the kernels (as inside a decode step's graph), launches from Python for the
eager sampler (its filters sync on the host); each row compares the kernels' tokens with the
reference's first.

    python bench/sampling.py --rows 1,64,256,512
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ceilings_line, d2d_bytes_per_s, device_name, graph_time_us, print_table  # noqa: E402

from hotswap.kernels import sampling  # noqa: E402
from hotswap.runner.sampler import SamplingBatch, reference_sample  # noqa: E402

MODES = {  # name -> (temperature, top_k, top_p, min_p); top_k 0 = off
    "greedy + logprobs": (0.0, 0, 1.0, 0.0),
    "T=1 + logprobs": (1.0, 0, 1.0, 0.0),
    "T=0.8, top_p 0.9": (0.8, 0, 0.9, 0.0),
    "T=0.8, top_k 50, min_p 0.05": (0.8, 50, 1.0, 0.05),
}


def eager_time_us(fn, reps: int = 5) -> float:
    """Median time of `fn()` launched from Python (the reference syncs on the host for its filters, so it
    cannot be captured in a graph)."""
    fn()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,64,256,512")
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--out", default=None, help="append the table to this file")
    args = ap.parse_args()
    dev = torch.device("cuda")
    bw = d2d_bytes_per_s(dev)
    table = []
    for b in (int(r) for r in args.rows.split(",")):
        logits = (torch.randn(b, args.vocab, device=dev) * 3).to(torch.bfloat16)
        for name, (t, k, p, mp) in MODES.items():
            f = lambda v, dt=torch.float32: torch.full((b,), v, dtype=dt, device=dev)
            sb = SamplingBatch(temperatures=f(t), top_ks=f(k or args.vocab, torch.int64), top_ps=f(p), min_ps=f(mp),
                               seeds=torch.arange(b, device=dev), steps=f(3, torch.int64), all_greedy=t == 0,
                               needs_filter=bool(k) or p < 1 or mp > 0, needs_logprobs=True, max_top_logprobs=0)
            temps = None if sb.all_greedy else sb.temperatures
            fused = lambda: sampling.sample_rows(logits, temps, sb.top_ks, sb.top_ps, sb.min_ps, sb.seeds, sb.steps, original=False)
            same = (fused()[0] == reference_sample(logits, sb)[0]).float().mean().item()
            t_fused = graph_time_us(fused, 10)
            t_eager = eager_time_us(lambda: reference_sample(logits, sb))
            floor = logits.numel() * logits.element_size() / bw * 1e6
            table.append([b, name, f"{t_fused:.1f}", f"{t_eager:.1f}", f"{t_eager / t_fused:.1f}x", f"{floor:.1f}",
                          f"{100 * floor / t_fused:.0f}%", f"{100 * same:.2f}%"])
    text = print_table(f"fused sampling, V={args.vocab}, bf16 logits, {device_name(dev)}; {ceilings_line(dev)}",
                       ["rows", "mode", "fused us", "eager PyTorch us", "speed-up", "floor us (one read)", "% of floor", "same tokens"], table)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write(text + "\n\n")


if __name__ == "__main__":
    main()
