"""A/B of decode settings over whole `generate` calls (the kernel-alone sweeps of bench/attention_kernels.py do
not see PDL or the neighbouring kernels of a decode graph): decode attention's launch plan and split merge, and
the batch-1 q/k/v matmul finishing its heads. The peer of each variant is the current setting in the same process;
the limit is the decode roofline of bench/throughput.py. Beside the calls' tokens/s, each variant's decode graph
is replayed alone: a step slower than the replay is host-bound.

Engines are built one after the other in this process, each with the setting patched in before its graphs
are captured; every setting runs `--rounds` times, `--calls` timed calls each (medians printed).

    python bench/attention_ab.py --batch 1 --variants current,merge-kernel,no-heads
    python bench/attention_ab.py --batch 64 --variants current,no-long-splits,one-stage
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint, d2d_bytes_per_s, decode_graph_replay_ms, print_table  # noqa: E402
from throughput import roofline_tok_s  # noqa: E402

from hotswap import Engine  # noqa: E402
from hotswap.kernels import skinny_matmul  # noqa: E402
from hotswap.kernels import triton_attention as ta  # noqa: E402

CURRENT_PLAN = ta.decode_plan


def one_stage(*shape, **kw):
    return replace(CURRENT_PLAN(*shape, **kw), num_stages=1)


def two_stages(*shape, **kw):
    return replace(CURRENT_PLAN(*shape, **kw), num_stages=2)


def eight_splits(*shape, **kw):
    plan = CURRENT_PLAN(*shape, **kw)
    return replace(plan, num_splits=min(plan.num_splits, 8))


def no_long_splits(*shape, **kw):
    """The rule before mid-size batches split their long sequences: one split a sequence there, one stage."""
    plan = CURRENT_PLAN(*shape, **kw)
    return ta.DecodePlan(1, num_stages=1) if plan.min_chunk == ta._LONG_MIN_CHUNK else plan


# name -> {(module, attribute): value} patched in while that variant's engine is built and run
VARIANTS = {
    "current": {},
    "one-stage": {(ta, "decode_plan"): one_stage},
    "two-stages": {(ta, "decode_plan"): two_stages},
    "eight-splits": {(ta, "decode_plan"): eight_splits},
    "no-long-splits": {(ta, "decode_plan"): no_long_splits},
    "merge-kernel": {(ta, "_MERGE_IN_PLACE"): False},  # HOTSWAP_DECODE_MERGE=0
    "no-heads": {(skinny_matmul, "HEADS_EPILOGUE"): False},  # HOTSWAP_QKV_HEADS=0
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--variants", default="current,one-stage,two-stages")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=7)
    args = ap.parse_args()
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / args.shape, args.shape, max_positions=1024)
    ids = torch.randint(3, 500, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).tolist()
    sp = {"max_new_tokens": args.output, "temperature": 0, "ignore_eos": True}
    pages = args.batch * -(-(args.prompt + args.output + 1) // 16) + 256
    rows = []
    for rnd in range(args.rounds):
        for name in names:
            saved = {key: getattr(*key) for key in VARIANTS[name]}
            for (module, attr), value in VARIANTS[name].items():
                setattr(module, attr, value)
            try:
                engine = Engine(str(path), device="cuda", load_format="dummy", page_size=16, num_pages=pages,
                                max_running_requests=max(args.batch, 64))
                engine.generate(input_ids=ids, sampling_params=sp)
                engine.flush_cache()
                times = []
                for _ in range(args.calls):
                    torch.cuda.synchronize()
                    t = time.perf_counter()
                    engine.generate(input_ids=ids, sampling_params=sp)
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - t)
                    engine.flush_cache()
                replay = decode_graph_replay_ms(engine, args.batch)
                roof = roofline_tok_s(engine, args.batch, args.prompt, args.output, d2d_bytes_per_s(torch.device("cuda")))
                engine.shutdown()
            finally:
                for (module, attr), value in saved.items():
                    setattr(module, attr, value)
            times.sort()
            tokens = args.batch * args.output
            median = times[len(times) // 2]
            rows.append([rnd, name, f"{tokens / median:,.0f}", f"{tokens / times[0]:,.0f}", f"{tokens / times[-1]:,.0f}",
                         f"{roof:,.0f}", f"{median / args.output * 1e3:.3f}", f"{replay:.3f}"])
    print_table(f"decode A/B, {args.shape}, batch {args.batch}, {args.prompt}/{args.output}, output tok/s over whole generate calls",
                ["round", "variant", "median", "best", "worst", "decode roofline", "ms a token (call incl. prefill)",
                 "decode graph replay ms"], rows)


if __name__ == "__main__":
    main()
