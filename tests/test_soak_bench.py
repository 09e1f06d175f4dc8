"""bench/soak.py, two rounds on the CPU: every kind of request and weight update ends with every KV page back and the
engine's invariants holding, and the report names what it measured (the leak check itself is the bench's longer run)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_soak_rounds_give_every_page_back_and_report_the_containers():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "soak.py"), "--rounds", "2", "--warmup", "1"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT / "src")), capture_output=True, text=True, timeout=180, check=False)
    out = proc.stdout
    assert proc.returncode == 0, out + proc.stderr
    assert "rounds whose end left KV pages out or broke an invariant: none" in out
    assert "invariants: ok" in out
    pages = re.search(r"KV free pages at start (\d+), after warm-up (\d+), end (\d+)", out)
    assert pages is not None and len(set(pages.groups())) == 1, out
    for measured in ("threads:", "fds:", "tasks:", "object types grown by >= rounds:"):
        assert measured in out
