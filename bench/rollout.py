"""An RL rollout against its schedule roofline: P prompts x n samples, long-tailed output lengths, run
offline (`Engine.generate`), over HTTP non-streaming and streaming (native `/generate`, `/v1/completions`)
by concurrent clients, in one run.

Workload (flags): prompts of uniform length in [--prompt-min, --prompt-max] tokens, after a head of
--shared-head tokens every prompt starts with (a system prompt, few-shot examples), each sampled --n
times; output lengths lognormal (median --out-median, sigma --out-sigma, clipped to [--out-min,
--out-max]) with `ignore_eos`, so random weights still give the tail. Modes: `sampled` (temperature 1,
a seed per request, the logprob of every token) and `greedy` (temperature 0, no logprobs).

Roofline of the schedule: every decode step reads what `common.decode_step_bytes` counts (all weights, or
for an MoE model only the experts its rows route to, plus the KV of every sequence still running at its
current context), at the device-to-device copy bandwidth measured in this run; prefill left out
(a sequence's first token comes from its prefill). Sequences are admitted in order as slots free up
(--max-running). The tail is the time with fewer than 16 sequences running: for the roofline, its steps;
for a measured run, the wall time from the last moment 16 or more requests were unfinished to the end
(from `get_load` polled every few ms; each poll is answered between two scheduler steps). Every path
checks that it got every token the workload asked for (streams: the last chunk's count). `--repeats N` runs each
mode and path N times in the same process, as an RL loop repeats its rollout, in rounds (every mode and path once a
round), so a cost only a first run pays falls on no mode or path alone: the table shows each one's median run, the
notes every run's wall, the Triton kernels compiled during it and the allocator's growth (one-time costs).

HTTP clients run in a separate process (bench/rollout_clients.py: asyncio + httpx, --concurrency
connections), so they do not share the engine process's interpreter lock; the server is the engine's own
FastAPI app in a thread of this process, as `hotswap serve` runs it.

    python bench/rollout.py --shape qwen3-0.6b --prompts 64 --n 8                       # GPU
    python bench/rollout.py --shape qwen3-8b --prompts 32 --n 8 --modes sampled
    python bench/rollout.py --shape qwen3-30b-a3b --prompts 32 --n 8 --modes sampled      # MoE
    python bench/rollout.py --device cpu --tiny                                        # smoke test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (  # noqa: E402
    ceilings_line,
    config_only_checkpoint,
    d2d_bytes_per_s,
    decode_step_seconds,
    device_name,
    matmul_flops_per_s,
    print_table,
    proc_cpu_s,
)
from kernel_profile import profile_call  # noqa: E402

TAIL_ROWS = 16
PATHS = ("offline", "generate", "generate-stream", "completions", "completions-stream")


@dataclass(kw_only=True, slots=True)
class Workload:
    prompts: list[list[int]]  # one per request (each prompt repeated n times, consecutively)
    out_lens: list[int]
    seeds: list[int]

    def sampling_params(self, i: int, mode: str) -> dict:
        sp = {"max_new_tokens": self.out_lens[i], "ignore_eos": True}
        if mode == "sampled":
            return dict(sp, temperature=1.0, seed=self.seeds[i])
        return dict(sp, temperature=0.0)


def make_workload(args, vocab: int) -> Workload:
    rng = np.random.default_rng(args.seed)
    head = rng.integers(3, vocab, size=args.shared_head).tolist()
    prompts, out_lens = [], []
    for _ in range(args.prompts):
        ids = head + rng.integers(3, vocab, size=int(rng.integers(args.prompt_min, args.prompt_max + 1))).tolist()
        prompts += [ids] * args.n
    lens = np.exp(np.log(args.out_median) + args.out_sigma * rng.standard_normal(len(prompts)))
    out_lens = np.clip(np.rint(lens), args.out_min, args.out_max).astype(int).tolist()
    return Workload(prompts=prompts, out_lens=out_lens, seeds=[1000 + i for i in range(len(prompts))])


def schedule_roofline(w: Workload, max_running: int, step_time: Callable[[int, int], tuple[float, bool]]) -> dict:
    """Seconds of the decode steps of this schedule, with its steps, tail steps and the steps its arithmetic
    bounds. `step_time(rows, context_tokens)`: (the least seconds a decode step of `rows` sequences holding
    `context_tokens` in all takes, whether FLOPs rather than bytes set that bound)."""
    waiting = list(range(len(w.prompts)))[::-1]
    ctx = np.zeros(0, dtype=np.int64)  # running sequences' current context
    left = np.zeros(0, dtype=np.int64)  # their decode steps still to run
    seconds = tail_seconds = 0.0
    steps = tail_steps = compute_steps = 0
    while waiting or len(ctx):
        admit = []
        while waiting and len(ctx) + len(admit) < max_running:
            admit.append(waiting.pop())
        if admit:  # the prefill gives the first token; decode runs the rest
            ctx = np.concatenate([ctx, [len(w.prompts[i]) + 1 for i in admit]])
            left = np.concatenate([left, [w.out_lens[i] - 1 for i in admit]])
            keep = left > 0
            ctx, left = ctx[keep], left[keep]
            if not len(ctx):
                continue
        t, by_compute = step_time(len(ctx), int(ctx.sum()))
        seconds += t
        steps += 1
        compute_steps += by_compute
        if len(ctx) < TAIL_ROWS:
            tail_seconds += t
            tail_steps += 1
        ctx, left = ctx + 1, left - 1
        keep = left > 0
        ctx, left = ctx[keep], left[keep]
    return {"seconds": seconds, "steps": steps, "tail_steps": tail_steps, "tail_seconds": tail_seconds,
            "compute_steps": compute_steps}


class LoadMonitor:
    """Polls `get_load` in a thread and keeps the wall-clock times (time.time(), comparable with the
    client process's) at which TAIL_ROWS or more requests were unfinished."""

    def __init__(self, engine, period_s: float = 0.005):
        self.engine, self.period_s = engine, period_s
        self.busy: list[float] = []
        self.stop_flag = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop_flag.is_set():
            load = self.engine.get_load()
            if load.num_running + load.num_waiting >= TAIL_ROWS:
                self.busy.append(time.time())
            time.sleep(self.period_s)

    def tail_seconds(self, start: float, end: float) -> float:
        """Of the run [start, end]: the time after the last moment it had TAIL_ROWS requests unfinished."""
        return end - max([start] + [t for t in self.busy if start <= t <= end])

    def __enter__(self) -> LoadMonitor:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop_flag.set()
        self.thread.join(5.0)


# ---- the run ----


CPU_THREADS = ("hotswap-scheduler", "hotswap-http", "hotswap-service-in", "hotswap-service-out")


def threads_cpu_s(frontend_pids: list[int] = ()) -> dict[str, float]:
    """CPU seconds so far of this process's scheduler thread, HTTP event-loop thread (or, with the front end in
    its own process, the threads serving its pipe, and that whole process) (Linux /proc; {} elsewhere): a loop
    in this process shares the interpreter lock with the scheduler, so its busy time is time the scheduler may wait."""
    out = {}
    for t in threading.enumerate():
        if t.name in CPU_THREADS and (cpu := proc_cpu_s(f"/proc/self/task/{t.native_id}/stat")) is not None:
            out[t.name] = out.get(t.name, 0.0) + cpu  # one pipe's threads per front end process: summed
    cpus = [proc_cpu_s(f"/proc/{pid}/stat") for pid in frontend_pids]
    if frontend_pids and None not in cpus:
        out["frontend process" if len(cpus) == 1 else f"{len(cpus)} frontend processes"] = sum(cpus)
    return out


class TritonCompiles:
    """The Triton kernels compiled while it is entered (knobs.runtime.jit_post_compile_hook; None where this Triton
    has no such hook): a compile inside a timed run is a one-time cost the run's wall includes."""

    def __init__(self):
        self.names: list[str] | None = None
        self.knobs = None
        try:
            from triton import knobs

            self.knobs = knobs.runtime if hasattr(knobs.runtime, "jit_post_compile_hook") else None
        except Exception:  # no Triton (a CPU run), or one without knobs
            pass

    def _hook(self, *args, **kwargs) -> None:
        fn = kwargs.get("fn")
        self.names.append(str(getattr(fn, "name", fn)).rsplit(".", 1)[-1])

    def __enter__(self) -> TritonCompiles:
        if self.knobs is not None:
            self.names, self.previous = [], self.knobs.jit_post_compile_hook
            self.knobs.jit_post_compile_hook = self._hook
        return self

    def __exit__(self, *exc) -> None:
        if self.knobs is not None:
            self.knobs.jit_post_compile_hook = self.previous

    def summary(self) -> str:
        if self.names is None:
            return "-"
        counts = Counter(self.names)
        return f"{len(self.names)}" + (" (" + ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())) + ")" if counts else "")


