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


def test_aliased_sources_are_views_of_one_buffer_with_the_engines_shapes(tiny_qwen3):
    """What lets a 61 GB shape run on an 80 GB card: every aliased source shares its dtype's one buffer."""
    import importlib.util

    from hotswap import Engine

    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("weight_sync_bench", ROOT / "bench" / "weight_sync.py")
    ws = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ws)
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        wm = eng.model_runner.weight_map
        full, aliased = ws.hf_sources(eng, "cpu"), ws.hf_sources(eng, "cpu", aliased=True)
        assert [n for n, _ in aliased] == [n for n, _ in full] == list(wm.names)
        for (name, a), (_, f) in zip(aliased, full):
            assert a.shape == f.shape == wm.slots[name].hf_shape and a.dtype == f.dtype
        storages = {t.untyped_storage().data_ptr() for _, t in aliased}
        assert len(storages) == len({t.dtype for _, t in aliased})  # one buffer per dtype
        assert len({t.untyped_storage().data_ptr() for _, t in full}) == len(full)
        assert eng.update_weights_from_tensor(aliased).success
