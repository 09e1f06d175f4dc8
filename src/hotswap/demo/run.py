"""`hotswap demo`: a small RL post-training loop, the job hotswap exists for.

The engine lives in this process and serves the policy; a trainer process (multiprocessing `spawn`)
holds its own float32 copy of the same checkpoint in PyTorch. Every step:

1. the engine samples G completions for each of B prompts, with per-token logprobs, and every rollout
   must report the weight version pushed last (`meta_info["weight_version"]`);
2. a verifiable reward scores them (`hotswap.demo.task`);
3. the trainer takes one policy-gradient step (group-relative baseline, PPO-clipped importance ratio
   against the engine's logprobs) and pushes its new weights into the live engine with `hotswap.trainer`
   over the chosen transport (`--sync distributed|ipc|disk`), as one atomic weight-update session;
4. the trainer proves the engine holds exactly its weights (per-tensor sha256 manifest).

The terminal shows one line per step; the run ends with `log.json` and `reward_sync.png` in `--out-dir`.
`examples/rl_loop.py` is the same loop as a single file to copy into your own trainer.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from hotswap.demo.task import TASKS, DigitTask

TARGET_REWARD = 0.8


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None, help="a HF checkpoint folder (default: build a tiny digit model locally)")
    parser.add_argument("--cache-dir", default=os.path.expanduser("~/.cache/hotswap/demo"), help="where the built-in model is kept")
    parser.add_argument("--sync", choices=("distributed", "ipc", "disk"), default="distributed",
                        help="how the trainer pushes weights: a torch.distributed broadcast group, shared-memory/CUDA IPC handles, "
                             "or a checkpoint on disk")
    parser.add_argument("--steps", type=int, default=60, help="training steps (each: rollouts, one update, one push)")
    parser.add_argument("--task", choices=sorted(TASKS), default="last", help="what the policy must learn (see hotswap.demo.task)")
    parser.add_argument("--prompts-per-step", type=int, default=64, help="B: prompts per step")
    parser.add_argument("--group-size", type=int, default=8, help="G: samples per prompt (the group of the baseline)")
    parser.add_argument("--lr", type=float, default=None,
                        help="Adam learning rate of the trainer (default: 2e-3 for the default built-in model, scaled down as 64/width for "
                             "wider built-in models, 1e-5 for --model-path)")
    parser.add_argument("--clip-eps", type=float, default=0.2, help="PPO clip range of the importance ratio")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--max-new-tokens", type=int, default=None, help="completion length (default: 1 on the built-in model, else 4)")
    parser.add_argument("--device", default="auto", help="the engine's device: auto, cpu, cuda, cuda:N")
    parser.add_argument("--trainer-device", default="auto",
                        help="auto: the CPU with a CPU engine; with a GPU engine, a second GPU when there is one, else the same GPU")
    parser.add_argument("--dtype", default="auto", help="the engine's dtype (auto: the checkpoint's); pushes are cast to it")
    parser.add_argument("--hidden-size", type=int, default=64, help="built-in model width")
    parser.add_argument("--num-layers", type=int, default=2, help="built-in model depth")
    parser.add_argument("--micro-batch", type=int, default=0, help="sequences per trainer forward/backward (0: all at once)")
    parser.add_argument("--bucket-mb", type=int, default=64, help="bucket size of distributed and IPC pushes, MiB")
    parser.add_argument("--verify-every", type=int, default=1, help="check the engine's checksums after every N-th push (0: never)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads per process (0: 1 for the built-in model, whose ops are too small to split; else torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="hotswap-demo-out", help="where log.json and reward_sync.png are written")


def _resolve_devices(args) -> tuple[str, str, str | None]:
    """(engine device, trainer device, distributed backend)."""
    engine_dev = args.device
    if engine_dev == "auto":
        engine_dev = "cuda" if torch.cuda.is_available() else "cpu"
    engine_t = torch.device(engine_dev)
    if engine_t.type == "cuda" and engine_t.index is None:
        engine_t = torch.device("cuda", 0)
    trainer_dev = args.trainer_device
    if trainer_dev == "auto":
        if engine_t.type != "cuda":
            trainer_dev = "cpu"
        else:
            trainer_dev = f"cuda:{(engine_t.index + 1) % torch.cuda.device_count()}" if torch.cuda.device_count() > 1 else str(engine_t)
    trainer_t = torch.device(trainer_dev)
    # NCCL needs one GPU per rank: two processes on one GPU (or a CPU side) talk gloo
    backend = "nccl" if engine_t.type == trainer_t.type == "cuda" and engine_t != trainer_t else "gloo"
    return str(engine_t), str(trainer_t), backend


def _rollouts(engine, task: DigitTask, args, max_new_tokens: int):
    """Sample G completions for each of B fresh prompts; score them; count the weight versions they report (the
    caller checks them against the version just pushed)."""
    from hotswap.demo.trainer import Batch

    problems = task.sample(args.prompts_per_step)
    prompt_ids = [engine.tokenizer.encode(p.prompt, add_special_tokens=False) for p in problems]
    sp = {"n": args.group_size, "temperature": args.temperature, "max_new_tokens": max_new_tokens}
    t0 = time.perf_counter()
    outs = engine.generate(input_ids=prompt_ids, sampling_params=sp, return_logprob=True)
    gen_s = time.perf_counter() - t0
    batch = Batch(prompt_ids=[], completion_ids=[], logprobs=[], rewards=[], group=[])
    versions: dict[str, int] = {}
    for i, out in enumerate(outs):  # prompt-major: the G samples of prompt j are outs[j*G:(j+1)*G]
        j = i // args.group_size
        meta = out["meta_info"]
        for v in meta.get("weight_versions") or [meta["weight_version"]]:
            versions[v] = versions.get(v, 0) + 1
        lps = meta["output_token_logprobs"]
        if [tid for _, tid, _ in lps] != out["output_ids"]:
            raise RuntimeError("the engine's logprobs do not line up with its output ids")
        batch.prompt_ids.append(prompt_ids[j])
        batch.completion_ids.append(list(out["output_ids"]))
        batch.logprobs.append([float(lp) for lp, _, _ in lps])
        batch.rewards.append(task.reward(out["text"], problems[j]))
        batch.group.append(j)
    example = {"prompt": problems[0].prompt, "answer": problems[0].answer, "completion": outs[0]["text"], "reward": batch.rewards[0]}
    return batch, gen_s, versions, example


def run_rl(args, out=None) -> dict:
    """Run the loop; return the log (also written to `args.out_dir/log.json`, with the plot beside it)."""
    from hotswap import Engine
    from hotswap.demo.bridge import TrainerGone, serve_calls
    from hotswap.demo.policy import cached_digit_model
    from hotswap.demo.report import ProgressTable, plot_log
    from hotswap.demo.trainer import TrainerConfig, trainer_main

    out = out or sys.stdout
    wall0 = time.perf_counter()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    built_in = args.model_path is None
    model_path = Path(args.model_path) if not built_in else cached_digit_model(
        args.cache_dir, hidden_size=args.hidden_size, num_layers=args.num_layers, seed=args.seed)
    max_new_tokens = args.max_new_tokens or (1 if built_in else 4)
    if args.lr is None:
        args.lr = 2e-3 * min(1.0, 64 / args.hidden_size) if built_in else 1e-5
    engine_dev, trainer_dev, backend = _resolve_devices(args)
    task = DigitTask(args.task, seed=args.seed)
    n_seq = args.prompts_per_step * args.group_size

    threads = args.threads or (1 if built_in else 0)
    saved_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    engine = Engine(str(model_path), dtype=args.dtype, device=engine_dev, seed=args.seed,
                    max_running_requests=min(512, n_seq), num_pages=max(1024, 4 * n_seq))
    engine_dtype = str(engine.model_config.torch_dtype).removeprefix("torch.")
    vocab = engine.model_config.vocab_size
    tcfg = TrainerConfig(model_path=str(model_path), sync=args.sync, device=trainer_dev, push_dtype=engine_dtype, lr=args.lr,
                         clip_eps=args.clip_eps, micro_batch=args.micro_batch, seed=args.seed, backend=backend,
                         bucket_bytes=args.bucket_mb << 20, disk_dir=str(out_dir / "checkpoints"), verify_every=args.verify_every,
                         num_threads=threads)
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    proc = ctx.Process(target=trainer_main, args=(child_conn, tcfg), name="hotswap-demo-trainer", daemon=True)
    log: dict = {
        "demo": "hotswap RL loop",
        "config": {k: v for k, v in vars(args).items() if k != "func"} | {"max_new_tokens": max_new_tokens},
        "model": {"path": str(model_path), "built_in": built_in, "architecture": engine.model_config.architecture,
                  "vocab_size": vocab, "engine_dtype": engine_dtype},
        "devices": {"engine": engine_dev, "trainer": trainer_dev, "backend": backend if args.sync == "distributed" else None},
        "task": {"name": args.task, "description": task.description,
                 "chance_reward": 1.0 / vocab if built_in else None},
        "host": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                 "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None},
        "initial_push": None,
        "steps": [],
    }
    try:
        proc.start()
        child_conn.close()
        _, ready = serve_calls(conn, engine, until="ready", timeout_s=900)
        log["model"]["num_parameters"] = ready["num_parameters"]
        log["trainer_connect_s"] = ready["connect_s"]
        print(f"hotswap demo: {'built-in ' if built_in else ''}{engine.model_config.architecture} "
              f"({ready['num_parameters'] / 1e6:.2f}M params, vocab {vocab}) from {model_path}", file=out)
        print(f"  engine on {engine_dev} ({engine_dtype}), trainer on {trainer_dev} (float32), sync={args.sync}"
              + (f" ({backend})" if args.sync == "distributed" else ""), file=out)
        print(f"  task '{args.task}': {task.description}; reward 1 for the right first digit"
              + (f", uniform chance {1 / vocab:.3f}" if built_in else ""), file=out)
        print(f"  {args.steps} steps x {args.prompts_per_step} prompts x {args.group_size} samples, lr {args.lr:g}, "
              f"temperature {args.temperature:g}; log and plot -> {out_dir}/", file=out, flush=True)

        conn.send(("push", "step-0"))  # the first sync: the engine takes the trainer's (identical) weights
        _, first = serve_calls(conn, engine, until="pushed", timeout_s=900)
        _require_push(first, "step-0")
        log["initial_push"] = first
        table = ProgressTable(out)
        table.header()
        version = "step-0"
        for step in range(args.steps + 1):
            batch, gen_s, versions, example = _rollouts(engine, task, args, max_new_tokens)
            if set(versions) != {version}:
                raise RuntimeError(f"step {step}: rollouts report weight versions {versions}, expected only {version!r} (just pushed)")
            rec = {"step": step, "weight_version": version, "rollout_versions": versions, "versions_ok": True,
                   "reward": sum(batch.rewards) / len(batch.rewards), "num_rollouts": len(batch.rewards),
                   "completion_tokens": sum(len(c) for c in batch.completion_ids), "gen_s": gen_s, "example": example,
                   "train": None, "push": None}
            if step < args.steps:  # train on these rollouts, push the result as the next version
                new_version = f"step-{step + 1}"
                conn.send(("train", batch, new_version))
                _, stats = serve_calls(conn, engine, until="pushed", timeout_s=1800)
                _require_push(stats, new_version)
                push_keys = ("pushed_version", "sync_s", "transfer_s", "engine_update_s", "num_bytes", "num_tensors", "num_buckets",
                             "checksum_ok", "checksum_digest", "checksum_message", "verify_s")
                rec["push"] = {k: stats[k] for k in push_keys if k in stats}
                rec["train"] = {k: v for k, v in stats.items() if k not in push_keys}
                version = new_version
            log["steps"].append(rec)
            table.row(rec)
        conn.send(("stop",))
        serve_calls(conn, engine, until="bye", timeout_s=300)
    except TrainerGone as exc:
        raise RuntimeError(str(exc)) from None
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.terminate()
            proc.join(timeout=10)
        conn.close()
        engine.shutdown()
        torch.set_num_threads(saved_threads)
        try:
            (out_dir / "checkpoints").rmdir()  # disk pushes remove their checkpoints; drop the folder when empty
        except OSError:
            pass

    log["summary"] = _summary(log, time.perf_counter() - wall0)
    (out_dir / "log.json").write_text(json.dumps(log, indent=2) + "\n")
    png = plot_log(log, out_dir / "reward_sync.png")
    log["summary"]["plot"] = str(png)
    (out_dir / "log.json").write_text(json.dumps(log, indent=2) + "\n")
    _print_summary(log, out)
    return log


def _require_push(stats: dict, version: str) -> None:
    if stats.get("pushed_version") != version:
        raise RuntimeError(f"the push reported version {stats.get('pushed_version')!r}, expected {version!r}")
    if stats.get("checksum_ok") is False:
        raise RuntimeError(f"after pushing {version}, the engine's checksums differ from the trainer's: {stats.get('checksum_message')}")


def _summary(log: dict, wall_s: float) -> dict:
    steps = log["steps"]
    rewards = [s["reward"] for s in steps]
    pushes = [log["initial_push"]] + [s["push"] for s in steps if s["push"]]
    syncs = [p["sync_s"] for p in pushes]
    hit = next((s["step"] for s in steps if s["reward"] >= TARGET_REWARD), None)
    tail = rewards[-5:]
    checked = [p["checksum_ok"] for p in pushes if p.get("checksum_ok") is not None]
    return {
        "initial_reward": rewards[0], "final_reward": rewards[-1], "best_reward": max(rewards),
        "final_reward_mean_last5": sum(tail) / len(tail), "first_step_reward_ge_target": hit, "target_reward": TARGET_REWARD,
        "reached_target": rewards[-1] >= TARGET_REWARD, "num_pushes": len(pushes), "checksums_verified": len(checked),
        "all_checksums_ok": all(checked) and bool(checked), "all_versions_ok": all(s["versions_ok"] for s in steps),
        "sync_s_median": statistics.median(syncs), "sync_s_mean": sum(syncs) / len(syncs), "sync_s_max": max(syncs),
        "bytes_per_push": pushes[-1]["num_bytes"], "wall_s": wall_s,
        "gen_s_total": sum(s["gen_s"] for s in steps), "train_s_total": sum((s["train"] or {}).get("train_s", 0.0) for s in steps),
        "sync_s_total": sum(syncs), "verify_s_total": sum(p.get("verify_s", 0.0) for p in pushes),
    }


def _print_summary(log: dict, out) -> None:
    s = log["summary"]
    hit = s["first_step_reward_ge_target"]
    mb = s["bytes_per_push"] / 2**20
    print(f"\nreward {s['initial_reward']:.3f} at step 0 -> {s['final_reward']:.3f} at step {log['steps'][-1]['step']}"
          + (f" (first >= {s['target_reward']} at step {hit})" if hit is not None else f" (never reached {s['target_reward']})"), file=out)
    print(f"{s['num_pushes']} pushes over {log['config']['sync']} of {mb:.2f} MiB each: median {s['sync_s_median'] * 1000:.1f} ms, "
          f"max {s['sync_s_max'] * 1000:.1f} ms; checksums verified {s['checksums_verified']}x "
          f"({'all match' if s['all_checksums_ok'] else 'MISMATCH'}); every rollout carried the version just pushed", file=out)
    print(f"time: {s['wall_s']:.1f} s total (rollouts {s['gen_s_total']:.1f} s, training {s['train_s_total']:.1f} s, "
          f"pushes {s['sync_s_total']:.1f} s, checksums {s['verify_s_total']:.1f} s)", file=out)
    print(f"wrote {Path(log['config']['out_dir']) / 'log.json'} and {s['plot']}", file=out, flush=True)


def run_demo(args: argparse.Namespace) -> int:
    log = run_rl(args)
    s = log["summary"]
    return 0 if s["all_checksums_ok"] or s["checksums_verified"] == 0 else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="hotswap demo")
    add_demo_arguments(parser)
    sys.exit(run_demo(parser.parse_args()))
