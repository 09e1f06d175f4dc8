"""A/B of decode-attention launch settings over whole `generate` calls (the kernel-alone sweeps of
bench/attention_kernels.py do not see PDL or the neighbouring kernels of a decode graph). The peer of each
variant is the current setting in the same process; the limit is the decode roofline of bench/throughput.py.

Engines are built one after the other in this process, each with the setting patched in before its graphs
are captured; every setting runs `--rounds` times, `--calls` timed calls each (medians printed).

    python bench/attention_ab.py --batch 1 --variants current,one-stage,eight-splits
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

from common import config_only_checkpoint, d2d_bytes_per_s, print_table  # noqa: E402
from throughput import roofline_tok_s  # noqa: E402

from hotswap import Engine  # noqa: E402
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


VARIANTS = {"current": CURRENT_PLAN, "one-stage": one_stage, "two-stages": two_stages, "eight-splits": eight_splits,
            "no-long-splits": no_long_splits}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--output", type=int, default=128)
    ap.add_argument("--variants", default="current,one-stage,two-stages")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--calls", type=int, default=7)
    args = ap.parse_args()
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / "qwen3-0.6b", "qwen3-0.6b", max_positions=1024)
    ids = torch.randint(3, 500, (args.batch, args.prompt), generator=torch.Generator().manual_seed(0)).tolist()
    sp = {"max_new_tokens": args.output, "temperature": 0, "ignore_eos": True}
    pages = args.batch * -(-(args.prompt + args.output + 1) // 16) + 256
    rows = []
    for rnd in range(args.rounds):
        for name in args.variants.split(","):
            ta.decode_plan = VARIANTS[name]
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
            roof = roofline_tok_s(engine, args.batch, args.prompt, args.output, d2d_bytes_per_s(torch.device("cuda")))
            engine.shutdown()
            times.sort()
            tokens = args.batch * args.output
            rows.append([rnd, name, f"{tokens / times[len(times) // 2]:,.0f}", f"{tokens / times[0]:,.0f}", f"{tokens / times[-1]:,.0f}",
                         f"{roof:,.0f}"])
    ta.decode_plan = CURRENT_PLAN
    print_table(f"decode attention A/B, batch {args.batch}, {args.prompt}/{args.output}, output tok/s over whole generate calls",
                ["round", "variant", "median", "best", "worst", "decode roofline"], rows)


if __name__ == "__main__":
    main()
