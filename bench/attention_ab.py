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
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint, d2d_bytes_per_s, print_table  # noqa: E402
from throughput import roofline_tok_s  # noqa: E402

from hotswap import Engine  # noqa: E402
from hotswap.kernels import triton_attention as ta  # noqa: E402

CURRENT_SPLITS, CURRENT_CONFIG = ta.decode_splits, ta._decode_config


def one_stage(head_dim, dtype, num_splits, min_chunk=64):
    return dict(CURRENT_CONFIG(head_dim, dtype, num_splits, min_chunk), num_stages=1)


def two_stages(head_dim, dtype, num_splits, min_chunk=64):
    return dict(CURRENT_CONFIG(head_dim, dtype, num_splits, min_chunk), num_stages=2)


def short_splits(head_dim, dtype, num_splits, min_chunk=64):
    cfg = CURRENT_CONFIG(head_dim, dtype, num_splits, min_chunk)
    return dict(cfg, block_n=32, min_chunk=32) if num_splits > 1 else cfg


def eight_splits(batch, num_kv_heads, max_kv_len, device=None):
    splits, min_chunk = CURRENT_SPLITS(batch, num_kv_heads, max_kv_len, device)
    return min(splits, 8), min_chunk


def no_long_splits(batch, num_kv_heads, max_kv_len, device=None):
    """The rule before mid-size batches split their long sequences: one split a sequence there."""
    splits, min_chunk = CURRENT_SPLITS(batch, num_kv_heads, max_kv_len, device)
    return (1, 64) if min_chunk == ta._LONG_MIN_CHUNK else (splits, min_chunk)


# name -> (split rule, launch config)
VARIANTS = {
    "current": (CURRENT_SPLITS, CURRENT_CONFIG),
    "one-stage": (CURRENT_SPLITS, one_stage),
    "two-stages": (CURRENT_SPLITS, two_stages),
    "eight-splits": (eight_splits, short_splits),
    "no-long-splits": (no_long_splits, CURRENT_CONFIG),
}


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
            ta.decode_splits, ta._decode_config = VARIANTS[name]
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
    ta.decode_splits, ta._decode_config = CURRENT_SPLITS, CURRENT_CONFIG
    print_table(f"decode attention A/B, batch {args.batch}, {args.prompt}/{args.output}, output tok/s over whole generate calls",
                ["round", "variant", "median", "best", "worst", "decode roofline"], rows)


if __name__ == "__main__":
    main()
