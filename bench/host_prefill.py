"""Host time of one prefill call, the call bench/throughput.py's prefill column times (`generate` with
max_new_tokens=1 after a warm-up, one step). A one-step call overlaps none of its host work with the
device, so every host microsecond here is one of the GPU figure's.

On the CPU (the default): per call, the wall time minus the model's forward and LM head (the device's work
on a GPU), and the CPU time of both threads minus the compute's (steadier on a shared machine); by phase
(wall, compute taken out), the scheduler thread's dispatch (taking the requests in), schedule, launch and
process (read-back, outputs), and the rest: the caller's request preparation, the hand-offs between the
threads and the caller's assembly of the replies. Medians over the calls of the best of a few runs.

On a GPU (`--device cuda --shape qwen3-0.6b`): the wall time of each call (synchronized), the median of
many calls instead of throughput.py's single call, and its phases as they are (process waits for the
device).

    python bench/host_prefill.py --cases 1x128,64x128,256x128
    python bench/host_prefill.py --cases 64x128 --stub-compute      # CPU: the model returns zeros at once, host work only
    python bench/host_prefill.py --device cuda --shape qwen3-0.6b --cases 1x128,64x128,256x128 --calls 20

Only names both trees have are used, so this file in another tree's bench/ measures that tree the same way
(`git archive 6c9ff7c src bench | tar -x -C /tmp/before`, copy it there, run it there).
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
    """Per call: the model's compute (wall and CPU time) and each phase's time minus the compute inside it,
    accumulated by the wrapped functions (on a GPU the compute is only its launch)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
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


def stub_compute(model: torch.nn.Module) -> None:
    """The model's forward and LM head return zeros of their shapes at once (CPU): a call's time is then its host work,
    steadier on a shared 2-core machine than the compute taken out of a real forward's wall time."""
    hidden = model.model.embed_tokens.weight.shape[1]
    vocab = model.compute_logits(torch.zeros(1, hidden)).shape[-1]
    model.forward = lambda input_ids, ctx: torch.zeros(input_ids.shape[0], hidden)
    model.compute_logits = lambda h: torch.zeros(h.shape[0], vocab)


def one_run(engine: Engine, clock: Clock, prompts: list[list[int]], calls: int, gpu: bool) -> list[dict[str, float]]:
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}
    rows = []
    for _ in range(calls):
        ids = [list(p) for p in prompts]  # the caller's lists, as throughput.py builds them per call
        if gpu:
            torch.cuda.synchronize()
        clock.reset()
        cpu, t = time.process_time(), time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=sp)
        if gpu:
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        compute, compute_cpu = (0.0, 0.0) if gpu else (clock.compute, clock.compute_cpu)
        row = {"wall": wall, "host": wall - compute, "cpu": cpu - compute_cpu, **clock.phases}
        row["caller and hand-offs"] = row["host"] - sum(clock.phases.values())
        rows.append(row)
        engine.flush_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cases", default="64x128", help="BATCHxPROMPT,...")
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--stub-compute", action="store_true", help="CPU only: the model returns zeros at once (stub_compute)")
    args = ap.parse_args()
    gpu = args.device.startswith("cuda")
    if gpu and args.stub_compute:
        ap.error("--stub-compute is for the CPU: on a GPU the compute is the device's, outside the host time already")
    cases = [tuple(int(x) for x in c.split("x")) for c in args.cases.split(",")]
    if not gpu:
        torch.set_num_threads(1)  # the model's compute is taken out; one thread keeps it from crowding the host threads
    dtype = "bfloat16" if gpu else "float32"
    longest, widest = max(p for _, p in cases), max(b for b, _ in cases)
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / args.shape, args.shape, dtype, max_positions=max(1024, 2 * longest))
    page = 16
    engine = Engine(str(path), device=args.device, load_format="dummy", page_size=page, max_running_requests=widest,
                    num_pages=widest * -(-(longest + 8) // page) + 256)
    clock = Clock()
    model, sched = engine.model_runner.model, engine.scheduler
    if args.stub_compute:
        stub_compute(model)
    model.forward = clock.wrap_compute(model.forward)
    model.compute_logits = clock.wrap_compute(model.compute_logits)
    for name in PHASES:
        setattr(sched, name, clock.wrap_phase(name, getattr(sched, name)))
    g = torch.Generator().manual_seed(0)
    for batch, prompt in cases:
        prompts = torch.randint(3, 500, (batch, prompt), generator=g).tolist()
        engine.generate(input_ids=prompts, sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})  # warm-up
        engine.flush_cache()
        runs = [one_run(engine, clock, prompts, args.calls, gpu) for _ in range(args.repeats)]
        medians = [{k: statistics.median(r[k] for r in rows) * 1e3 for k in rows[0]} for rows in runs]
        best = min(medians, key=lambda m: m["host"])
        head = (f"wall ms per prefill call = {best['wall']:.3f} ({batch * prompt / best['wall'] * 1e3:,.0f} prefill tok/s)" if gpu else
                f"host ms per prefill call = {best['host']:.3f}, process CPU {best['cpu']:.3f}")
        print(f"host_prefill shape={args.shape} device={args.device} batch={batch} prompt={prompt}: {head} (median of {args.calls}; "
              f"best of {args.repeats} runs); by phase " + ", ".join(f"{k} {best[k]:.3f}" for k in (*PHASES, "caller and hand-offs"))
              + "; every run's median: " + " ".join(f"{m['wall' if gpu else 'host']:.3f}" for m in medians), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
