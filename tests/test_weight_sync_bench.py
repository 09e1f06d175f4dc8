"""bench/weight_sync.py on the CPU: the in-process section with a full second copy of the weights and with aliased
sources (views of one buffer, what a 61 GB shape on an 80 GB card gets), both loading every tensor."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("sources", ["full", "aliased"])
def test_weight_sync_bench_tensor_section(tmp_path, sources):
    out = tmp_path / "figures.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "weight_sync.py"), "--shapes", "tiny", "--sections", "tensor",
                           "--reps", "2", "--sources", sources, "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert "errors" not in figures, figures.get("errors")
    assert figures["figures"]["tiny.sources_aliased"] is (sources == "aliased")
    tensor = figures["figures"]["tiny.tensor"]
    assert tensor["tensors"] > 0 and tensor["ms"] > 0
    assert ("sources aliased" in proc.stdout) == (sources == "aliased")
