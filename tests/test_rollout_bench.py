"""bench/rollout.py: its schedule roofline by hand, and a tiny CPU run end to end (offline and one HTTP path)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def load_rollout():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("rollout_bench", ROOT / "bench" / "rollout.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_schedule_roofline_counts_each_steps_bytes_for_its_running_rows():
    rb = load_rollout()
    w = rb.Workload(prompts=[[1] * 10, [1] * 20], out_lens=[3, 2], seeds=[0, 1])
    # both running: the prefill gave token 1; step 1 reads KV of 11 + 21 tokens, step 2 only sequence 0's 12
    rows_seen = []
    both = rb.schedule_roofline(w, 2, step_time=lambda rows, ctx: (rows_seen.append(rows) or 100 + ctx, False))
    assert both == {"seconds": 132 + 112, "steps": 2, "tail_steps": 2, "tail_seconds": 244, "compute_steps": 0}
    assert rows_seen == [2, 1]
    # one at a time: sequence 1 starts once sequence 0 is done
    one = rb.schedule_roofline(w, 1, step_time=lambda rows, ctx: (100 + ctx, False))
    assert one["seconds"] == 111 + 112 + 121 and one["steps"] == 3
    # steps whose arithmetic bounds them are counted
    assert rb.schedule_roofline(w, 2, step_time=lambda rows, ctx: (1.0, rows > 1))["compute_steps"] == 1


def test_rollout_bench_runs_tiny_on_the_cpu(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout.py"), "--device", "cpu", "--tiny", "--modes", "sampled",
                           "--paths", "offline,generate-stream,completions-stream", "--client-procs", "2",
                           "--incremental-streaming-output", "--repeats", "2", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    figures = json.loads(out.read_text())
    assert set(figures["runs"]) == {"sampled/offline", "sampled/generate-stream", "sampled/completions-stream"}
    for key, run in figures["runs"].items():
        assert run["tokens"] > 0 and 0 <= run["tail_seconds"] <= run["seconds"] + 1e-6
        assert ("client_cpu_s" in run) == (key != "sampled/offline")  # the client processes' CPU, HTTP paths only
        if sys.platform == "linux":
            assert run["thread_cpu_s"]["hotswap-scheduler"] >= 0  # /proc ticks: a tiny run may read 0
    assert figures["roofline"]["steps"] > 0
    # --repeats: every run kept, the table's figure the median one (of two, the faster), each with its one-time costs counted
    for key, reps in figures["repeats"].items():
        assert len(reps) == 2 and figures["runs"][key] == min(reps, key=lambda r: r["seconds"])
        assert all(isinstance(r["triton_compiles"], str) and "reserved_growth_mib" in r for r in reps)
    assert "each run in order (the table shows the median)" in proc.stdout


def test_rollout_bench_reports_routed_experts_cost_on_a_tiny_moe(tmp_path):
    out = tmp_path / "figures.json"
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "rollout.py"), "--device", "cpu", "--tiny", "--shape", "tiny-moe",
                           "--modes", "sampled", "--paths", "offline", "--routed-experts", "--json", str(out)],
                          env=env, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    runs = json.loads(out.read_text())["runs"]
    assert set(runs) == {"sampled/offline", "sampled+R3/offline"}
    assert runs["sampled+R3/offline"]["tokens"] == runs["sampled/offline"]["tokens"] > 0
    assert "sampled+R3 | offline" in proc.stdout


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_triton_compiles_counts_a_kernel_compiled_inside_it():
    """The rollout's one-time-cost column reads 0 only if the hook works: a kernel first used inside is counted, by name."""
    import triton
    import triton.language as tl

    rb = load_rollout()

    @triton.jit
    def _bench_probe(x_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs) + 1)

    x = torch.zeros(16, device="cuda")
    with rb.TritonCompiles() as compiles:
        _bench_probe[(1,)](x, BLOCK=16)
        torch.cuda.synchronize()
    assert compiles.summary() == "1 (_bench_probe x1)"
    with rb.TritonCompiles() as again:  # already loaded in this process: nothing to count
        _bench_probe[(1,)](x, BLOCK=16)
    assert again.summary() == "0" and x[0].item() == 2
