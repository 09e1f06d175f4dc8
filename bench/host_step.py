"""Host time of one decode step: what the scheduler thread spends per step outside the model and the
sampler's arithmetic (batch formation, row parameters, input tensors, read-back, token handling), the
part that grows with the batch and that the GPU waits on when the graphs run faster than the host.

Each decode step of a full batch is timed (schedule + launch + process of the scheduler loop), minus
the time inside the model's forward, its LM head and the sampler's arithmetic; the median (and the
90th percentile, which garbage-collector pauses raise) over the steps of the best of a few runs.

    python bench/host_step.py --batch 256 --steps 48                  # CPU, tiny model, RL sampling
    python bench/host_step.py --batch 256 --mode penalties            # + min_new_tokens and a frequency penalty
    python bench/host_step.py --batch 256 --mode stops                # + a stop string (detokenized every step)
    python bench/host_step.py --batch 512 --prompt 512 --pages 20000  # rollout-length contexts (33+ pages a row)
    python bench/host_step.py --batch 512 --stream                    # every request streamed: an output per token
    python bench/host_step.py --shape qwen3-0.6b --batch 1 --device cuda --profile 25   # the GPU path (decode graphs)

On a GPU the steps run as CUDA graphs and nothing is computed on the host, but `process` also waits for the
step in flight (the read-back of its sampled ids): `--profile N` prints the N functions of the three phases
that took the most time, where that wait shows as its own line; the compute the timings subtract is left out
of the profile too, so on the CPU it lists the host functions.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint  # noqa: E402

from hotswap import Engine  # noqa: E402
from hotswap.runner import sampler  # noqa: E402

PHASES = ("schedule", "launch", "process")  # the scheduler loop's host work per step (launch minus its compute)
MODES = {
    "greedy": {"temperature": 0.0},
    "sampled": {"temperature": 1.0, "top_p": 0.95},  # an RL rollout: logprobs of every token (return_logprob below)
    "penalties": {"temperature": 1.0, "top_p": 0.95, "min_new_tokens": 40, "frequency_penalty": 0.2},
    # a stop string (one that never matches): the scheduler detokenizes every token to look for it
    "stops": {"temperature": 1.0, "top_p": 0.95, "stop": ["</never-emitted>"]},
}


class Clock:
    """Compute time (model, LM head, sampler arithmetic), accumulated by the wrapped functions. `prof`: the
    phases' profiler (`--profile`), paused inside those functions, so it lists the host work the timings keep,
    not the compute they subtract (which on the CPU filled the top of the list)."""

    def __init__(self, prof: cProfile.Profile | None = None) -> None:
        self.compute = 0.0
        self.prof = prof
        self.profiling = False  # inside a phase and outside compute: the profiler runs

    def phase(self, fn, *args, **kwargs):
        """Run one phase of the scheduler loop, profiled when asked."""
        if self.prof is None:
            return fn(*args, **kwargs)
        self.profiling = True
        self.prof.enable()
        try:
            return fn(*args, **kwargs)
        finally:
            self.prof.disable()
            self.profiling = False

    def wrap_compute(self, fn):
        def timed(*args, **kwargs):
            paused = self.profiling
            if paused:
                self.prof.disable()
                self.profiling = False
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.compute += time.perf_counter() - t
                if paused:
                    self.profiling = True
                    self.prof.enable()
        return timed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--mode", choices=sorted(MODES), default="sampled")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--pages", type=int, default=4096, help="KV pages of 16 tokens (the batch's contexts must fit)")
    ap.add_argument("--stream", action="store_true", help="stream every request (an output per token, consumed on this thread)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--profile", type=int, default=0, help="print this many functions of the phases by their own time")
    args = ap.parse_args()
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / args.shape, args.shape, "float32" if args.device == "cpu" else "bfloat16",
                                  max_positions=max(1024, args.prompt + args.steps + 1))
    engine = Engine(str(path), device=args.device, load_format="dummy", page_size=16, num_pages=args.pages,
                    max_running_requests=args.batch, max_num_batched_tokens=max(4096, args.batch * args.prompt))
    sched, runner = engine.scheduler, engine.model_runner
    prof = cProfile.Profile() if args.profile else None
    clock = Clock(prof)
    model = runner.model
    model.forward = clock.wrap_compute(model.forward)
    model.compute_logits = clock.wrap_compute(model.compute_logits)
    sampler.reference_sample = clock.wrap_compute(sampler.reference_sample)
    real = {name: getattr(sched, name) for name in PHASES}
    step: dict[str, float] = {}
    steps: list[dict[str, float]] = []
    decode = [False]

    def timed_phase(name):
        def run(*a, **kw):
            c0, t = clock.compute, time.perf_counter()
            out = clock.phase(real[name], *a, **kw)
            step[name] = step.get(name, 0.0) + (time.perf_counter() - t) - (clock.compute - c0)
            if name == "launch":
                entries = a[0].entries
                decode[0] = len(entries) == args.batch and all(len(e.input_ids) == 1 for e in entries)
            if name == "process":  # a loop iteration ends once the step before the one just launched is processed
                if decode[0] and len(step) == len(PHASES):
                    steps.append(dict(step))
                step.clear()
            return out
        return run

    for name in real:
        setattr(sched, name, timed_phase(name))
    sp = dict(MODES[args.mode], max_new_tokens=args.steps, ignore_eos=True)
    prompts = [[3 + (7 * i + j) % 400 for j in range(args.prompt)] for i in range(args.batch)]
    repeats = []
    for r in range(args.repeats):
        steps.clear()
        out = engine.generate(input_ids=prompts, sampling_params=dict(sp, seed=r), return_logprob=True, stream=args.stream,
                              incremental_streaming_output=True if args.stream else None)
        if args.stream:
            for _ in out:
                pass
        engine.flush_cache()
        totals = [sum(s.values()) * 1e3 for s in steps]
        phases = {name: statistics.median(s[name] for s in steps) * 1e3 for name in PHASES}
        repeats.append((statistics.median(totals), statistics.quantiles(totals, n=10)[-1], phases, len(steps)))
    engine.shutdown()
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(args.profile)
    best = min(repeats, key=lambda r: r[0])
    print(f"host_step shape={args.shape} batch={args.batch} mode={args.mode}{' streamed' if args.stream else ''} output={args.steps}: host ms per decode step "
          f"(median over {best[3]} steps; best of {args.repeats} runs) = {best[0]:.2f}, 90th percentile {best[1]:.2f}; by phase (medians) "
          + ", ".join(f"{k} {v:.2f}" for k, v in best[2].items())
          + "; every run's median: " + " ".join(f"{r[0]:.2f}" for r in repeats))


if __name__ == "__main__":
    main()
