"""The demo entry point. Until the RL loop lands this serves a few prompts on a built-in tiny model,
then swaps in perturbed weights live and shows the version change and checksums."""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="a HF checkpoint folder (default: build a tiny model)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hotswap/demo"))
    parser.add_argument("--device", default="auto")


def tiny_model_dir(cache_dir: str) -> Path:
    from hotswap.testing.tiny_models import build_tiny_checkpoint

    path = Path(cache_dir) / "tiny-qwen3"
    if not (path / "config.json").is_file():
        build_tiny_checkpoint(path, "qwen3", hidden_size=128, intermediate_size=256, num_hidden_layers=4)
    return path


def run_demo(args: argparse.Namespace) -> int:
    from hotswap import Engine
    from hotswap.testing.tiny_models import perturb_checkpoint

    model = Path(args.model_path) if args.model_path else tiny_model_dir(args.cache_dir)
    prompts = ["the cat sat on", "12+7=", "hello world"]
    greedy = {"max_new_tokens": 12, "temperature": 0}
    with Engine(str(model), device=args.device) as engine:
        for prompt, out in zip(prompts, engine.generate(prompts, greedy)):
            print(f"[v{out['meta_info']['weight_version']}] {prompt!r} -> {out['text']!r}")
        before = engine.check_weights("checksum").digest
        new = perturb_checkpoint(model, Path(args.cache_dir) / "tiny-qwen3-v2", seed=int(time.time()) % 1000)
        res = engine.update_weights_from_disk(str(new), weight_version="v2")
        print(f"swap: {res.message} ({res.elapsed_s * 1000:.1f} ms)")
        for prompt, out in zip(prompts, engine.generate(prompts, greedy)):
            print(f"[{out['meta_info']['weight_version']}] {prompt!r} -> {out['text']!r}")
        print(f"checksum digest {before[:16]} -> {engine.check_weights('checksum').digest[:16]}")
    return 0
