"""Weight-sync speed on every transport, each figure beside its hardware ceiling and a peer, in one run.

    python bench/weight_sync.py --shapes tiny                          # CPU smoke run
    python bench/weight_sync.py --shapes qwen3-0.6b,qwen3-8b --json $OUT/weight_sync.json

Per shape (bf16, random weights, `load_format="dummy"` engines):
- tensor: `update_weights_from_tensor` with the tensors already on the GPU, same process; the peer is a
  plain `param.copy_(src)` loop over the same tensors; ceiling: the D2D copy measured in this run.
  Also the cost of rollback protection (explicit session, `enable_rollback`) and the time from an update
  returning to the first token of a request (TTFT) beside the TTFT with no update before it.
- sources (`--sources`): a full second copy of the weights on the device, or, where that does not fit beside the
  engine's (Qwen3-30B-A3B on an 80 GB card; `auto` decides), views of one random buffer the size of the largest
  tensor: every byte is still read and written. The IPC section decides the same for its producer from what is
  free when it starts (the in-process sources are dropped before it): IPCWeightPusher's layout only, its tensors
  views of one buffer.
- ipc: a producer process (spawn) holds the tensors and sends plain-data CUDA IPC descriptors through a
  queue; the engine loads them; N updates; memory of both sides before and after. Layouts: one allocation
  per tensor, one flat buffer, and IPCWeightPusher's (512 MiB buckets, those of several tensors packed into one
  reused buffer, one call per bucket, one at a time as `calls_in_flight=1`: the engine time of all of a push's calls;
  calls in flight are measured by the pusher section, which runs the pusher itself through the same queue hand-off).
- pusher (not in the default sections): IPCWeightPusher in a trainer process pushing into the engine through a queue
  hand-off per call (as ipc's producer) and behind its HTTP server (`create_app`), whole pushes, `--pusher-in-flight`
  settings of `calls_in_flight` interleaved; on a CPU machine it runs too (shared memory):
  `OMP_NUM_THREADS=1 ... --shapes tiny --sections pusher --pusher-bucket-kib 1024,128` (without it the two processes'
  torch threads oversubscribe a small CPU).
- disk: random bf16 sharded safetensors written to a temp dir and read once (page cache); the reader's
  strategies, the engine's `update_weights_from_disk` end to end (with and without rollback), the
  previous per-tensor path and `safetensors.torch.load_file(device="cuda")`; ceiling: pinned H2D.
  For qwen3-8b the disk checkpoint keeps the 8B tensor shapes but only `--disk-8b-layers` layers.
- release: `release_memory_occupation` / `resume_memory_occupation` cycles, memory by the driver.
- distributed: over one GPU NCCL cannot pair two ranks on one device: a local gloo sender (CPU) into the
  engine on the GPU; ceiling: a raw gloo broadcast between two local ranks.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SHAPES, config_only_checkpoint, device_name, print_table  # noqa: E402

from hotswap import Engine, protocol  # noqa: E402
from hotswap.scheduler.weight_updater import WeightUpdater  # noqa: E402
from hotswap.weights import fast_copy, fast_reader  # noqa: E402
from hotswap.weights.fast_reader import ReaderOptions, load_plan  # noqa: E402
from hotswap.weights.ipc import CudaIpcMappings  # noqa: E402
from hotswap.weights.loader import plan_checkpoint  # noqa: E402
from hotswap.weights.sources import tensor as tensor_source  # noqa: E402
from hotswap.wire.buckets import iter_buckets  # noqa: E402
from hotswap.wire.ipc import shm_block_prefix  # noqa: E402

_ENGINE_REPLIES = WeightUpdater.replies_after_copies  # the pusher section's A/B patches and restores it

GB = 1e9
RESULTS: dict = {"tables": {}, "figures": {}}
JSON_PATH: list[str] = []
DEADLINE: list[float] = []  # wall-clock time after which long loops stop early (and say so)


def past_deadline() -> bool:
    return bool(DEADLINE) and time.time() > DEADLINE[0]


def save_json() -> None:
    if JSON_PATH:
        Path(JSON_PATH[0]).write_text(json.dumps(RESULTS, indent=1, default=str))


# ---- helpers --------------------------------------------------------------------------------------


def cuda() -> bool:
    return torch.cuda.is_available()


def sync() -> None:
    if cuda():
        torch.cuda.synchronize()


def median_time(fn, reps: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def used_bytes() -> int:
    """Device memory in use by the driver's count (all processes), not the allocator's."""
    if not cuda():
        return 0
    free, total = torch.cuda.mem_get_info()
    return total - free


def smi_used_mib() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
        return int(out[0])
    except Exception:
        return None


def free_all() -> None:
    gc.collect()
    if cuda():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def fmt_ms(s: float) -> str:
    return f"{s * 1e3:,.2f}"


def fmt_gbs(nbytes: float, s: float) -> str:
    return f"{nbytes / s / GB:,.1f}" if s > 0 else "-"


def pct(x: float, ceiling: float) -> str:
    return f"{100 * x / ceiling:.0f}%" if ceiling and ceiling == ceiling else "-"


def mib(n: int | float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def table(key: str, title: str, header: list[str], rows: list[list]) -> None:
    RESULTS["tables"][key] = {"title": title, "header": header, "rows": rows}
    print_table(title, header, [[str(c) for c in r] for r in rows])
    save_json()


def make_engine(path: Path, device: str, **kw) -> Engine:
    kw.setdefault("num_pages", 1024)
    kw.setdefault("cuda_graph_max_batch", 8)
    return Engine(str(path), device=device, load_format="dummy", **kw)


def hf_sources(engine, device, seed: int = 0, aliased: bool = False) -> list[tuple[str, torch.Tensor]]:
    """Random tensors with the engine's HF names and shapes (tied lm_head left out, as HF saves it).
    `aliased`: every tensor a view of one random buffer the size of the largest, for a shape whose full set does
    not fit beside the engine's weights (Qwen3-30B-A3B on an 80 GB card); a copy still reads and writes every byte."""
    wm = engine.model_runner.weight_map
    g = torch.Generator(device=device).manual_seed(seed)
    if aliased:  # one buffer per dtype
        largest: dict[torch.dtype, int] = {}
        for n in wm.names:
            slot = wm.slots[n]
            largest[slot.dtype] = max(largest.get(slot.dtype, 0), torch.Size(slot.hf_shape).numel())
        bufs = {dt: torch.empty(k, dtype=dt, device=device).normal_(0, 0.02, generator=g) for dt, k in largest.items()}
        return [(n, bufs[wm.slots[n].dtype][: torch.Size(wm.slots[n].hf_shape).numel()].view(wm.slots[n].hf_shape)) for n in wm.names]
    out = []
    for name in wm.names:
        slot = wm.slots[name]
        t = torch.empty(slot.hf_shape, dtype=slot.dtype, device=device)
        t.normal_(0, 0.02, generator=g)
        out.append((name, t))
    return out


def second_copy_fits(nbytes: int, sources_arg: str) -> bool:
    """Whether `nbytes` more (a second copy of the weights) fit in free device memory now, with 10 % to spare:
    `--sources full` forces yes, `aliased` no, `auto` asks the device."""
    if sources_arg != "auto":
        return sources_arg == "full"
    if not cuda():
        return True
    free_all()
    return torch.cuda.mem_get_info()[0] > 1.1 * nbytes


def nbytes_of(named) -> int:
    return sum(t.numel() * t.element_size() for _, t in named)


# ---- ceilings -------------------------------------------------------------------------------------


def measure_ceilings() -> dict:
    if not cuda():
        return {"d2d": float("nan"), "h2d_pinned": float("nan"), "h2d_pageable": float("nan"), "d2h_pinned": float("nan")}
    n = 2 << 30
    a = torch.empty(n, dtype=torch.uint8, device="cuda").random_()
    b = torch.empty_like(a)
    t = median_time(lambda: b.copy_(a), 10, 3)
    d2d = 2 * n / t
    a = b = None  # noqa: F841 - free before the next buffers
    m = 1 << 30
    dev = torch.empty(m, dtype=torch.uint8, device="cuda")
    pinned = torch.empty(m, dtype=torch.uint8, pin_memory=True).random_()
    pageable = torch.empty(m, dtype=torch.uint8).random_()
    h2d = m / median_time(lambda: dev.copy_(pinned, non_blocking=True), 10, 2)
    h2d_pg = m / median_time(lambda: dev.copy_(pageable), 5, 1)
    d2h = m / median_time(lambda: pinned.copy_(dev, non_blocking=True), 10, 2)
    dev = pinned = pageable = None  # noqa: F841
    free_all()
    c = {"d2d": d2d, "h2d_pinned": h2d, "h2d_pageable": h2d_pg, "d2h_pinned": d2h}
    table("ceilings", f"ceilings measured in this run, {device_name(torch.device('cuda'))}", ["copy", "GB/s", "how"], [
        ["device-to-device", f"{d2d / GB:,.0f}", "2 GiB copy_, bytes read + written"],
        ["host-to-device, pinned", f"{h2d / GB:,.1f}", "1 GiB"],
        ["host-to-device, pageable", f"{h2d_pg / GB:,.1f}", "1 GiB"],
        ["device-to-host, pinned", f"{d2h / GB:,.1f}", "1 GiB"],
    ])
    RESULTS["figures"]["ceilings_GBps"] = {k: v / GB for k, v in c.items()}
    return c


