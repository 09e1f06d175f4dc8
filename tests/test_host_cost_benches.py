"""The host-only benches run on the CPU and time what they say: bench/stream_output_cost.py (one output per streamed
token, none for the peer) and bench/copy_plan_cost.py (a push's copy tables both ways, equal)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, PYTHONPATH=str(ROOT / "src"))


def run_bench(*argv: str) -> str:
    proc = subprocess.run([sys.executable, *argv], env=ENV, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_stream_output_cost_bench_runs_and_reports_each_row():
    out = run_bench(str(ROOT / "bench" / "stream_output_cost.py"), "--rows", "16", "--steps", "5")
    for row in ("not streamed (peer)", "streamed, GenerateOutputs: append_token + emit + flush",
                "streamed, token rows (front end process): append_token + emit + flush", "the scheduler thread's cost of streaming",
                "pickle of one step's GenerateOutputs", "pickle of one step's token rows"):
        assert row in out
    assert "collector thresholds (20000" in out  # the serving processes' setting, as the engine runs it


def test_copy_plan_cost_bench_buckets_a_push_as_the_engine_holds_it():
    out = run_bench(str(ROOT / "bench" / "copy_plan_cost.py"), "--shape", "qwen3-30b-a3b", "--repeats", "1")
    assert "99 buckets of <= 512 MiB" in out  # as many as the H200 run's IPC push of this shape made
    assert "peer: every program listed in Python" in out and "chunk_tables (tensor ops)" in out