def run_path(engine, path: str, w: Workload, mode: str, args, url: str | None, routed_experts: bool = False,
             frontend_pids: list[int] = ()) -> dict:
    jobs = [(ids, w.sampling_params(i, mode)) for i, ids in enumerate(w.prompts)]
    engine.flush_cache()  # every path starts from the same empty prefix cache
    cpu_before = threads_cpu_s(frontend_pids)
    reserved_before = torch.cuda.memory_reserved() if torch.cuda.is_available() else 0
    with LoadMonitor(engine) as mon, TritonCompiles() as compiles:
        if path == "offline":
            start = time.time()
            outs = offline_rollout(engine, jobs, mode, routed_experts)
            end = time.time()
            tokens = sum(len(o["output_ids"]) for o in outs)
            cached = sum(o["meta_info"]["cached_tokens"] for o in outs)  # prompt tokens a prefix match gave
            if routed_experts:
                assert all(o["meta_info"].get("routed_experts") for o in outs)
            if mode == "sampled":
                assert all(len(o["meta_info"]["output_token_logprobs"]) == len(o["output_ids"]) for o in outs)
        else:
            res = run_clients(engine, path, jobs, mode, args, url)
            if "timed_out" in res:
                return res
            start, end, tokens = res["start"], res["end"], res["tokens"]
    if tokens != sum(w.out_lens):
        raise RuntimeError(f"{mode}/{path}: {tokens} output tokens, the workload asked for {sum(w.out_lens)}")
    cpu_after = threads_cpu_s(frontend_pids)
    out = {"seconds": end - start, "tokens": tokens, "tail_seconds": mon.tail_seconds(start, end),
           "thread_cpu_s": {k: cpu_after[k] - cpu_before[k] for k in cpu_after if k in cpu_before},
           "triton_compiles": compiles.summary(),
           "reserved_growth_mib": ((torch.cuda.memory_reserved() if torch.cuda.is_available() else 0) - reserved_before) / 2**20}
    if path == "offline":
        out["prompt_tokens_cached"] = cached
    else:
        out["client_cpu_s"] = res["cpu_s"]
    return out