# ---- in-process tensors ---------------------------------------------------------------------------


def bench_tensor(shape: str, engine, sources, ceil: dict, reps: int) -> None:
    wm = engine.model_runner.weight_map
    total = nbytes_of(sources)
    pairs = [(wm.slots[n].dest, t) for n, t in sources]
    d2d = ceil["d2d"]

    def plain_loop():
        for d, s in pairs:
            d.copy_(s)

    wu = engine.scheduler.weight_updater
    matched = wu.tensor_plans.match(wm, sources)
    rows = []
    ideal = 2 * total / d2d if d2d == d2d else float("nan")

    def row(what, t, extra="0", note=""):
        bw = 2 * total / t
        rows.append([what, f"{total / GB:.2f}", fmt_ms(t), f"{bw / GB:,.0f}", f"{d2d / GB:,.0f}" if d2d == d2d else "-",
                     pct(bw, d2d), extra, note])
        return bw

    t_plain = median_time(plain_loop, reps, 2)
    row("peer: plain param.copy_(src) loop", t_plain, note=f"{len(pairs)} tensors")
    row(f"copy_into: one launch of the table-driven copy kernel (engine default: {fast_copy._CHUNK * 4 >> 10} KiB a program, "
        f"{fast_copy._WARPS} warps)", median_time(lambda: fast_copy.copy_into(matched), reps, 2))
    if cuda():
        default = (fast_copy._CHUNK, fast_copy._WARPS)
        for chunk, warps in ((4096, 4), (8192, 4), (16384, 8), (16384, 16), (32768, 16)):
            fast_copy._CHUNK, fast_copy._WARPS = chunk, warps
            matched.plan.multi = fast_copy.build_multi([t for _, t, _ in matched.items])
            row(f"copy_into: one launch, {chunk * 4 >> 10} KiB a program, {warps} warps", median_time(lambda: fast_copy.copy_into(matched), reps, 2))
        fast_copy._CHUNK, fast_copy._WARPS = default
        matched.plan.multi = fast_copy.build_multi([t for _, t, _ in matched.items])
    # host work of an engine call, timed here in the caller's thread: what runs before the first byte moves
    from hotswap.weights.ipc_grouped import resolve_grouped

    def host_checks():
        wu.tensor_plans.match(wm, resolve_grouped(sources, wu.ipc_mappings))

    t_checks = median_time(host_checks, reps, 2)
    t_round = median_time(lambda: engine.get_load(), reps, 2)
    RESULTS["figures"][f"{shape}.tensor.host"] = {"checks_ms": t_checks * 1e3, "scheduler_round_trip_ms": t_round * 1e3}
    print(f"[{shape}] host work of a call: resolve + match {t_checks * 1e3:.3f} ms; scheduler round trip (get_load) {t_round * 1e3:.3f} ms", flush=True)
    for label, small, streams in (
            (f"copy_into without it: < {fast_copy.SMALL_COPY_BYTES >> 20} MiB grouped, rest copy_ on {fast_copy.COPY_STREAMS} streams", None, None),
            ("copy_into: < 16 MiB grouped, rest copy_, 1 stream", 16 << 20, 1),
            ("copy_into: < 1 MiB grouped, rest copy_, 2 streams", 1 << 20, 2),
            ("copy_into: < 1 MiB grouped, rest copy_, 1 stream", 1 << 20, 1),
            ("copy_into: all grouped (one _foreach_copy_)", 1 << 62, 1),
            ("copy_into: all copy_, 1 stream", 0, 1)):
        row(label, median_time(lambda: fast_copy.copy_into(matched, small, streams, one_launch=False), reps, 2))
    inner = []

    def engine_update():
        res = engine.update_weights_from_tensor(sources)
        assert res.success, res.message
        inner.append((res.extra.validate_s or 0.0, res.elapsed_s))

    t_eng = median_time(engine_update, reps, 2)
    v, e = statistics.median(x for x, _ in inner), statistics.median(y for _, y in inner)
    bw = row("update_weights_from_tensor (engine call: queue, checks, copies, sync, flush)", t_eng,
             note=f"in the handler: validate {v * 1e3:.2f} ms, copy+sync {e * 1e3:.2f} ms")
    RESULTS["figures"][f"{shape}.tensor"] = {"GB": total / GB, "ms": t_eng * 1e3, "GBps_rw": bw / GB, "pct_d2d": 100 * bw / d2d if d2d == d2d else None,
                                             "plain_loop_ms": t_plain * 1e3, "ideal_ms": ideal * 1e3, "validate_ms": v * 1e3,
                                             "copy_sync_ms": e * 1e3, "tensors": len(pairs)}
    # rollback protection: an explicit session takes copies of what it overwrites
    sessions = engine.scheduler.sessions  # the session machine reads these (the config's fields only seed them)
    saved = (sessions.enable_rollback, sessions.device_budget_bytes, sessions.lend_scratch)

    def session_update(capture: dict | None = None):
        assert engine.begin_weight_update().success
        res = engine.update_weights_from_tensor(sources)
        assert res.success, res.message
        if capture is not None:
            s = wu.sessions.session
            capture["dev"], capture["host"] = s.rollback.extra_bytes
            capture["kv"] = s.rollback.scratch_bytes
            capture["arena"] = engine.scheduler.sessions.arena.nbytes
        assert engine.end_weight_update().success

    no_lending = lambda: None  # noqa: E731 - the session machine's hook, turned off
    cases = [("session, enable_rollback=False", "off", False, saved[1], saved[2]),
             ("session, rollback (engine default: originals in the idle KV pool's bytes, then the device budget, then pinned host)",
              "on.kv", True, saved[1], saved[2]),
             (f"session, rollback, KV pool not lent (device budget {mib(saved[1])}, rest pinned host)", "on", True, saved[1], no_lending),
             ("session, rollback all on device (budget = model)", "on.device", True, 2 * total, no_lending)]
    for label, key, on, budget, lend in cases:
        sessions.enable_rollback, sessions.device_budget_bytes, sessions.lend_scratch = on, budget, lend
        if on and budget > saved[1] and cuda() and torch.cuda.mem_get_info()[0] < total * 1.2:
            continue
        cap: dict = {}
        session_update(cap)  # warm (pins the host arena once)
        t = median_time(lambda: session_update(cap), max(3, reps // 4), 1)
        extra = f"KV pool {mib(cap.get('kv', 0))} (lent) + dev {mib(cap.get('dev', 0))} + host {mib(cap.get('host', 0))}" if on else "0"
        row(label, t, extra)
        RESULTS["figures"][f"{shape}.rollback.{key}"] = {
            "ms": t * 1e3, "kv_pool_bytes": cap.get("kv", 0), "device_bytes": cap.get("dev", 0), "host_bytes": cap.get("host", 0),
            "arena_bytes": cap.get("arena", 0)}
    sessions.enable_rollback, sessions.device_budget_bytes, sessions.lend_scratch = saved
    table(f"{shape}.tensor", f"{shape}: update_weights_from_tensor, in process, tensors on the GPU ({len(pairs)} tensors)",
          ["path", "GB", "time ms", "GB/s (r+w)", "ceiling D2D GB/s", "% of ceiling", "extra memory", "note"], rows)


def bench_ttft(shape: str, engine, sources, reps: int) -> None:
    prompt = list(range(3, 19))
    sp = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}

    def ttft():
        t = time.perf_counter()
        out = engine.generate(input_ids=prompt, sampling_params=sp)
        return time.perf_counter() - t, out

    for _ in range(3):
        ttft()
    base_times = []
    for _ in range(reps):
        engine.flush_cache()  # same state as after an update: nothing cached
        base_times.append(ttft()[0])
    base = statistics.median(base_times)
    after = []
    for i in range(reps):
        res = engine.update_weights_from_tensor(sources, weight_version=f"ttft-{i}")
        assert res.success, res.message
        t, out = ttft()
        assert out["meta_info"]["weight_version"] == f"ttft-{i}"
        after.append(t)
    a = statistics.median(after)
    RESULTS["figures"][f"{shape}.ttft"] = {"after_update_ms": a * 1e3, "no_update_ms": base * 1e3}
    table(f"{shape}.ttft", f"{shape}: first token after an update (16-token prompt, 1 new token, median of {reps})",
          ["case", "time ms", "note"],
          [["update returns -> first token with the new weights", fmt_ms(a), "weight_version checked on the output"],
           ["same request, no update before it (peer)", fmt_ms(base), "prefix cache flushed before each, as an update does"]])


# ---- CUDA IPC from another process ---------------------------------------------------------------


def _producer(specs, layout: str, updates: int, q_out, q_in, bucket_bytes: int, aliased: bool) -> None:
    """layout "separate": one allocation per tensor; "flat": all in one buffer; "buckets": what
    IPCWeightPusher sends, buckets of `bucket_bytes`, those of several tensors packed one by one into one reused
    buffer, those of one tensor sent as they are (one message per bucket, the engine's reply before the next is
    packed). `aliased` (buckets only): the trainer's tensors are views of one buffer the size of the largest, as a
    sharded trainer gathers each bucket's tensors just before sending them; the packed buffer is distinct memory."""
    import torch

    from hotswap.wire.buckets import iter_buckets
    from hotswap.wire.ipc import cuda_ipc_descriptor

    torch.cuda.set_device(0)
    total = sum(torch.Size(s).numel() for _, s, _ in specs) * 2
    if layout == "flat":
        buf = torch.empty(total // 2, dtype=torch.bfloat16, device="cuda")
        off, tensors = 0, []
        for name, shape, _ in specs:
            n = torch.Size(shape).numel()
            tensors.append((name, buf[off : off + n].view(shape)))
            off += n
    elif aliased:
        buf = torch.empty(max(torch.Size(s).numel() for _, s, _ in specs), dtype=torch.bfloat16, device="cuda").normal_(0, 0.02)
        tensors = [(name, buf[: torch.Size(shape).numel()].view(shape)) for name, shape, _ in specs]
    else:
        tensors = [(name, torch.empty(shape, dtype=torch.bfloat16, device="cuda")) for name, shape, _ in specs]
    if not aliased:
        for _, t in tensors:
            t.normal_(0, 0.02)
    buckets = list(iter_buckets(tensors, bucket_bytes)) if layout == "buckets" else [tensors]
    # as IPCWeightPusher._gpu_tensors packs a trainer's own tensors: a bucket of several into the reused buffer, a bucket
    # of one (50 of the 30B-A3B's 99 at 512 MiB: its 805 MB gate_up tensors) sent as it is, with no copy on the trainer's side
    packed = [len(b) > 1 for b in buckets] if layout == "buckets" else [False] * len(buckets)
    pack = (torch.empty(max(sum(t.numel() for _, t in b) for b, p in zip(buckets, packed) if p), dtype=torch.bfloat16, device="cuda")
            if any(packed) else None)
    torch.cuda.synchronize()
    mem0 = (torch.cuda.memory_allocated(), torch.cuda.memory_reserved())
    q_out.put({"ready": True, "allocated": mem0[0], "reserved": mem0[1], "buckets": len(buckets)})
    t0 = time.perf_counter()
    for i in range(updates):
        for bucket, packs in zip(buckets, packed):
            sent = bucket
            if packs:
                off, sent = 0, []
                for name, t in bucket:
                    view = pack[off : off + t.numel()].view(t.shape)
                    view.copy_(t)
                    sent.append((name, view))
                    off += t.numel()
                torch.cuda.synchronize()
            descs = [cuda_ipc_descriptor(n, t) for n, t in sent]
            t0 = time.perf_counter()
            q_out.put({"descs": descs, "i": i})
            reply = q_in.get()
            if not reply.get("ok"):
                break
            del descs
        if i % 10 == 9:
            torch.cuda.ipc_collect()
    torch.cuda.synchronize()
    torch.cuda.ipc_collect()
    q_out.put({"done": True, "allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(), "last_rtt": time.perf_counter() - t0})
    q_in.get()


def _get_alive(q, proc, timeout: float = 300):
    """q.get that notices a dead peer process at once instead of waiting out the timeout."""
    import queue

    deadline = time.time() + timeout
    while True:
        try:
            return q.get(timeout=1.0)
        except queue.Empty:
            if not proc.is_alive():
                raise RuntimeError(f"the peer process died (exit code {proc.exitcode})") from None
            if time.time() > deadline:
                raise TimeoutError("no message from the peer process") from None


def profile_ipc_call(engine, descs: list, nbytes: int, d2d: float, what: str, reps: int = 20) -> None:
    """One IPC call repeated under torch.profiler: its kernels' device time against its bytes at D2D, and the host
    calls around them, so a call's time splits into the copy on the device and what waits for it."""
    from torch.profiler import ProfilerActivity, profile

    engine.update_weights_from_tensor(descs, flush_cache=False)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t = time.perf_counter()
        for _ in range(reps):
            engine.update_weights_from_tensor(descs, flush_cache=False)
        wall = (time.perf_counter() - t) / reps
    print(f"### profile of one IPC call ({what}; the largest bucket, {nbytes / GB:.3f} GB, {reps} calls): "
          f"{wall * 1e3:.3f} ms a call; its bytes at D2D {2 * nbytes / d2d * 1e3:.3f} ms", flush=True)
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60), flush=True)
    # the same call taken apart: the scheduler thread's round trip, the handler run on this thread (the engine is
    # idle: nothing else touches the weights), the copy and its synchronisation alone
    wu = engine.scheduler.weight_updater
    req = protocol.UpdateWeightsFromTensorRequest(named_tensors=descs, flush_cache=False)

    def resolve():  # what the handler does before its first copy
        return tensor_source.match_tensors(req, wu.model_runner.weight_map, wu.ipc_mappings, wu.tensor_plans,
                                           shm_prefix=shm_block_prefix(wu.config.ipc_token))

    matched = resolve()

    def copy_sync():
        fast_copy.copy_into(matched)
        torch.cuda.synchronize()

    parts = [("scheduler round trip (get_load)", lambda: engine.get_load()),
             ("the handler on this thread (resolve, match, session, copy, sync, commit)", lambda: wu.update_weights_from_tensor(req)),
             ("resolve + match", resolve),
             ("copy_into + synchronize", copy_sync),
             ("synchronize alone", torch.cuda.synchronize)]
    for label, fn in parts:
        print(f"  {label}: {median_time(fn, reps, 3) * 1e3:.3f} ms", flush=True)
    # where the hand-off's time goes: the scheduler thread's receipt and reply, stamped beside the caller's
    sched, stamps = engine.scheduler, []
    handle = sched._handle

    def stamped(request, fut):
        stamps.append([time.perf_counter()])
        handle(request, fut)
        stamps[-1].append(time.perf_counter())

    sched._handle = stamped
    try:
        ends = []
        for _ in range(reps):
            t0 = time.perf_counter()
            engine.update_weights_from_tensor(descs, flush_cache=False)
            ends.append((t0, time.perf_counter()))
    finally:
        sched._handle = handle
    wake = statistics.median(s[0] - t0 for s, (t0, _) in zip(stamps, ends)) * 1e3
    run = statistics.median(s[1] - s[0] for s in stamps) * 1e3
    back = statistics.median(t1 - s[1] for s, (_, t1) in zip(stamps, ends)) * 1e3
    print(f"  a call from this thread: submit -> the scheduler takes it {wake:.3f} ms, handler {run:.3f} ms, reply -> this thread "
          f"has it {back:.3f} ms", flush=True)


def bench_ipc(shape: str, engine, ceil: dict, updates: int, sources_arg: str, bucket_mib: list[int]) -> None:
    """Where a producer holding a full copy does not fit in what is free now beside the engine (`--sources aliased`
    forces it), only IPCWeightPusher's layout runs, its trainer tensors views of one buffer (`_producer`). The
    bucket layout runs once per size in `bucket_mib`; each row says where a call's time goes (the handler's
    resolve + match, its copy + sync, and the rest: the queue to the scheduler thread and back, the commit)."""
    import torch.multiprocessing as mp

    wm = engine.model_runner.weight_map
    specs = [(n, tuple(wm.slots[n].hf_shape), "bf16") for n in wm.names]
    total = sum(torch.Size(s).numel() for _, s, _ in specs) * 2
    aliased = not second_copy_fits(total, sources_arg)
    if aliased:
        print(f"[{shape}] IPC: a producer holding a full copy does not fit ({mib(torch.cuda.mem_get_info()[0])} free): "
              "IPCWeightPusher's layout only, its trainer tensors views of one buffer", flush=True)
    ctx = mp.get_context("spawn")
    rows = []
    d2d = ceil["d2d"]
    wu = engine.scheduler.weight_updater
    runs = [("buckets", mb << 20) for mb in bucket_mib]
    for layout, bucket_bytes in runs if aliased else [("separate", 0), ("flat", 0), *runs]:
        q_out, q_in = ctx.Queue(), ctx.Queue()
        wu.ipc_mappings = CudaIpcMappings(wu.config.cuda_ipc_cache_bytes)  # unmap the last producer's memory (it exited)
        free_all()  # memory this process cached must not crowd the producer out
        proc = ctx.Process(target=_producer, args=(specs, layout, updates, q_out, q_in, bucket_bytes, aliased), daemon=True)
        proc.start()
        ready = _get_alive(q_out, proc)
        nb = ready["buckets"]
        used0 = used_bytes()
        cons0 = torch.cuda.memory_allocated()
        times = []  # engine time of each update (all its buckets' calls)
        largest = (0, None)  # the biggest bucket's descriptors: profiled again after the updates
        calls = []  # per call after the first update: (engine call, handler's resolve + match, handler's copy + sync) seconds
        used_after_first = None
        for i in range(updates):
            spent = 0.0
            for b in range(nb):
                msg = _get_alive(q_out, proc)
                t = time.perf_counter()
                res = engine.update_weights_from_tensor(msg["descs"], flush_cache=b == nb - 1)
                dt = time.perf_counter() - t
                spent += dt
                if i:
                    calls.append((dt, res.extra.validate_s or 0.0, res.elapsed_s))
                if i == updates - 1 and res.num_bytes > largest[0]:
                    largest = (res.num_bytes, msg["descs"])
                ok = res.success
                del msg
                q_in.put({"ok": ok})
                assert ok, res.message
            times.append(spent)
            if i == 0:
                used_after_first = used_bytes()
        done = _get_alive(q_out, proc)
        if layout == "buckets" and largest[1] is not None:  # the producer's buffer lives until "bye"
            profile_ipc_call(engine, largest[1], largest[0], d2d, f"{shape}, {mib(bucket_bytes)} buckets")
            one_launch = fast_copy._copy_multi
            fast_copy._copy_multi = lambda multi, matched: False  # the same call with copy_ per tensor instead
            try:
                profile_ipc_call(engine, largest[1], largest[0], d2d, f"{shape}, {mib(bucket_bytes)} buckets, copy_ per tensor")
            finally:
                fast_copy._copy_multi = one_launch
        largest = (0, None)
        gc.collect()
        used1 = used_bytes()
        cons1 = torch.cuda.memory_allocated()
        q_in.put({"bye": True})
        proc.join(timeout=60)
        t_med = statistics.median(times[1:] if len(times) > 1 else times)
        bw = 2 * total / t_med
        per_call = [statistics.median(c[k] for c in calls) * 1e3 for k in range(3)] if calls else [float("nan")] * 3
        copy_ideal = 2 * total / nb / d2d * 1e3 if d2d == d2d else float("nan")
        label = {"flat": "one flat buffer (1 handle)", "separate": f"separate allocations ({len(specs)} handles)",
                 "buckets": f"IPCWeightPusher's layout: {nb} bucket(s) of <= {mib(bucket_bytes)} (those of several tensors packed "
                            "into one reused buffer), one call each"
                            + (" (the trainer's tensors views of one buffer: a full copy does not fit)" if aliased else "")}[layout]
        rows.append([f"IPC, {label}", f"{total / GB:.2f}", fmt_ms(t_med), f"{bw / GB:,.0f}", f"{d2d / GB:,.0f}" if d2d == d2d else "-",
                     pct(bw, d2d), "0 (maps the producer's memory)",
                     f"{nb} calls, median {per_call[0]:.3f} ms: resolve + match {per_call[1]:.3f}, copy + sync {per_call[2]:.3f} "
                     f"(its bytes at D2D {copy_ideal:.3f}), queue + commit {per_call[0] - per_call[1] - per_call[2]:.3f}",
                     f"device used {mib(used0)} -> {mib(used_after_first)} (1st) -> {mib(used1)} ({updates}th); "
                     f"producer allocated {mib(ready['allocated'])} -> {mib(done['allocated'])}; consumer allocated {mib(cons0)} -> {mib(cons1)}"])
        key = layout if bucket_bytes in (0, 512 << 20) else f"{layout}{bucket_bytes >> 20}"
        RESULTS["figures"][f"{shape}.ipc.{key}"] = {
            "ms": t_med * 1e3, "GBps_rw": bw / GB, "pct_d2d": 100 * bw / d2d if d2d == d2d else None, "updates": updates, "calls_per_update": nb,
            "producer_tensors_aliased": aliased,
            "first_ms": times[0] * 1e3, "max_ms": max(times) * 1e3, "bucket_bytes": bucket_bytes,
            "call_ms": per_call[0], "call_resolve_match_ms": per_call[1], "call_copy_sync_ms": per_call[2], "call_copy_at_d2d_ms": copy_ideal,
            "device_used_before": used0, "device_used_after_first": used_after_first, "device_used_after_all": used1,
            "producer_allocated": [ready["allocated"], done["allocated"]], "producer_reserved": [ready["reserved"], done["reserved"]],
            "consumer_allocated": [cons0, cons1]}
    table(f"{shape}.ipc", f"{shape}: update_weights_from_tensor from another process over CUDA IPC ({updates} updates, median; engine time)",
          ["path", "GB", "time ms", "GB/s (r+w)", "ceiling D2D GB/s", "% of ceiling", "extra memory", "a call", f"memory over {updates} updates"], rows)


# ---- IPCWeightPusher end to end, over HTTP ------------------------------------------------------------


class QueueEngine:
    """The trainer's handle on the bench's engine through two queues, as `_producer` hands descriptors over but for
    any method (`_serve_queue` runs them): each call waits for its own reply, so calls from several threads are in
    flight together, and a call costs a queue hand-off each way instead of an HTTP request."""

    def __init__(self, q_req, q_resp):
        import itertools
        import threading

        self.q_req, self.q_resp, self.ids, self.lock, self.waiting = q_req, q_resp, itertools.count(), threading.Lock(), {}
        threading.Thread(target=self._replies, daemon=True).start()

    def _replies(self) -> None:
        while True:
            i, out = self.q_resp.get()
            with self.lock:
                self.waiting.pop(i).set_result(out)

    def __getattr__(self, method: str):
        from concurrent.futures import Future

        def call(*args, **kwargs):
            fut: Future = Future()
            with self.lock:
                i = next(self.ids)
                self.waiting[i] = fut
            self.q_req.put((i, method, args, kwargs))
            return fut.result(timeout=600)

        return call


def _serve_queue(engine, q_req, q_resp) -> None:
    """The engine side of `QueueEngine`: each call on a thread of its own (as the pusher calls an in-process engine),
    its reply as plain data; None ends."""
    import threading

    def run(i: int, method: str, args, kwargs) -> None:
        try:
            out = getattr(engine, method)(*args, **kwargs)
            q_resp.put((i, out.to_dict() if hasattr(out, "to_dict") else out))
        except Exception as exc:
            q_resp.put((i, {"success": False, "message": f"{type(exc).__name__}: {exc}"}))

    while (item := q_req.get()) is not None:
        threading.Thread(target=run, args=item, daemon=True).start()


def _pusher_trainer(url: str | None, queues, specs, dtype, device: str, aliased: bool, bucket_bytes: int, in_flight: list[int], reps: int,
                    sessions: bool, q_out) -> None:
    """A trainer process: IPCWeightPusher into the bench's engine over HTTP (`url`) or `queues` (shared memory on
    CPU, CUDA IPC on a GPU), `reps` pushes per `calls_in_flight` setting, the settings interleaved; each push's
    elapsed and transfer (buckets only) seconds. `aliased`: the tensors are views of one buffer the size of the largest, so
    every bucket shares one storage and the pusher sends it as it is (no packing: the pack-buffer ring is not timed then)."""
    try:
        import torch

        from hotswap.trainer import HttpEngineClient, IPCWeightPusher

        if device == "cuda":
            torch.cuda.set_device(0)
        if aliased:
            buf = torch.empty(max(torch.Size(s).numel() for _, s in specs), dtype=dtype, device=device).normal_(0, 0.02)
            weights = [(name, buf[: torch.Size(shape).numel()].view(shape)) for name, shape in specs]
        else:
            weights = [(name, torch.empty(shape, dtype=dtype, device=device).normal_(0, 0.02)) for name, shape in specs]
        handle = HttpEngineClient(url, timeout_s=600) if url else QueueEngine(*queues)
        pushers = {n: IPCWeightPusher(handle, bucket_bytes=bucket_bytes, calls_in_flight=n, use_sessions=sessions) for n in in_flight}
        times: dict[int, list[tuple[float, float]]] = {n: [] for n in in_flight}
        for r in range(reps):
            for n in in_flight:  # interleaved: a drift in the machine's speed hits every setting alike
                res = pushers[n].push(weights, weight_version=f"pusher-{n}-{r}")
                times[n].append((res.elapsed_s, res.transfer_s))
        q_out.put({"times": times, "buckets": res.num_buckets, "bytes": res.num_bytes})
    except BaseException as exc:
        q_out.put({"error": f"{type(exc).__name__}: {exc}"})


def _http_server(engine, shape: str):
    """The engine behind its HTTP app (imported here: a queue-only run needs no FastAPI)."""
    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    return ServerThread(create_app(engine, served_model_name=shape))


def bench_pusher(shape: str, engine, ceil: dict, in_flight: list[int], bucket_kib: list[int], reps: int, sources_arg: str,
                 transports: list[str], sessions: bool, replies: list[str]) -> None:
    """IPCWeightPusher from a trainer process into this engine, as a trainer on the same host drives it: behind the
    engine's HTTP server ("http") or through a queue hand-off per call ("queue": `_producer`'s transport, the cost
    of a call nearer an in-process one). Whole pushes (begin, buckets, commit) with `calls_in_flight` of each
    setting, interleaved; the first push of each is left out (it maps the buffers). Each row: median, min and max, and
    the median's bytes read + written against the D2D copy rate measured in this run (on a GPU).
    `sessions` False: every call commits on its own, as the ipc section's calls (inside a session the engine
    also saves each original it overwrites, which on a large model outweighs the calls' fixed costs). `replies`:
    "after-copies" (the engine's way: scheduler/copy_replies.py) and/or "synchronised" (each call synchronises the
    device before replying, as before the thirty-third session; the A/B of it, one setting after the other)."""
    import torch.multiprocessing as mp

    wm = engine.model_runner.weight_map
    dtype = next(engine.model_runner.model.parameters()).dtype
    specs = [(n, tuple(wm.slots[n].hf_shape)) for n in wm.names]
    total = sum(torch.Size(s).numel() for _, s in specs) * dtype.itemsize
    device = "cuda" if cuda() else "cpu"
    aliased = cuda() and not second_copy_fits(total, sources_arg)
    ctx = mp.get_context("spawn")
    rows = []
    with _http_server(engine, shape) if "http" in transports else contextlib.nullcontext() as srv, _replies_restored(engine):
        for reply, transport, kib in [(r, t, k) for r in replies for t in transports for k in bucket_kib]:
            _set_replies(engine, reply)
            q, queues = ctx.Queue(), (ctx.Queue(), ctx.Queue())
            server = threading.Thread(target=_serve_queue, args=(engine, *queues), daemon=True)
            server.start()
            proc = ctx.Process(target=_pusher_trainer, args=(srv.url if transport == "http" else None, queues, specs, dtype, device, aliased,
                                                             kib << 10, in_flight, reps, sessions, q), daemon=True)
            proc.start()
            try:
                out = _get_alive(q, proc, timeout=3600)
            finally:
                queues[0].put(None)
            proc.join(timeout=60)
            if "error" in out:
                raise RuntimeError(f"the trainer process failed: {out['error']}")
            base = None
            for n in in_flight:
                pushes = out["times"][n][1:] or out["times"][n]
                elapsed, transfer = [p[0] for p in pushes], [p[1] for p in pushes]
                med = statistics.median(elapsed)
                base = base or med
                label = f"{transport}, {kib} KiB buckets ({out['buckets']} calls), {n} in flight" + (f", replies {reply}" if len(replies) > 1 else "")
                rows.append([label, f"{out['bytes'] / GB:.4f}",
                             f"{med * 1e3:.2f} ({min(elapsed) * 1e3:.2f}-{max(elapsed) * 1e3:.2f})",
                             f"{statistics.median(transfer) * 1e3:.2f} ({min(transfer) * 1e3:.2f}-{max(transfer) * 1e3:.2f})",
                             f"{2 * out['bytes'] / med / GB:,.3f}", f"{ceil['d2d'] / GB:,.0f}" if ceil["d2d"] == ceil["d2d"] else "-",
                             pct(2 * out["bytes"] / med, ceil["d2d"]), f"{base / med:.2f}x", len(pushes)])
                RESULTS["figures"][f"{shape}.pusher.{transport}.{kib}k.in_flight{n}.{reply}"] = {
                    "bucket_bytes": kib << 10, "calls": out["buckets"], "bytes": out["bytes"], "pushes": len(pushes), "aliased": aliased,
                    "sessions": sessions,
                    "elapsed_ms": [p * 1e3 for p in elapsed], "transfer_ms": [p * 1e3 for p in transfer]}
    table(f"{shape}.pusher", f"{shape}: IPCWeightPusher from another process ({device}: "
          f"{'CUDA IPC' if device == 'cuda' else 'shared memory'}; {'sessions' if sessions else 'no sessions'}; settings interleaved, "
          "first push left out)",
          ["buckets", "GB", "push ms: median (min-max)", "buckets only ms", "GB/s (r+w)", "ceiling D2D GB/s", "% of ceiling",
           "speed vs the first setting", "pushes"], rows)


@contextlib.contextmanager
def _replies_restored(engine):
    """The engine's own replies again after the pusher section, whatever ended it."""
    try:
        yield
    finally:
        _set_replies(engine, "after-copies")


def _set_replies(engine, how: str) -> None:
    """The engine's tensor updates reply after their copies (its way) or after a synchronisation (the bench's A/B; the
    updater is a slots dataclass, so its class is patched, and put back)."""
    cls = type(engine.scheduler.weight_updater)
    if how == "synchronised":
        cls.replies_after_copies = lambda self: False
    elif how == "after-copies":
        cls.replies_after_copies = _ENGINE_REPLIES
    else:
        raise ValueError(f"--pusher-replies: {how!r} is neither after-copies nor synchronised")


# ---- disk --------------------------------------------------------------------------------------------


def write_safetensors_shards(folder: Path, named: list[tuple[str, torch.Tensor]], shard_bytes: int) -> list[Path]:
    """Sharded HF safetensors from device tensors, written through a pinned buffer (fast, no CPU copy)."""
    shards = list(iter_buckets(named, shard_bytes))
    files, weight_map = [], {}
    dt = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
    pinned = torch.empty(64 << 20, dtype=torch.uint8, pin_memory=cuda())
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        header, off = {"__metadata__": {"format": "pt"}}, 0
        for n, t in shard:
            nb = t.numel() * t.element_size()
            header[n] = {"dtype": dt[t.dtype], "shape": list(t.shape), "data_offsets": [off, off + nb]}
            off += nb
            weight_map[n] = fname
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        with open(folder / fname, "wb") as f:
            f.write(struct.pack("<Q", len(hb)) + hb)
            for _, t in shard:
                flat = t.reshape(-1).view(torch.uint8)
                for a in range(0, flat.numel(), pinned.numel()):
                    m = min(pinned.numel(), flat.numel() - a)
                    pinned[:m].copy_(flat[a : a + m])
                    f.write(memoryview(pinned[:m].numpy()))
        files.append(folder / fname)
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": nbytes_of(named)}, "weight_map": weight_map}))
    return files


def warm_page_cache(files: list[Path]) -> float:
    t = time.perf_counter()
    buf = bytearray(64 << 20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(buf):
                pass
    return time.perf_counter() - t


def bench_disk(shape: str, device: str, ceil: dict, layers: int | None, reps: int, grid: bool) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="hotswap-disk-"))
    path = config_only_checkpoint(tmp / "ckpt", shape, "bfloat16" if cuda() else "float32")
    if layers is not None:
        cfg = json.loads((path / "config.json").read_text())
        cfg["num_hidden_layers"] = layers
        (path / "config.json").write_text(json.dumps(cfg, indent=2))
    engine = make_engine(path, device)
    try:
        sources = hf_sources(engine, device, seed=1)
        total = nbytes_of(sources)
        t = time.perf_counter()
        files = write_safetensors_shards(path, sources, shard_bytes=2 << 30 if cuda() else 64 << 10)
        t_write = time.perf_counter() - t
        expect = {n: float(t.float().sum()) for n, t in sources[:3]}
        del sources
        free_all()
        t_warm = warm_page_cache(files)
        warm_page_cache(files)
        wm = engine.model_runner.weight_map
        plan = plan_checkpoint(wm, path)
        h2d = ceil["h2d_pinned"]
        rows = []

        def row(what, t, extra, note=""):
            bw = total / t
            rows.append([what, f"{total / GB:.2f}", fmt_ms(t), fmt_gbs(total, t), f"{h2d / GB:.1f}" if h2d == h2d else "-", pct(bw, h2d), extra, note])
            return bw

        # peers: safetensors' own load_file onto the device, and hotswap's previous per-tensor path
        def naive():
            from safetensors.torch import load_file

            for f in files:
                d = load_file(str(f), device=device)
                del d

        row("peer: safetensors.torch.load_file(device=cuda), per shard", median_time(naive, max(2, reps // 2), 1), "one shard on device")

        def previous():
            from safetensors import safe_open

            by_file: dict = {}
            for info, slot in plan:
                by_file.setdefault(str(info.file), []).append((info.name, slot))
            for path, named in by_file.items():
                with safe_open(path, framework="pt") as f:
                    for name, slot in named:
                        slot.load(f.get_tensor(name))

        row("peer: previous hotswap path (safe_open + copy per tensor)", median_time(previous, max(2, reps // 2), 1), "one tensor")
        # (strategy, threads, staging, register threads, populate page tables before registering)
        configs = [("hybrid", 16, 512 << 20, 2, True), ("pinned", 16, 512 << 20, None, True)]
        if grid and cuda():
            configs = [("pinned", 8, 256 << 20, None, True), ("pinned", 16, 512 << 20, None, True), ("pinned", 16, 1 << 30, None, True),
                       ("register", 4, 1 << 30, None, False), ("register", 4, 1 << 30, None, True),
                       ("hybrid", 16, 512 << 20, 1, True), ("hybrid", 16, 512 << 20, 2, True), ("hybrid", 16, 512 << 20, 4, True),
                       ("hybrid", 16, 1 << 30, 2, True), ("hybrid", 12, 512 << 20, 2, True)]
        if not cuda():
            configs = [("plain", 2, 1 << 20, None, True), ("plain", 8, 1 << 20, None, True)]
        best = None
        for strategy, threads, staging, reg, populate in configs:
            fast_reader.POPULATE = populate
            opts = ReaderOptions(threads=threads, staging_bytes=staging, strategy=strategy, register_threads=reg)
            stats_box = {}

            def load():
                stats_box["s"] = load_plan(plan, opts)

            t = median_time(load, reps, 1)
            st = stats_box["s"]
            extra = f"staging {mib(st.staging_bytes)} pinned" if st.staging_bytes else "none"
            if st.registered_bytes:
                extra += f", page cache registered {mib(st.registered_bytes)} at peak"
            note = f"fell back: {st.fell_back}" if st.fell_back else ""
            what = f"fast_reader {st.strategy}, {threads} threads" + (f" ({reg} registering)" if strategy == "hybrid" else "")
            what += f", staging {mib(staging)}" + ("" if populate or strategy == "pinned" else ", no MADV_POPULATE_READ")
            bw = row(what, t, extra, note)
            RESULTS["figures"][f"{shape}.disk.{strategy}.{threads}.{reg}.{staging >> 20}.{int(populate)}"] = {"ms": t * 1e3, "GBps": bw / GB}
            if best is None or bw > best[0]:
                best = (bw, strategy, threads, staging, reg, populate)
        fast_reader.POPULATE = True
        # the engine end to end (validation, rollback saves overlapped with the load, sync, flush)
        cfg = engine.config
        if best is not None:  # the engine takes the best reader settings of this run (config fields; register threads: threads // 8)
            cfg.weight_load_strategy, cfg.weight_load_threads, cfg.weight_load_staging_bytes = best[1], best[2], best[3]
            if best[1] == "hybrid" and best[4] != max(1, best[2] // 8):
                cfg.weight_load_strategy = "pinned" if best[4] == 0 else "hybrid"
                fast_reader.DEFAULT_REGISTER_THREADS = best[4]
            fast_reader.POPULATE = best[5]
        wu = engine.scheduler.weight_updater
        sessions = engine.scheduler.sessions
        for on in (False, True):
            sessions.enable_rollback = on

            def upd():
                res = engine.update_weights_from_disk(str(path))
                assert res.success, res.message

            upd()
            t = median_time(upd, reps, 0)
            arena = engine.scheduler.sessions.arena.nbytes if on else 0
            dev = min(total, sessions.device_budget_bytes) if on else 0
            st = wu.last_read
            extra = (f"staging {mib(st.staging_bytes)}" if st.staging_bytes else "no staging") + (
                f" + rollback dev {mib(dev)} + host arena {mib(arena)}" if on else "")
            bw = row(f"update_weights_from_disk, engine ({cfg.weight_load_strategy}, {cfg.weight_load_threads} thr), "
                     f"rollback {'on (default)' if on else 'off'}", t, extra)
            RESULTS["figures"][f"{shape}.disk.engine.rollback_{'on' if on else 'off'}"] = {
                "ms": t * 1e3, "GBps": bw / GB, "pct_h2d": 100 * bw / h2d if h2d == h2d else None, "arena_bytes": arena,
                "device_rollback_bytes": dev, "strategy": cfg.weight_load_strategy, "threads": cfg.weight_load_threads}
        sessions.enable_rollback = True
        got = {n: float(wm.slots[n].dest.float().sum()) for n in expect}
        assert got == expect, (got, expect)
        files_note = f"{len(files)} shards, {total / GB:.2f} GB" + (f", {layers} of the model's layers" if layers else "")
        RESULTS["figures"][f"{shape}.disk.setup"] = {"write_s": t_write, "first_read_s": t_warm, "files": len(files), "GB": total / GB, "layers": layers}
        table(f"{shape}.disk", f"{shape}: update_weights_from_disk, sharded bf16 safetensors in the page cache ({files_note})",
              ["path", "GB", "time ms", "GB/s", "ceiling pinned H2D GB/s", "% of ceiling", "extra memory", "note"], rows)
    finally:
        engine.shutdown()
        engine = None  # noqa: F841
        free_all()
        for f in tmp.rglob("*"):
            if f.is_file():
                f.unlink()


# ---- release / resume ----------------------------------------------------------------------------


def _release_cycles(engine, base: int, cycles: int, tags=None) -> dict:
    rel_t, res_t, rel_used, res_used = [], [], [], []
    for i in range(cycles):
        if past_deadline() and i >= 5:
            print(f"!! release/resume stopped after {i} of {cycles} cycles (time budget)", flush=True)
            break
        t = time.perf_counter()
        r = engine.release_memory_occupation(tags)
        rel_t.append(time.perf_counter() - t)
        assert r.success, r.message
        rel_used.append(used_bytes() - base)
        t = time.perf_counter()
        r = engine.resume_memory_occupation(tags)
        res_t.append(time.perf_counter() - t)
        assert r.success, r.message
        res_used.append(used_bytes() - base)
    return {"rel_t": rel_t, "res_t": res_t, "rel_used": rel_used, "res_used": res_used}


def bench_release(shape: str, device: str, cycles: int, label: str, breakdown: bool, **engine_kw) -> None:
    """`cycles` release/resume cycles of every tag on an engine built with `engine_kw`; memory by the driver
    (cudaMemGetInfo and nvidia-smi), relative to the device's use before the engine existed."""
    if not cuda():
        return
    free_all()
    tmp = Path(tempfile.mkdtemp(prefix="hotswap-rel-"))
    path = config_only_checkpoint(tmp / shape, shape, "bfloat16")
    base = used_bytes()
    smi0 = smi_used_mib()
    engine = Engine(str(path), device=device, load_format="dummy", **engine_kw)
    try:
        prompt = list(range(3, 19))
        sp = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
        ref = engine.generate(input_ids=prompt, sampling_params=sp)["output_ids"]
        names = list(engine.model_runner.weight_map.names[:4])
        weights_bytes = engine.model_runner.weight_map.total_bytes
        kv = engine.model_runner.kv_cache.kv
        kv_bytes = kv.numel() * kv.element_size()
        del kv

        def fingerprint():  # the current map each time: holding an old one would pin released storage
            wm = engine.model_runner.weight_map
            return [float(wm.slots[n].dest.float().sum()) for n in names]

        fp0 = fingerprint()
        sync()
        loaded = used_bytes() - base
        smi_loaded = smi_used_mib()
        r = _release_cycles(engine, base, cycles)
        engine.release_memory_occupation()
        smi_rel = smi_used_mib()
        engine.resume_memory_occupation()
        assert fingerprint() == fp0
        engine.flush_cache()
        assert engine.generate(input_ids=prompt, sampling_params=sp)["output_ids"] == ref
        parts = {}
        if breakdown:
            for tag in ("kv_cache", "weights", "cuda_graph"):
                parts[tag] = _release_cycles(engine, base, 3, [tag])
        n = len(r["rel_t"])
        freed = [(loaded - u) / loaded for u in r["rel_used"]]
        med = lambda xs: statistics.median(xs) * 1e3  # noqa: E731
        fig = {"engine_bytes": loaded, "weights_bytes": weights_bytes, "kv_bytes": kv_bytes, "cycles": n, "engine_kw": engine_kw,
               "freed_min": min(freed), "freed_max": max(freed), "released_used": [min(r["rel_used"]), max(r["rel_used"])],
               "resumed_used": [min(r["res_used"]), max(r["res_used"])], "release_ms_median": med(r["rel_t"]),
               "resume_ms_median": med(r["res_t"]), "release_ms_first": r["rel_t"][0] * 1e3, "resume_ms_first": r["res_t"][0] * 1e3,
               "release_ms_max": max(r["rel_t"]) * 1e3, "resume_ms_max": max(r["res_t"]) * 1e3,
               "smi_mib": {"before_engine": smi0, "loaded": smi_loaded, "released": smi_rel},
               "by_tag_ms": {k: {"release": med(v["rel_t"]), "resume": med(v["res_t"])} for k, v in parts.items()}}
        RESULTS["figures"][f"{shape}.release.{label}"] = fig
        rows = [["engine memory (driver, above the pre-engine baseline)", mib(loaded), f"nvidia-smi: {smi0} -> {smi_loaded} MiB"],
                [f"freed by release, min..max over {n} cycles", f"{100 * min(freed):.2f}% .. {100 * max(freed):.2f}%", "goal >= 95%"],
                ["left after release, min..max", f"{mib(min(r['rel_used']))} .. {mib(max(r['rel_used']))}", f"nvidia-smi: {smi_rel} MiB"],
                ["in use after resume, min..max", f"{mib(min(r['res_used']))} .. {mib(max(r['res_used']))}", "flat = no leak"],
                ["release time, median (first, max)", f"{med(r['rel_t']):,.1f} ms ({r['rel_t'][0] * 1e3:,.1f}, {max(r['rel_t']) * 1e3:,.1f})",
                 "weights to pinned host, KV freed"],
                ["resume time, median (first, max)", f"{med(r['res_t']):,.1f} ms ({r['res_t'][0] * 1e3:,.1f}, {max(r['res_t']) * 1e3:,.1f})",
                 "weights back, KV allocated, graphs recaptured"]]
        for tag, v in parts.items():
            rows.append([f"only {tag!r}: release / resume, median of 3", f"{med(v['rel_t']):,.1f} / {med(v['res_t']):,.1f} ms", ""])
        rows.append(["weights and greedy tokens after the cycles", "identical", ""])
        table(f"{shape}.release.{label}", f"{shape}: release_memory_occupation / resume_memory_occupation, {label} "
              f"(weights {mib(weights_bytes)} + KV {mib(kv_bytes)}; {engine_kw})", ["what", "value", "note"], rows)
    finally:
        engine.shutdown()
        engine = None  # noqa: F841
        free_all()


# ---- distributed (gloo, one GPU) -------------------------------------------------------------------


def _gloo_sender(raw_port: int, port: int, specs, bucket_bytes: int, pushes: int, raw_bytes: int, q_go, q_done) -> None:
    """Rank 0 of two gloo groups: a raw one (the ceiling: CPU -> CPU broadcasts) and the weights group,
    broadcasting flattened buckets of random bf16 tensors when told to."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from hotswap.wire.process_group import init_custom_process_group

    raw = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{raw_port}", world_size=2, rank=0,
                                    group_name="raw", timeout=timedelta(seconds=60))
    buf = torch.empty(raw_bytes, dtype=torch.uint8).random_()
    for _ in range(4):
        dist.broadcast(buf, src=0, group=raw)
    del buf
    pg = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0,
                                   group_name="bench-gloo", timeout=timedelta(seconds=60))
    flats = []
    for bucket in _buckets(specs, bucket_bytes):
        flats.append(torch.cat([torch.empty(s, dtype=torch.bfloat16).normal_(0, 0.02).reshape(-1).view(torch.uint8) for _, s in bucket]))
    q_done.put("ready")
    while True:
        i = q_go.get()
        if i is None:
            break
        dist.broadcast(flats[i], src=0, group=pg)
    q_done.put("bye")
    time.sleep(0.5)  # let the queue's feeder thread flush
    os._exit(0)  # skip tearing the gloo groups down (it can block on a peer that already left)


def _buckets(specs, bucket_bytes: int) -> list[list[tuple[str, tuple]]]:
    """(name, shape) specs of bf16 tensors, grouped as a trainer's `iter_buckets` groups them."""
    meta = [(name, torch.empty(shape, dtype=torch.bfloat16, device="meta")) for name, shape in specs]
    return [[(name, tuple(t.shape)) for name, t in bucket] for bucket in iter_buckets(meta, bucket_bytes)]


def bench_distributed(shape: str, engine, max_bytes: int, bucket_bytes: int = 256 << 20) -> None:
    """The engine joins a gloo group with a sender process (NCCL cannot pair two ranks on one GPU) and loads
    flattened buckets inside one begin/end session per push."""
    from datetime import timedelta

    import torch.distributed as dist
    import torch.multiprocessing as mp

    from hotswap.trainer import free_port
    from hotswap.wire.process_group import init_custom_process_group

    wm = engine.model_runner.weight_map
    specs, size = [], 0
    for n in wm.names:
        shp = tuple(wm.slots[n].hf_shape)
        nb = torch.Size(shp).numel() * 2
        if size + nb > max_bytes and specs:
            continue
        specs.append((n, shp))
        size += nb
    buckets = _buckets(specs, bucket_bytes)
    raw_bytes = 256 << 20
    ctx = mp.get_context("spawn")
    q_go, q_done = ctx.Queue(), ctx.Queue()
    raw_port, port = free_port(), free_port()
    proc = ctx.Process(target=_gloo_sender, args=(raw_port, port, specs, bucket_bytes, 3, raw_bytes, q_go, q_done), daemon=True)
    proc.start()
    try:
        raw = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{raw_port}", world_size=2, rank=1,
                                        group_name="raw", timeout=timedelta(seconds=60))
        buf = torch.empty(raw_bytes, dtype=torch.uint8)
        times = []
        for _ in range(4):
            t = time.perf_counter()
            dist.broadcast(buf, src=0, group=raw)
            times.append(time.perf_counter() - t)
        ceiling = raw_bytes / statistics.median(times[1:])
        out = engine.init_weights_update_group("127.0.0.1", port, 1, 2, group_name="bench-gloo", backend="gloo", timeout_s=60)
        assert out.success, out.message
        assert _get_alive(q_done, proc) == "ready"
        push_times = []
        for k in range(3):
            t = time.perf_counter()
            assert engine.begin_weight_update().success
            for i, bucket in enumerate(buckets):
                q_go.put(i)
                res = engine.update_weights_from_distributed([n for n, _ in bucket], ["bfloat16"] * len(bucket), [list(s) for _, s in bucket],
                                                             group_name="bench-gloo", load_format="flattened_bucket")
                assert res.success, res.message
            res = engine.end_weight_update(weight_version=f"dist-{k}")
            assert res.success, res.message
            push_times.append(time.perf_counter() - t)
        engine.destroy_weights_update_group("bench-gloo")
        q_go.put(None)
        _get_alive(q_done, proc, 60)
    finally:
        proc.join(timeout=5)
        if proc.is_alive():
            proc.kill()
    t = statistics.median(push_times[1:])
    rows = [[f"update_weights_from_distributed, gloo, flattened {mib(bucket_bytes)} buckets, one session per push", f"{size / GB:.2f}",
             fmt_ms(t), fmt_gbs(size, t), f"{ceiling / GB:.2f}", pct(size / t, ceiling),
             "one bucket of scratch on the GPU (<= weight_update_bucket_bytes) + rollback of the session"]]
    RESULTS["figures"][f"{shape}.distributed"] = {"GB": size / GB, "ms": t * 1e3, "GBps": size / t / GB, "gloo_GBps": ceiling / GB,
                                                  "buckets": len(buckets)}
    table(f"{shape}.distributed", f"{shape}: distributed path on one GPU (gloo sender process on the CPU -> engine on the GPU; "
          f"{len(specs)} tensors, {len(buckets)} buckets)", ["path", "GB", "time ms", "GB/s", "ceiling: raw gloo broadcast GB/s",
                                                              "% of ceiling", "extra memory"], rows)


# ---- main -----------------------------------------------------------------------------------------


def run_shape(shape: str, args, ceil: dict) -> None:
    device = "cuda" if cuda() else "cpu"
    on_gpu = device == "cuda"
    big = shape == "qwen3-8b"
    sections = set(args.sections.split(","))
    bucket_mib = [int(x) for x in args.ipc_bucket_mib.split(",")]
    if sections & {"tensor", "ttft", "ipc", "pusher", "distributed"}:
        tmp = Path(tempfile.mkdtemp(prefix="hotswap-ws-"))
        path = config_only_checkpoint(tmp / shape, shape, "bfloat16" if on_gpu else "float32")
        # the IPC producer sends the same buffers every update, so keeping all of them mapped pins nothing
        # extra; the engine default (1 GiB) is sized for IPCWeightPusher's reused pack buffer instead
        pool = dict(num_pages=kv_pages_for(shape, int(args.kv_gib * 2**30))) if args.kv_gib > 0 else {}
        engine = make_engine(path, device, cuda_ipc_cache_bytes=64 << 30, **pool)
        aliased = not second_copy_fits(sum(p.numel() * p.element_size() for p in engine.model_runner.model.parameters()), args.sources)
        if aliased:
            print(f"[{shape}] sources aliased ({'--sources aliased' if args.sources == 'aliased' else 'a second copy of the weights does not fit'}): "
                  "in-process sources are views of one buffer per dtype, the size of the largest tensor", flush=True)
        RESULTS["figures"][f"{shape}.sources_aliased"] = aliased
        sources = hf_sources(engine, device, aliased=aliased)
        try:
            for name, fn in (("tensor", lambda: bench_tensor(shape, engine, sources, ceil, args.reps)),
                             ("ttft", lambda: bench_ttft(shape, engine, sources, args.ttft_reps))):
                if name in sections and f"{shape}.{name}" not in args.skip.split(","):
                    guarded(f"{shape}.{name}", fn)
            sources = None  # the sections below do not use them; the IPC producer's full copy needs their memory
            free_all()
            for name, fn in (("ipc", lambda: bench_ipc(shape, engine, ceil, args.ipc_updates, args.sources, bucket_mib) if on_gpu else None),
                             ("pusher", lambda: bench_pusher(shape, engine, ceil, [int(x) for x in args.pusher_in_flight.split(",")],
                                                             [int(x) for x in args.pusher_bucket_kib.split(",")], args.pusher_reps, args.sources,
                                                             args.pusher_transport.split(","), not args.pusher_no_sessions,
                                                             args.pusher_replies.split(","))),
                             ("distributed", lambda: bench_distributed(shape, engine, args.dist_bytes))):
                if name in sections and f"{shape}.{name}" not in args.skip.split(","):
                    guarded(f"{shape}.{name}", fn)
        finally:
            engine.shutdown()
            del engine, sources
            free_all()
    if "disk" in sections:
        guarded(f"{shape}.disk", lambda: bench_disk(shape, device, ceil, args.disk_8b_layers if big else None, args.disk_reps, args.grid))
    if "release" in sections:
        guarded(f"{shape}.release.default", lambda: bench_release(shape, device, args.cycles_default_kv, "default KV (0.8 of free memory)",
                                                                  big or not args.breakdown_8b_only, cuda_graph_max_batch=32))
        guarded(f"{shape}.release.small", lambda: bench_release(shape, device, args.cycles_8b if big else args.cycles, "KV of 4 GiB", False,
                                                                num_pages=kv_pages_for(shape, 4 << 30), cuda_graph_max_batch=8))


def kv_pages_for(shape: str, nbytes: int, page_size: int = 16) -> int:
    s = SHAPES[shape]
    per_page = 2 * s["num_hidden_layers"] * page_size * s["num_key_value_heads"] * s["head_dim"] * 2
    return max(64, nbytes // per_page)


def guarded(name: str, fn) -> None:
    t = time.perf_counter()
    if past_deadline():
        print(f"!! section {name} skipped (time budget)", flush=True)
        RESULTS.setdefault("errors", {})[name] = "skipped: time budget"
        return
    free_all()
    try:
        fn()
    except Exception as exc:  # one section failing must not lose the others' figures
        import traceback

        traceback.print_exc()
        RESULTS.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
        print(f"!! section {name} failed: {type(exc).__name__}: {exc}", flush=True)
    RESULTS.setdefault("section_s", {})[name] = time.perf_counter() - t
    print(f"[{name}: {time.perf_counter() - t:.1f} s]", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="tiny")
    ap.add_argument("--sections", default="tensor,ttft,ipc,disk,release,distributed")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--ttft-reps", type=int, default=10)
    ap.add_argument("--ipc-updates", type=int, default=100)
    ap.add_argument("--ipc-bucket-mib", default="512", help="comma list: IPCWeightPusher's bucket sizes to run (MiB)")
    ap.add_argument("--pusher-in-flight", default="1,2", help="comma list: IPCWeightPusher's calls_in_flight settings (section pusher)")
    ap.add_argument("--pusher-bucket-kib", default="524288", help="comma list: its bucket sizes (KiB) (section pusher)")
    ap.add_argument("--pusher-transport", default="queue,http", help="comma list: queue (a hand-off per call) and/or http (section pusher)")
    ap.add_argument("--pusher-no-sessions", action="store_true", help="the pusher with use_sessions=False (section pusher)")
    ap.add_argument("--pusher-replies", default="after-copies",
                    help="comma list: after-copies (the engine's way) and/or synchronised (each call syncs before its reply) (section pusher)")
    ap.add_argument("--pusher-reps", type=int, default=10, help="pushes per setting, interleaved (section pusher)")
    ap.add_argument("--disk-reps", type=int, default=3)
    ap.add_argument("--disk-8b-layers", type=int, default=6)
    ap.add_argument("--grid", action="store_true", help="time a grid of reader strategies / threads / staging")
    ap.add_argument("--cycles", type=int, default=100)
    ap.add_argument("--cycles-default-kv", type=int, default=5)
    ap.add_argument("--cycles-8b", type=int, default=100)
    ap.add_argument("--dist-bytes", type=int, default=1 << 30)
    ap.add_argument("--json", default=None)
    ap.add_argument("--skip", default="", help="comma list of SHAPE.SECTION to leave out")
    ap.add_argument("--sources", choices=("auto", "full", "aliased"), default="auto",
                    help="in-process sources and IPC producers: a full second copy of the weights, or views of one buffer the "
                         "size of the largest tensor (auto: aliased where a second copy does not fit, e.g. 30B-A3B on 80 GB)")
    ap.add_argument("--breakdown-8b-only", action="store_true", help="per-tag release/resume timing for qwen3-8b only")
    ap.add_argument("--kv-gib", type=float, default=0,
                    help="the tensor / ttft / ipc engine's KV pool in GiB, as a serving engine sizes it (default 1024 pages): "
                         "what a weight-update session's rollback can borrow (its 'KV pool lent' row)")
    ap.add_argument("--budget-s", type=float, default=0, help="stop long loops (release cycles) after this many seconds")
    args = ap.parse_args()
    if args.json:
        JSON_PATH.append(args.json)
    if args.budget_s:
        DEADLINE.append(time.time() + args.budget_s)
    shapes = [s for s in args.shapes.split(",") if s]
    for s in shapes:
        if s not in SHAPES:
            raise SystemExit(f"unknown shape {s!r}; use {sorted(SHAPES)}")
    RESULTS["device"] = device_name(torch.device("cuda" if cuda() else "cpu"))
    RESULTS["torch"] = torch.__version__
    RESULTS["args"] = vars(args)
    ceil = measure_ceilings()
    try:
        for s in shapes:
            run_shape(s, args, ceil)
    finally:
        save_json()


if __name__ == "__main__":
    main()
