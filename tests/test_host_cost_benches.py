"""The host-only benches run on the CPU and time what they say: bench/stream_output_cost.py (one output per streamed
token, none for the peer), bench/copy_plan_cost.py (a push's copy tables both ways, equal) and bench/host_step.py's
profile (the phases' host functions, without the compute its timings subtract)."""

from __future__ import annotations

import cProfile
import importlib.util
import os
import pstats
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


def test_host_step_profile_leaves_out_the_compute_the_timings_subtract():
    """On the CPU the model's own functions filled the top of `--profile`: a phase's profile pauses inside them."""
    spec = importlib.util.spec_from_file_location("host_step_bench", ROOT / "bench" / "host_step.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    clock = bench.Clock(cProfile.Profile())

    def model_arithmetic() -> int:
        return sum(range(1000))

    compute = clock.wrap_compute(lambda: model_arithmetic())

    def host_work() -> int:
        return compute() + len(str(compute()))

    assert clock.phase(host_work) == 499500 + 6
    names = {name for _, _, name in pstats.Stats(clock.prof).stats}
    assert "host_work" in names and "model_arithmetic" not in names
    assert clock.compute > 0 and not clock.profiling
