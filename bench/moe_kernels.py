"""The MoE layer's kernels on one layer of a model shape (default Qwen3-30B-A3B: H 2048, I 768, 128 experts,
top-8, bf16): each batch size's time beside the bytes it must read at the measured device-to-device bandwidth,
and beside the PyTorch per-expert loop (`moe_reference`) in the same process; the router after its logits as one
kernel (`topk_softmax`) beside torch's softmax/top-k/renormalise/cast (`topk_softmax_reference`). Each call
starts from the router's logits (at decode sizes the two kernels route the tokens themselves). At decode sizes
it also sweeps the decode kernels' tile shapes (`PairsBlocks`) and prints the best beside the default.

    python bench/moe_kernels.py                                # GPU
    python bench/moe_kernels.py --batches 1,8 --no-sweep

Each case is one CUDA graph of calls cycling over 8 routings and 2 copies of the layer's weights (2.4 GB, far
more than L2 holds), so a call reads its experts from HBM as in a decode step. Routing is uniform at random
(random logits: k distinct experts a token); the bytes are the distinct experts a call touches, gate/up plus down.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, d2d_bytes_per_s, device_name, graph_time_us, print_table  # noqa: E402

from hotswap.kernels import fused_moe as fm  # noqa: E402

ROUTINGS, COPIES = 8, 2


def routings(t: int, e: int, device) -> list[torch.Tensor]:
    """Router logits [t, e], one set a routing."""
    return [torch.randn(t, e, device=device, dtype=torch.bfloat16) for _ in range(ROUTINGS)]


def bytes_touched(routes, k: int, expert_bytes: int, t: int, h: int) -> float:
    distinct = sum(torch.unique(fm.topk_softmax_reference(logits, k, True)[1]).numel() for logits in routes) / len(routes)
    return distinct * expert_bytes + 2 * t * h * 2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen3-30b-a3b")
    ap.add_argument("--batches", default="1,2,4,8,16,64,256")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/moe_kernels.py times CUDA kernels; it needs a GPU")
    dev = torch.device("cuda")
    s = SHAPES[args.shape]
    h, i, e, k = s["hidden_size"], s["moe_intermediate_size"], s["num_experts"], s["num_experts_per_tok"]
    gate_up = [torch.randn(e, 2 * i, h, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    down = [torch.randn(e, h, i, device=dev, dtype=torch.bfloat16) * 0.02 for _ in range(COPIES)]
    expert_bytes = 3 * i * h * 2
    bw = d2d_bytes_per_s(dev)

    def timer(t: int, fn, graph: bool = True):
        """(us per call, bytes a call reads). `graph=False` for the PyTorch loop, which syncs with the host
        (per-expert counts) and so cannot be captured: timed call by call with events instead."""
        x = torch.randn(t, h, device=dev, dtype=torch.bfloat16)
        routes = routings(t, e, dev)
        calls = itertools.count()

        def one():
            n = next(calls)
            return fn(x, gate_up[n % COPIES], down[n % COPIES], routes[n % ROUTINGS])

        if graph:
            us = graph_time_us(one, calls=ROUTINGS * COPIES)
        else:
            one()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(ROUTINGS * COPIES):
                one()
            end.record()
            end.synchronize()
            us = start.elapsed_time(end) * 1e3 / (ROUTINGS * COPIES)
        return us, bytes_touched(routes, k, expert_bytes, t, h)

    def torch_layer(x, gu, dn, logits):
        return fm.moe_reference(x, gu, dn, *fm.topk_softmax_reference(logits, k, True))

    rows = []
    for t in [int(b) for b in args.batches.split(",")]:
        us, nbytes = timer(t, lambda x, gu, dn, logits: fm.fused_moe(x, gu, dn, logits, k, True))
        ref_us, _ = timer(t, torch_layer, graph=False) if t <= 64 else (float("nan"), 0)
        floor_us = nbytes / bw * 1e6
        logits = torch.randn(t, e, device=dev, dtype=torch.bfloat16)
        route_us = graph_time_us(lambda: fm.topk_softmax(logits, k, True), calls=16)
        torch_route_us = graph_time_us(lambda: fm.topk_softmax_reference(logits, k, True), calls=16)
        rows.append([t, "pairs" if t <= fm.SMALL_BATCH_MAX_TOKENS else "grouped", f"{us:.1f}", f"{ref_us:.1f}",
                     f"{floor_us:.1f}", f"{nbytes / us / 1e3:,.0f}", f"{floor_us / us:.1%}", f"{route_us:.1f}",
                     f"{torch_route_us:.1f}"])
    print_table(f"MoE layer, {args.shape} (H {h}, I {i}, {e} experts, top-{k}), bf16, {device_name(dev)}; "
                f"D2D {bw / 1e9:,.0f} GB/s (measured, read + write)",
                ["tokens", "path", "fused us (from logits)", "PyTorch loop us", "HBM floor us", "GB/s read", "% of D2D",
                 "routing kernel us", "torch routing us"], rows)
    if args.no_sweep:
        return
    default = fm.PAIRS_BLOCKS

    def pairs(b: fm.PairsBlocks):
        return lambda x, gu, dn, logits: fm.moe_pairs(x, gu, dn, logits, k, True, blocks=b)

    for t in (1, 8):
        found = []
        for n, kk, wp in itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8)):
            b = fm.PairsBlocks(gate_up_n=n, gate_up_k=kk, gate_up_warps=wp, down_n=default.down_n, down_k=default.down_k,
                               down_warps=default.down_warps)
            found.append((timer(t, pairs(b))[0], b))
        best_gu = min(found, key=lambda f: f[0])[1]
        for n, kk, wp in itertools.product((8, 16, 32, 64), (128, 256, 512), (4, 8)):
            b = fm.PairsBlocks(gate_up_n=best_gu.gate_up_n, gate_up_k=best_gu.gate_up_k, gate_up_warps=best_gu.gate_up_warps,
                               down_n=n, down_k=kk, down_warps=wp)
            found.append((timer(t, pairs(b))[0], b))
        found.sort(key=lambda f: f[0])
        base = timer(t, pairs(default))[0]
        print(f"pairs sweep, {t} token(s): default {base:.1f} us; best: " +
              "; ".join(f"{us:.1f} us {b}" for us, b in found[:4]), flush=True)


if __name__ == "__main__":
    main()
