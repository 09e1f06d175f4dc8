"""bench/stream_output_cost.py runs on the CPU and times what it says: one output per streamed token, none for the peer."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_stream_output_cost_bench_runs_and_reports_each_row():
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "stream_output_cost.py"), "--rows", "16", "--steps", "5"],
                          env=env, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for row in ("not streamed (peer)", "streamed: append_token + emit + flush", "the scheduler thread's cost of streaming",
                "front end pipe"):
        assert row in proc.stdout
    assert "collector thresholds (20000" in proc.stdout  # the serving processes' setting, as the engine runs it