def offline_rollout(engine, jobs: list, mode: str, routed_experts: bool = False) -> list[dict]:
    return engine.generate(input_ids=[j[0] for j in jobs], sampling_params=[j[1] for j in jobs],
                           return_logprob=mode == "sampled", return_routed_experts=routed_experts)


def profile_rollout(engine, w: Workload, mode: str, device: torch.device) -> str:
    """The offline rollout once more under torch.profiler: device time by kind of kernel, and its idle share."""
    if device.type != "cuda":
        return "profile: skipped (it records CUDA kernels)\n"
    jobs = [(ids, w.sampling_params(i, mode)) for i, ids in enumerate(w.prompts)]
    engine.flush_cache()
    rows, wall, busy = profile_call(lambda: offline_rollout(engine, jobs, mode), device)
    return print_table(f"profile: {mode} offline rollout, {wall:.2f} s wall under the profiler, kernels {busy:.2f} s, "
                       f"device idle {100 * max(0.0, 1 - busy / wall):.0f}% of the wall (waiting on the host)",
                       ["kernels", "device ms", "% of kernel time", "launches"], rows)


def run_clients(engine, path: str, jobs: list, mode: str, args, url: str) -> dict:
    """The jobs over `--client-procs` processes (round-robin, the connections split evenly), all at once; the
    wall is from the first start to the last end, the CPU the processes' sum."""
    procs = max(1, min(args.client_procs, len(jobs)))
    script = str(Path(__file__).with_name("rollout_clients.py"))
    running = []
    for k in range(procs):
        order = json.dumps({"url": url, "path": path, "jobs": jobs[k::procs], "mode": mode,
                            "concurrency": max(1, args.concurrency // procs)})
        p = subprocess.Popen([sys.executable, script], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        running.append((p, order))
    # every process gets its order at once (communicating with one after another would start the second
    # only once the first had finished: --client-procs 2 then ran its halves one after the other)
    with ThreadPoolExecutor(len(running)) as pool:
        talks = [pool.submit(p.communicate, order, timeout=args.http_timeout) for p, order in running]
        try:
            outcomes = [talk.result() for talk in talks]
        except subprocess.TimeoutExpired:
            for q, _ in running:
                q.kill()
            engine.abort_request(abort_all=True)  # the requests still running
            return {"seconds": float("nan"), "tokens": 0, "tail_seconds": float("nan"), "timed_out": args.http_timeout}
    results = []
    for (p, _), (stdout, stderr) in zip(running, outcomes):
        if p.returncode:
            raise RuntimeError(f"{mode}/{path}: the HTTP clients failed:\n{stderr[-4000:]}")
        results.append(json.loads(stdout))
    return {"start": min(r["start"] for r in results), "end": max(r["end"] for r in results),
            "tokens": sum(r["tokens"] for r in results), "cpu_s": sum(r["cpu_s"] for r in results)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--tiny", action="store_true", help="tiny model and counts (a CPU smoke run in seconds)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8)
    ap.add_argument("--prompt-min", type=int, default=64)
    ap.add_argument("--prompt-max", type=int, default=512)
    ap.add_argument("--shared-head", type=int, default=0, help="tokens every prompt starts with, before its own")
    ap.add_argument("--out-median", type=float, default=384)
    ap.add_argument("--out-sigma", type=float, default=0.8)
    ap.add_argument("--out-min", type=int, default=32)
    ap.add_argument("--out-max", type=int, default=2048)
    ap.add_argument("--modes", default="sampled,greedy", help="comma list of sampled,greedy")
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma list of {','.join(PATHS)}")
    ap.add_argument("--concurrency", type=int, default=512, help="HTTP clients in flight")
    ap.add_argument("--client-procs", type=int, default=1,
                    help="client processes sharing the jobs and connections (one asyncio process can be the bound when streaming)")
    ap.add_argument("--http-timeout", type=float, default=300.0, help="seconds one HTTP path may take; then it is aborted and reported")
    ap.add_argument("--max-running", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=1,
                    help="runs of each mode and path, in rounds of every mode and path once (an RL loop repeats its rollout: "
                         "a one-time cost shows as a first run's excess); the table shows the median run, the notes each run's "
                         "wall and Triton compiles")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--engine", action="append", default=[], metavar="FIELD=INT", help="integer EngineConfig override (repeatable)")
    ap.add_argument("--routed-experts", action="store_true",
                    help="MoE: then run the sampled rollout offline again on an engine with enable_return_routed_experts, "
                         "every request asking for its routing (R3), and report its time / the sampled offline time")
    ap.add_argument("--incremental-streaming-output", action="store_true",
                    help="serve with SGLang's incremental streaming output: a native /generate chunk carries only its new tokens "
                         "(off: SGLang's default, every chunk repeats the whole output so far)")
    ap.add_argument("--frontend-process", action="store_true",
                    help="serve HTTP from a front end in its own process (`hotswap serve`'s default) instead of a thread here")
    ap.add_argument("--frontend-workers", type=int, default=1,
                    help="with --frontend-process: this many front end processes on the port (`hotswap serve --frontend-workers`)")
    ap.add_argument("--profile", action="store_true",
                    help="then run the offline rollout of the first mode once more under torch.profiler: device time by "
                         "kind of kernel, and the device's idle share of the wall")
    ap.add_argument("--out", default=None, help="append the tables to this file")
    ap.add_argument("--json", default=None, help="write every figure to this file")
    args = ap.parse_args()
    if args.frontend_workers != 1 and not args.frontend_process or args.frontend_workers < 1:
        ap.error("--frontend-workers takes a count >= 1, and more than 1 only with --frontend-process")
    if args.tiny:
        args.shape = args.shape if args.shape.startswith("tiny") else "tiny"
        for k, v in dict(prompts=4, n=2, prompt_min=8, prompt_max=24, out_median=12, out_min=4, out_max=40, concurrency=8,
                         max_running=8).items():
            setattr(args, k, v)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else (args.device if args.device != "auto" else "cpu"))
    on_gpu = device.type == "cuda"
    paths = [p for p in args.paths.split(",") if p]
    modes = [m for m in args.modes.split(",") if m]
    unknown = [p for p in paths if p not in PATHS] + [m for m in modes if m not in ("sampled", "greedy")]
    if unknown:
        raise SystemExit(f"unknown path or mode {unknown}; paths: {PATHS}, modes: sampled, greedy")

    from hotswap import Engine

    overrides = {k: int(v) for k, v in (kv.split("=", 1) for kv in args.engine)}
    ckpt = config_only_checkpoint(Path(tempfile.mkdtemp()) / args.shape, args.shape, "bfloat16" if on_gpu else "float32",
                                  max_positions=args.shared_head + args.prompt_max + args.out_max + 16)

    def start_engine(routed_experts: bool) -> Engine:
        return Engine(str(ckpt), device=str(device), load_format="dummy", max_running_requests=args.max_running,
                      enable_return_routed_experts=routed_experts, incremental_streaming_output=args.incremental_streaming_output,
                      **overrides)

    engine = start_engine(False)
    w = make_workload(args, engine.model_config.vocab_size)
    bw, flops = d2d_bytes_per_s(device), matmul_flops_per_s(device)
    roof = schedule_roofline(w, args.max_running, lambda rows, ctx: decode_step_seconds(engine, rows, ctx / rows, bw))
    roof_flops = schedule_roofline(w, args.max_running, lambda rows, ctx: decode_step_seconds(engine, rows, ctx / rows, bw, flops))
    title = (f"rollout, {args.shape}, {device_name(device)}, {engine.model_config.torch_dtype}: {args.prompts} prompts x {args.n}, "
             f"prompts {args.prompt_min}-{args.prompt_max}{f' after a shared head of {args.shared_head}' if args.shared_head else ''}, "
             f"outputs lognormal median {args.out_median:g} sigma {args.out_sigma:g} "
             f"in [{args.out_min}, {args.out_max}] ({sum(w.out_lens):,} tokens), max_running {args.max_running}, "
             f"{args.concurrency} HTTP clients{', incremental streaming output' if args.incremental_streaming_output else ''}"
             f"{f', HTTP front end in {args.frontend_workers} process(es) of its own' if args.frontend_process else ''}; "
             f"{ceilings_line(device)}")

    server = url = None
    frontend_pids: list[int] = []
    if any(p != "offline" for p in paths) and args.frontend_process:
        from hotswap.server.frontend_process import FrontendGroup, FrontendOptions
        from hotswap.server.launch import bind_socket

        sock = bind_socket("127.0.0.1", 0)
        server = FrontendGroup(engine, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1]), args.frontend_workers).start()
        url, frontend_pids = server.url, server.pids
    elif any(p != "offline" for p in paths):
        from hotswap.server.app import create_app
        from hotswap.server.launch import ServerThread

        server = ServerThread(create_app(engine)).start()
        url = server.url
    def of_roofline(seconds: float) -> list[str]:
        """A run's share of the bytes roofline and of the bytes-or-FLOPs one (GPU runs only)."""
        if not on_gpu:
            return ["-", "-"]
        return [f"{100 * roof['seconds'] / seconds:.1f}%", f"{100 * roof_flops['seconds'] / seconds:.1f}%"]

    results: dict = {"roofline": roof, "roofline_bytes_or_flops": roof_flops, "title": title, "runs": {}, "repeats": {}}
    rows = []
    warm = Workload(prompts=w.prompts[: args.max_running], out_lens=[min(8, n) for n in w.out_lens[: args.max_running]],
                    seeds=w.seeds[: args.max_running])
    try:
        for mode in modes:
            run_path(engine, "offline", warm, mode, args, url)  # graphs, compiles, allocator
        for _ in range(args.repeats):  # rounds: modes and paths alternate, so sampled / greedy compares like with like
            for mode in modes:
                for path in paths:
                    r = run_path(engine, path, w, mode, args, url, frontend_pids=frontend_pids)
                    results["repeats"].setdefault(f"{mode}/{path}", []).append(r)
        for mode in modes:
            offline = None
            for path in paths:
                reps = results["repeats"][f"{mode}/{path}"]
                done = sorted((r for r in reps if "timed_out" not in r), key=lambda r: r["seconds"])
                if not done:
                    results["runs"][f"{mode}/{path}"] = reps[-1]
                    rows.append([mode, path, f"> {reps[-1]['timed_out']:g} (aborted)", "-", "-", "-", "-", "-", "-"])
                    continue
                r = results["runs"][f"{mode}/{path}"] = done[(len(done) - 1) // 2]  # the median run (the faster of two)
                offline = r["seconds"] if path == "offline" else offline
                rows.append([mode, path, f"{r['seconds']:.2f}", f"{r['tokens'] / r['seconds']:,.0f}",
                             *of_roofline(r["seconds"]),
                             f"{r['seconds'] / offline:.2f}" if offline else "-",
                             f"{r['tail_seconds']:.2f} ({100 * r['tail_seconds'] / r['seconds']:.0f}%)",
                             f"{r['client_cpu_s']:.1f}" if "client_cpu_s" in r else "-"])
        profile_text = profile_rollout(engine, w, modes[0], device) if args.profile else ""
    finally:
        if server is not None:
            server.stop()
        engine.shutdown()
    if args.routed_experts:  # a second engine, so the first one's rows carry no routing-table writes
        engine = start_engine(True)
        try:
            run_path(engine, "offline", warm, "sampled", args, None, routed_experts=True)
            r = results["runs"]["sampled+R3/offline"] = run_path(engine, "offline", w, "sampled", args, None, routed_experts=True)
        finally:
            engine.shutdown()
        base = results["runs"].get("sampled/offline")
        rows.append(["sampled+R3", "offline", f"{r['seconds']:.2f}", f"{r['tokens'] / r['seconds']:,.0f}",
                     *of_roofline(r["seconds"]),
                     f"{r['seconds'] / base['seconds']:.2f}" if base else "-",
                     f"{r['tail_seconds']:.2f} ({100 * r['tail_seconds'] / r['seconds']:.0f}%)", "-"])
    text = print_table(title, ["mode", "path", "wall s", "output tok/s", "% of schedule roofline",
                               "% of bytes-or-FLOPs roofline", "/ offline",
                               f"tail s (< {TAIL_ROWS} running)", f"client CPU s ({args.client_procs} proc)"], rows)
    notes = (f"schedule roofline: {roof['seconds']:.2f} s over {roof['steps']:,} decode steps at {bw / 1e9:,.0f} GB/s; "
             f"tail {roof['tail_steps']:,} steps, {roof['tail_seconds']:.2f} s\n"
             f"with arithmetic (each step the longer of its bytes at D2D and its FLOPs at {flops / 1e12:,.1f} TFLOP/s, "
             f"a measured dense matmul): {roof_flops['seconds']:.2f} s, {roof_flops['compute_steps']:,} of the steps bound by "
             f"FLOPs\n")
    prompt_tokens = sum(map(len, w.prompts))
    for key, r in results["runs"].items():
        if "prompt_tokens_cached" in r:
            notes += (f"prompt tokens during {key}: {prompt_tokens:,}, of which {r['prompt_tokens_cached']:,} came from the prefix "
                      f"cache (repeated prompts and shared heads computed once)\n")
        if r.get("thread_cpu_s"):
            notes += f"CPU s during {key}: " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(r["thread_cpu_s"].items())) + "\n"
    for key, reps in results["repeats"].items():
        notes += (f"{key}, each run in order (the table shows the median): "
                  + "; ".join(f"{r['seconds']:.2f} s, Triton compiles {r['triton_compiles']}, allocator reserved "
                              f"{r['reserved_growth_mib']:+,.0f} MiB" for r in reps if "seconds" in r) + "\n")
    print(notes, flush=True)
    text += "\n" + notes + profile_text
    if args.out:
        with open(args.out, "a") as f:
            f.write(text + "\n")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
