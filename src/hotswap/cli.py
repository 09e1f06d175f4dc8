"""`hotswap generate | serve | demo | make-tiny-model`, and `hotswap --version`."""

from __future__ import annotations

import argparse
import json
import sys


def _generate(args: argparse.Namespace) -> int:
    from hotswap import Engine

    sp = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}
    if args.seed is not None:
        sp["seed"] = args.seed
    with Engine(args.model_path, dtype=args.dtype, device=args.device, tensor_parallel_size=args.tensor_parallel_size) as engine:
        out = engine.generate(args.prompt, sp)
    print(json.dumps(out, indent=2) if args.json else out["text"])
    return 0


def _serve(args: argparse.Namespace) -> int:
    from hotswap.server.launch import serve

    serve(args)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from hotswap.demo.run import run_demo

    return run_demo(args)


def _make_tiny_model(args: argparse.Namespace) -> int:
    from pathlib import Path

    from hotswap.testing.tiny_models import build_tiny_checkpoint

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"{out} exists and is not empty; choose a new folder")
    build_tiny_checkpoint(out, args.family, seed=args.seed)
    print(f"wrote a tiny random {args.family} checkpoint to {out}; try: hotswap serve --model-path {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from hotswap import __version__

    parser = argparse.ArgumentParser(prog="hotswap", description="An LLM inference engine whose weights change while it serves.")
    parser.add_argument("--version", action="version", version=f"hotswap {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text from one prompt")
    g.add_argument("--model-path", required=True)
    g.add_argument("--prompt", required=True)
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--dtype", default="auto")
    g.add_argument("--device", default="auto")
    g.add_argument("--tp-size", "--tensor-parallel-size", dest="tensor_parallel_size", type=int, default=1,
                   help="tensor-parallel ranks, one process and GPU each")
    g.add_argument("--json", action="store_true", help="print the whole output dict")
    g.set_defaults(func=_generate)

    s = sub.add_parser("serve", help="serve a model over HTTP (OpenAI + SGLang-compatible routes)")
    from hotswap.server.launch import add_serve_arguments

    add_serve_arguments(s)
    s.set_defaults(func=_serve)

    d = sub.add_parser("demo", help="an RL loop: a trainer improves a policy that hotswap serves live")
    from hotswap.demo.run import add_demo_arguments

    add_demo_arguments(d)
    d.set_defaults(func=_demo)

    t = sub.add_parser("make-tiny-model", help="write a tiny random Hugging Face checkpoint (with tokenizer) to try serve on")
    t.add_argument("dir", help="a new (or empty) folder")
    t.add_argument("--family", default="qwen3", choices=("qwen3", "qwen2", "llama"))
    t.add_argument("--seed", type=int, default=0)
    t.set_defaults(func=_make_tiny_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    from hotswap.server.launch import BindError, sglang_flags

    if extra and args.func is not _serve:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if extra:  # SGLang's launch_server flags (the Engine takes or refuses each by name)
            args.sglang_args = sglang_flags(extra)
        return args.func(args)
    except ValueError as exc:  # HotswapError and friends: bad input, named
        print(f"hotswap: error: {exc}", file=sys.stderr)
        return 2
    except BindError as exc:  # the port is taken, or the address is not ours
        print(f"hotswap: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
