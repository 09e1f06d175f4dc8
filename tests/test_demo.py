"""`hotswap demo` (the RL loop) and examples/rl_loop.py, end to end on the CPU: a trainer process pushes
weights into a live engine over each transport, every rollout carries the version just pushed, every
push is proven by checksums, and on the default settings the policy learns its task."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hotswap.demo.run import add_demo_arguments, run_rl
from hotswap.demo.task import TASKS, DigitTask, Problem
from hotswap.demo.trainer import group_advantages

REPO = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def demo_args(tmp_path: Path, cache: Path, *extra: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_demo_arguments(parser)
    return parser.parse_args(["--cache-dir", str(cache), "--out-dir", str(tmp_path / "out"), *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo-cache")


SHORT_STEPS = 3


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache):
    """One short run per transport, made once for the module: the per-transport checks and the cross-transport
    comparison read the same logs (each run spawns a trainer process, the bulk of its cost)."""
    logs: dict[str, tuple[dict, Path]] = {}

    def run(sync: str) -> tuple[dict, Path]:
        if sync not in logs:
            tmp = tmp_path_factory.mktemp(f"short-{sync}")
            args = demo_args(tmp, cache, "--sync", sync, "--steps", str(SHORT_STEPS), "--prompts-per-step", "16", "--group-size", "4")
            logs[sync] = run_rl(args, out=open(os.devnull, "w")), tmp / "out"
        return logs[sync]

    return run


# ---- the pieces ----------------------------------------------------------------------------------------


def test_task_reward_and_seeded_problems():
    task = DigitTask("last", seed=3)
    problems = task.sample(50)
    assert problems == DigitTask("last", seed=3).sample(50)
    for p in problems:
        assert len(p.prompt) == 5 and p.prompt.endswith("=") and p.answer == p.prompt[-2]
    assert DigitTask.reward(" 7", Problem("1237=", "7")) == 1.0
    assert DigitTask.reward("72", Problem("1237=", "7")) == 1.0
    assert DigitTask.reward("", Problem("1237=", "7")) == 0.0
    assert DigitTask.reward("=7", Problem("1237=", "7")) == 0.0
    assert DigitTask("sum", seed=0).sample(1)[0].prompt[1] == "+"
    assert set(TASKS) == {"last", "first", "max", "sum"}
    with pytest.raises(ValueError, match="unknown task"):
        DigitTask("nope")


def test_group_advantages_are_relative_to_each_group():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    group = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
    adv = group_advantages(rewards, group)
    assert torch.allclose(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0.0, 0.0, 0.0, 0.0]))


# ---- the loop, over each transport ---------------------------------------------------------------------


@pytest.mark.parametrize("sync", ["distributed", "ipc", "disk"])
def test_short_run_pushes_verified_versions(sync, short_run):
    steps = SHORT_STEPS
    log, out = short_run(sync)
    assert json.loads((out / "log.json").read_text()) == json.loads(json.dumps(log))
    png = out / "reward_sync.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000

    assert log["config"]["sync"] == sync
    assert log["model"]["built_in"] and log["model"]["vocab_size"] == 14
    first = log["initial_push"]
    assert first["pushed_version"] == "step-0" and first["checksum_ok"] is True
    assert [s["step"] for s in log["steps"]] == list(range(steps + 1))
    for s in log["steps"]:
        k = s["step"]
        # the rollouts of step k all come from the weights pushed just before them
        assert s["weight_version"] == f"step-{k}"
        assert s["rollout_versions"] == {f"step-{k}": 16 * 4} and s["versions_ok"] is True
        assert s["num_rollouts"] == 64 and 0.0 <= s["reward"] <= 1.0
        if k < steps:
            push, train = s["push"], s["train"]
            assert push["pushed_version"] == f"step-{k + 1}"
            assert push["checksum_ok"] is True and len(push["checksum_digest"]) == 64
            assert push["sync_s"] > 0 and push["num_bytes"] == first["num_bytes"] > 0
            # on-policy, float32 on both sides: the importance ratio is 1 up to rounding
            assert train["logprob_diff_max"] < 1e-3 and train["clip_frac"] == 0.0
        else:
            assert s["push"] is None and s["train"] is None
    # every push changed the weights: no two verified digests are equal
    digests = [first["checksum_digest"]] + [s["push"]["checksum_digest"] for s in log["steps"] if s["push"]]
    assert len(set(digests)) == len(digests)
    summary = log["summary"]
    assert summary["num_pushes"] == steps + 1 == summary["checksums_verified"]
    assert summary["all_checksums_ok"] and summary["all_versions_ok"]
    assert summary["initial_reward"] == log["steps"][0]["reward"] and summary["final_reward"] == log["steps"][-1]["reward"]
    if sync == "disk":
        assert not (out / "checkpoints").exists()  # pushed checkpoints are removed


def test_default_run_learns_from_chance_to_target(tmp_path, cache):
    """The defaults (task 'last', 64 prompts x 8 samples, lr 2e-3) take the policy from chance (~1/14) to
    >= 0.8 reward within 60 steps; about 15 s on two CPU cores."""
    args = demo_args(tmp_path, cache, "--sync", "ipc")
    log = run_rl(args, out=open(os.devnull, "w"))
    s = log["summary"]
    assert s["initial_reward"] < 0.2
    assert s["final_reward"] >= 0.8 and s["final_reward_mean_last5"] >= 0.8
    assert s["first_step_reward_ge_target"] is not None and s["first_step_reward_ge_target"] <= 50
    assert s["all_checksums_ok"] and s["num_pushes"] == 61


def test_transports_give_bit_identical_runs(short_run):
    """Pushes are exact, so the same seed gives the same rollouts whichever way the weights travel."""
    logs = {sync: short_run(sync)[0] for sync in ("distributed", "disk")}
    digests = {k: [s["push"]["checksum_digest"] for s in v["steps"] if s["push"]] for k, v in logs.items()}
    assert digests["distributed"] == digests["disk"]
    assert [s["reward"] for s in logs["distributed"]["steps"]] == [s["reward"] for s in logs["disk"]["steps"]]


def test_example_script_runs(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, str(REPO / "examples" / "rl_loop.py"), "--steps", "2", "--prompts", "8", "--group-size", "4",
                           "--sync", "ipc"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("step")]
    assert len(lines) == 3 and "(checksums ok)" in lines[0] and "rollouts@step-2" in lines[-1]
    assert "Traceback" not in proc.stderr  # e.g. the resource tracker's, were a shared-memory block unregistered twice


def test_cli_routes_demo():
    pytest.importorskip("hotswap.server.launch")  # hotswap.cli builds the `serve` parser too
    from hotswap.cli import build_parser
    from hotswap.demo.run import run_demo

    args = build_parser().parse_args(["demo", "--steps", "1", "--sync", "disk"])
    assert args.steps == 1 and args.sync == "disk" and args.command == "demo"
    assert args.func.__module__ == "hotswap.cli" and run_demo is not None
