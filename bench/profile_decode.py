"""Where a decode step's time goes: GPU kernels (torch.profiler) and the host-side step time.

    python bench/profile_decode.py --shape qwen3-0.6b --batch 64
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint, decode_graph_replay_ms, timed  # noqa: E402

from hotswap import Engine  # noqa: E402
from hotswap.runner.cuda_graph import graph_bucket  # noqa: E402


def print_critical_path(prof: torch.profiler.profile, replays: int, layers: int) -> None:
    """Each kernel's share of the wall time: how far its end moves the latest end of the kernels before it. Under PDL
    kernels overlap, so their durations add up to more than the step; these shares add up to it (gaps included).
    A kernel called several times a layer (the few-rows matmul: q/k/v, o_proj, gate_up, down) is also listed by its
    place in the layer ([0], [1], ...), with its own duration beside its share."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    calls: dict[str, int] = {}
    for e in kernels:
        calls[e.name[:60]] = calls.get(e.name[:60], 0) + 1
    share: dict[str, list[float]] = {}
    by_place: dict[str, list[tuple[float, float]]] = {}
    seen: dict[str, int] = {}
    latest = None
    for e in kernels:
        start, end = e.time_range.start, e.time_range.end
        moved = max(0.0, end - latest if latest is not None else end - start)
        latest = end if latest is None else max(latest, end)
        name = e.name[:60]
        share.setdefault(name, []).append(moved)
        per_layer, rest = divmod(calls[name] // replays, layers)
        if per_layer > 1 and not rest:
            place = f"{name[:54]}[{seen.get(name, 0) % per_layer}]"
            seen[name] = seen.get(name, 0) + 1
            by_place.setdefault(place, []).append((moved, end - start))
    total = sum(sum(v) for v in share.values())
    print(f"critical path: {total / replays:.1f} us a replay (first kernel's duration, then each end past the latest)")
    print(f"{'kernel':<60} {'calls':>6} {'us a replay':>12} {'us a call':>10}")
    for name, moved in sorted(share.items(), key=lambda kv: -sum(kv[1])):
        print(f"{name:<60} {len(moved) // replays:>6} {sum(moved) / replays:>12.1f} {sum(moved) / len(moved):>10.2f}")
    if by_place:
        print(f"{'kernel by its place in a layer':<60} {'calls':>6} {'us a replay':>12} {'us a call':>10} {'own us a call':>14}")
        for place, rows in sorted(by_place.items()):
            print(f"{place:<60} {len(rows) // replays:>6} {sum(m for m, _ in rows) / replays:>12.1f} "
                  f"{sum(m for m, _ in rows) / len(rows):>10.2f} {sum(d for _, d in rows) / len(rows):>14.2f}")


def print_device_gaps(prof: torch.profiler.profile, wall_ms: float, what: str) -> None:
    """Where a call's wall time went on the device: kernels busy (their union), idle between its first and last
    kernel, and outside them (host work before the first kernel and after the last one)."""
    spans = sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA)
    busy, end = 0.0, None
    for s, e in spans:
        if end is None or s >= end:
            busy += e - s
            end = e
        elif e > end:
            busy += e - end
            end = e
    span = (end - spans[0][0]) / 1e3
    print(f"{what}: wall {wall_ms:.1f} ms; device busy {busy / 1e3:.1f} ms, idle {span - busy / 1e3:.1f} ms between its "
          f"first and last kernel, {wall_ms - span:.1f} ms outside them (host before and after)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="qwen3-0.6b")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--steps", type=int, default=32)
    args = ap.parse_args()
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / args.shape, args.shape)
    page_size = 16
    num_pages = max(args.batch) * -(-(args.prompt + args.steps + 8) // page_size) + 64  # what the runs hold, no more (a 61 GB MoE shape leaves little)
    engine = Engine(str(path), device="cuda", load_format="dummy", page_size=page_size, num_pages=num_pages,
                    max_running_requests=max(args.batch))
    runner = engine.model_runner
    for batch in args.batch:
        ids = torch.randint(3, 500, (batch, args.prompt)).tolist()
        sp = {"max_new_tokens": args.steps, "temperature": 0, "ignore_eos": True}
        engine.generate(input_ids=ids, sampling_params=sp)
        engine.flush_cache()
        # time replay alone vs the whole step
        graphs = runner.cuda_graphs
        bs = graph_bucket(graphs.buckets, batch)
        replay_ms = decode_graph_replay_ms(engine, batch)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:  # the decode graph's kernels
            for _ in range(20):
                graphs.graphs[bs].replay()
            torch.cuda.synchronize()
        print(f"batch {batch}: 20 replays of the decode graph (bucket {bs}), kernels by device time", flush=True)
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60), flush=True)
        print_critical_path(prof, 20, len(runner.model.model.layers))
        t = time.perf_counter()
        engine.generate(input_ids=ids, sampling_params=sp)
        total = time.perf_counter() - t
        engine.flush_cache()
        print(f"batch {batch}: graph replay {replay_ms:.3f} ms; generate of {args.steps} tokens {total * 1e3:.1f} ms "
              f"= {total / args.steps * 1e3:.2f} ms/step incl. prefill", flush=True)
        # prefill alone: host time against the GPU's kernel time
        _, t_prefill = timed(lambda: engine.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=1)), True)
        engine.flush_cache()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            engine.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=1))
            wall_ms = (time.perf_counter() - t) * 1e3
        engine.flush_cache()
        print_device_gaps(prof, wall_ms, f"batch {batch}: prefill (profiled)")
        gpu_ms = sum(e.self_device_time_total for e in prof.key_averages()) / 1e3
        print(f"batch {batch}: prefill of {batch}x{args.prompt} tokens (generate, 1 new token) {t_prefill * 1e3:.1f} ms; "
              f"GPU kernel time {gpu_ms:.1f} ms (profiled run)", flush=True)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]) as prof:
            t = time.perf_counter()
            engine.generate(input_ids=ids, sampling_params=dict(sp, max_new_tokens=8))
            wall_ms = (time.perf_counter() - t) * 1e3
        engine.flush_cache()
        print_device_gaps(prof, wall_ms, f"batch {batch}: prefill and 7 decode steps (profiled)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60), flush=True)
    engine.shutdown()


if __name__ == "__main__":
    main()
