"""Host time of one prefill call, the call bench/throughput.py's prefill column times (`generate` with
max_new_tokens=1 after a warm-up, one step): everything but the model's forward and its LM head, which are
the device's work on a GPU. A one-step call overlaps none of its host work with the device, so every host
microsecond here is one of the GPU figure's.

Per call: the wall time minus the compute, and the CPU time of both threads minus the compute's (steadier
on a shared machine); by phase (wall), the scheduler thread's dispatch (taking the requests
in), schedule, launch (minus compute) and process (read-back, outputs), and the rest: the caller's request
preparation, hand-offs between the threads and the caller's assembly of the replies. Medians over the
calls of the best of a few runs; the process CPU time of a call beside its wall time.

    python bench/host_prefill.py --batch 64 --prompt 128
    python bench/host_prefill.py --batch 1 --prompt 128 --calls 200

Only names both trees have are used, so a copy of this file (with common.py) in another tree's bench/
measures that tree: `git archive 6c9ff7c src bench | tar -x -C /tmp/before`, copy, run there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from common import config_only_checkpoint  # noqa: E402

from hotswap import Engine  # noqa: E402

PHASES = ("dispatch", "schedule", "launch", "process")  # the scheduler thread's work in a call


class Clock:
    """Per call: the model's compute (wall and CPU time) and each phase's time, accumulated by the wrapped
    functions."""

    def __init__(self) -> None:
        self.compute = self.compute_cpu = 0.0
        self.phases = dict.fromkeys(PHASES, 0.0)

    def wrap_compute(self, fn):
        def timed(*args, **kwargs):
            t, c = time.perf_counter(), time.thread_time()
            try:
                return fn(*args, **kwargs)
            finally:
                self.compute += time.perf_counter() - t
                self.compute_cpu += time.thread_time() - c
        return timed

    def wrap_phase(self, name: str, fn):
        def timed(*args, **kwargs):
            c, t = self.compute, time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.phases[name] += (time.perf_counter() - t) - (self.compute - c)
        return timed


def one_run(engine: Engine, clock: Clock, prompts: list[list[int]], calls: int) -> list[dict[str, float]]:
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    rows = []
    for _ in range(calls):
        clock.compute = clock.compute_cpu = 0.0
        clock.phases = dict.fromkeys(PHASES, 0.0)
        ids = [list(p) for p in prompts]  # the caller's lists, as throughput.py builds them per call
        cpu, t = time.process_time(), time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=sp)
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        row = {"host": wall - clock.compute, "cpu": cpu - clock.compute_cpu, **clock.phases}
        row["caller and hand-offs"] = row["host"] - sum(clock.phases.values())
        rows.append(row)
        engine.flush_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(1)  # the model's compute is taken out; one thread keeps it from crowding the host threads
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / "tiny", "tiny", "float32", max_positions=max(1024, 2 * args.prompt))
    page = 16
    engine = Engine(str(path), device="cpu", load_format="dummy", page_size=page, max_running_requests=args.batch,
                    num_pages=args.batch * -(-(args.prompt + 8) // page) + 256)
    clock = Clock()
    model, sched = engine.model_runner.model, engine.scheduler
    model.forward = clock.wrap_compute(model.forward)
    model.compute_logits = clock.wrap_compute(model.compute_logits)
    for name in PHASES:
        setattr(sched, name, clock.wrap_phase(name, getattr(sched, name)))
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, 500, (args.batch, args.prompt), generator=g).tolist()
    engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})  # warm-up
    engine.flush_cache()
    runs = [one_run(engine, clock, prompts, args.calls) for _ in range(args.repeats)]
    engine.shutdown()
    medians = [{k: statistics.median(r[k] for r in rows) * 1e3 for k in rows[0]} for rows in runs]
    best = min(medians, key=lambda m: m["host"])
    print(f"host_prefill batch={args.batch} prompt={args.prompt}: host ms per prefill call (median of {args.calls}; best of "
          f"{args.repeats} runs) = {best['host']:.3f}, process CPU {best['cpu']:.3f}; by phase "
          + ", ".join(f"{k} {best[k]:.3f}" for k in (*PHASES, "caller and hand-offs"))
          + "; every run's median: " + " ".join(f"{m['host']:.3f}" for m in medians))


if __name__ == "__main__":
    main()
