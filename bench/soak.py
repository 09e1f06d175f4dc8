"""Soak: one CPU engine and its HTTP server driven by every kind of request and weight update, then every
long-lived container reachable from them measured again. Anything that grows with the number of rounds is a leak.

    PYTHONPATH=src python bench/soak.py --rounds 40 --warmup 5

Each round: sync / async / streamed generates (n > 1, logprobs), streams closed early, calls cancelled by a
timeout, aborts by rid and abort_all, HTTP /generate and OpenAI routes (streamed, disconnected mid-stream,
refused), updates from tensor / disk / shared memory (IPCWeightPusher), a session rolled back, refused updates,
pause/continue, flush_cache, release/resume. After `--warmup` rounds a baseline is taken; after the rest, the
report lists every container whose length changed, object counts by type that grew, threads, fds, RSS and KV
pages; every round ends idle with the prefix cache flushed and must give every KV page back. It prints, it does not
judge: a container that grows with --rounds is a leak, one that settles (a bounded LRU, a warm cache) is not.
`--remote` puts the engine behind a RemoteEngine over an in-process pipe (the `hotswap serve` front end's path)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import itertools
import multiprocessing as mp
import os
import tempfile
import threading
import time
import tracemalloc
from collections import Counter, deque
from pathlib import Path

import httpx
import torch
from safetensors.torch import load_file

from hotswap import Engine
from hotswap.engine.remote import RemoteEngine
from hotswap.engine.service import EngineService
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread
from hotswap.testing.tiny_models import build_tiny_checkpoint, perturb_checkpoint
from hotswap.trainer import IPCWeightPusher

CONTAINERS = (dict, list, set, deque, Counter)
SHORT = {"max_new_tokens": 4, "temperature": 1.0}
LONG = {"max_new_tokens": 24, "temperature": 1.0, "ignore_eos": True}


def reachable_lengths(root: object, name: str, depth: int = 6) -> dict[str, int]:
    """len() of every container reachable from `root` through attributes (breadth-first, each object once)."""
    seen, out, todo = set(), {}, deque([(root, name, 0)])
    while todo:
        obj, path, d = todo.popleft()
        if id(obj) in seen or isinstance(obj, (str, bytes, int, float, torch.Tensor, type)) or obj is None:
            continue
        seen.add(id(obj))
        if isinstance(obj, CONTAINERS):
            out[path] = len(obj)
            if isinstance(obj, dict) and len(obj) < 64:
                todo.extend((v, f"{path}[{k!r}]"[:160], d + 1) for k, v in list(obj.items()) if d < depth)
            continue
        if d >= depth:
            continue
        attrs = getattr(obj, "__dict__", None) or {s: getattr(obj, s, None) for s in getattr(type(obj), "__slots__", ())}
        todo.extend((v, f"{path}.{k}", d + 1) for k, v in list(attrs.items()))
    return out


def rss_mib() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE") >> 20


def snapshot(engine: Engine, app, extra: dict) -> dict:
    gc.collect()
    load = engine.get_load()
    lengths = reachable_lengths(engine, "engine") | reachable_lengths(app.state.hotswap, "server")
    for name, obj in extra.items():
        lengths |= reachable_lengths(obj, name)
    return {"lengths": lengths, "types": Counter(type(o).__name__ for o in gc.get_objects()),
            "threads": sorted(t.name for t in threading.enumerate()), "fds": len(os.listdir("/proc/self/fd")),
            "rss_mib": rss_mib(),
            "free_pages": engine.scheduler.allocator.num_free, "load": (load.num_running, load.num_waiting),
            "tasks": sum(1 for o in gc.get_objects() if isinstance(o, asyncio.Task) and not o.done()),
            "tracemalloc": tracemalloc.take_snapshot() if tracemalloc.is_tracing() else None}


def engine_round(engine: Engine, r: int, prompts: list[list[int]]) -> None:
    engine.generate(input_ids=prompts[:3], sampling_params={**SHORT, "n": 2}, return_logprob=True, top_logprobs_num=2)
    stream = engine.generate(input_ids=prompts[0], sampling_params=LONG, stream=True)
    next(stream)
    stream.close()  # the client stops reading: aborted
    list(engine.generate(input_ids=prompts[1], sampling_params={**SHORT, "n": 2}, stream=True))

    async def cancelled() -> None:
        try:
            await asyncio.wait_for(engine.async_generate(input_ids=prompts[2], sampling_params=LONG), 0.01)
        except asyncio.TimeoutError:
            pass
        await engine.async_generate(input_ids=prompts[:2], sampling_params=SHORT, rid=[f"a{r}-0", f"a{r}-1"])
        it = await engine.async_generate(input_ids=prompts[3], sampling_params=LONG, stream=True)
        async for _ in it:
            break
        await it.aclose()
    asyncio.run(cancelled())

    t = threading.Thread(target=engine.generate, kwargs={"input_ids": prompts[4], "sampling_params": LONG, "rid": f"x{r}"})
    t.start()
    engine.abort_request(f"x{r}")
    engine.abort_request(f"never-{r}")  # an unknown rid
    t.join(30)
    try:
        engine.generate(input_ids=[10**9], sampling_params=SHORT)  # refused: a token past the vocabulary
    except Exception:  # noqa: BLE001 - refused by design
        pass


def http_round(http: httpx.Client, r: int, prompts: list[list[int]]) -> None:
    http.post("/generate", json={"input_ids": prompts[0], "sampling_params": {**SHORT, "n": 2}, "return_logprob": True})
    with http.stream("POST", "/generate", json={"input_ids": prompts[1], "sampling_params": LONG, "stream": True}) as resp:
        for _ in resp.iter_lines():
            break  # disconnect mid-stream
    with http.stream("POST", "/v1/completions", json={"model": "tiny", "prompt": "hello there", "max_tokens": 4, "stream": True,
                                                      "n": 2, "logprobs": 1}) as resp:
        list(resp.iter_lines())
    http.post("/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "user", "content": f"hi {r}"}], "max_tokens": 4})
    http.post("/generate", json={"input_ids": prompts[2], "sampling_params": {"max_new_tokens": -3}})  # refused
    http.post("/abort_request", json={"rid": f"nobody-{r}"})
    try:
        http.post("/generate", json={"input_ids": prompts[3], "sampling_params": LONG}, timeout=0.02)  # client times out
    except httpx.TimeoutException:
        pass
    http.get(f"/no/such/route/{r}")
    http.get("/metrics")
    http.get("/v1/loads")


def background_load(url: str, stop: threading.Event, prompts: list[list[int]], counts: Counter) -> None:
    """Requests of every kind while the rounds update weights, pause and release: some refused, some cut."""
    kinds = itertools.cycle(["generate", "stream_cut", "chat_stream", "timeout", "n4"])
    with httpx.Client(base_url=url, timeout=30) as http:
        for i in itertools.count():
            if stop.is_set():
                return
            kind, prompt = next(kinds), prompts[i % len(prompts)]
            try:
                if kind == "generate":
                    http.post("/generate", json={"input_ids": prompt, "sampling_params": LONG, "return_logprob": True})
                elif kind == "stream_cut":
                    with http.stream("POST", "/generate", json={"input_ids": prompt, "sampling_params": LONG, "stream": True}) as resp:
                        for _ in itertools.islice(resp.iter_lines(), 3):
                            pass
                elif kind == "chat_stream":
                    with http.stream("POST", "/v1/chat/completions", json={"model": "tiny", "stream": True, "max_tokens": 16, "n": 2,
                                                                          "messages": [{"role": "user", "content": f"x {i}"}]}) as resp:
                        list(resp.iter_lines())
                elif kind == "timeout":
                    http.post("/generate", json={"input_ids": prompt, "sampling_params": LONG}, timeout=0.05)
                else:
                    http.post("/generate", json={"input_ids": prompt, "sampling_params": {**SHORT, "n": 4}})
                counts[kind] += 1
            except httpx.HTTPError:
                counts[f"{kind} (client gave up)"] += 1


def update_round(engine: Engine, http: httpx.Client, r: int, paths: list[Path], tensors: list[dict]) -> None:
    i = r % 2
    engine.update_weights_from_tensor(list(tensors[i].items()), weight_version=f"t{r}")
    http.post("/update_weights_from_disk", json={"model_path": str(paths[1 - i]), "weight_version": f"d{r}"})
    engine.update_weights_from_tensor([("model.no_such.weight", torch.zeros(3))])  # refused
    http.post("/update_weights_from_disk", json={"model_path": f"/nonexistent/{r}"})  # refused
    session = engine.begin_weight_update()
    engine.update_weights_from_tensor(list(tensors[i].items())[:4], session_id=session.session_id)
    engine.end_weight_update(abort=True, session_id=session.session_id)  # rolled back
    with IPCWeightPusher(engine, bucket_bytes=200_000) as pusher:
        pusher.push(tensors[i], weight_version=f"i{r}")
    mode = ("retract", "in_place", "abort")[r % 3]
    engine.pause_generation(mode=mode)
    if mode == "abort":
        engine.release_memory_occupation(["kv_cache"])  # released while paused: what queues meanwhile is refused at the resume
    engine.update_weights_from_tensor(list(tensors[1 - i].items())[:2], weight_version=f"p{r}")
    if mode == "abort":
        engine.resume_memory_occupation(["kv_cache"])
    engine.continue_generation()
    http.post("/pause_generation", json={"mode": "abort"})
    http.post("/continue_generation", json={})
    engine.flush_cache()
    engine.release_memory_occupation()
    engine.resume_memory_occupation()


def wait_idle(engine: Engine, timeout: float = 30.0) -> None:
    """Until nothing runs or waits (a stream cut or a call timed out client-side ends within a step or two)."""
    deadline = time.monotonic() + timeout
    while (load := engine.get_load()).num_running or load.num_waiting:
        if time.monotonic() > deadline:
            raise RuntimeError(f"not idle after {timeout} s: {load}")
        time.sleep(0.02)


def diff(before: dict, after: dict, rounds: int) -> list[str]:
    lines = []
    for key in sorted(set(before["lengths"]) | set(after["lengths"])):
        a, b = before["lengths"].get(key), after["lengths"].get(key)
        if a != b:
            lines.append(f"  {key}: {a} -> {b}")
    lines.append("object types grown by >= rounds:")
    for name, n in (after["types"] - before["types"]).most_common(25):
        if n >= rounds:
            lines.append(f"  {name}: +{n}")
    for k in ("threads", "fds", "rss_mib", "free_pages", "load", "tasks"):
        lines.append(f"{k}: {before[k] if k != 'threads' else len(before[k])} -> {after[k] if k != 'threads' else len(after[k])}")
    if set(after["threads"]) != set(before["threads"]):
        lines.append(f"  new threads: {sorted(Counter(after['threads']) - Counter(before['threads']))}")
    if before["tracemalloc"] is not None:
        lines.append("tracemalloc top growth:")
        for stat in after["tracemalloc"].compare_to(before["tracemalloc"], "lineno")[:15]:
            lines.append(f"  {stat}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--tracemalloc", action="store_true")
    ap.add_argument("--num-pages", type=int, default=0, help="a KV pool this small (pages of 4 tokens) preempts and retracts; 0: 1024")
    ap.add_argument("--no-prefix-cache", action="store_true")
    ap.add_argument("--remote", action="store_true", help="drive the engine through a RemoteEngine over an in-process pipe")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    base = build_tiny_checkpoint(tmp / "a", "qwen3")
    paths = [base, perturb_checkpoint(base, tmp / "b", seed=3)]
    tensors = [{k: v for f in sorted(p.glob("*.safetensors")) for k, v in load_file(f).items()} for p in paths]
    prompts = [[(7 * i + j) % 200 + 5 for j in range(6 + i)] for i in range(6)]
    with Engine(str(base), device="cpu", page_size=4, num_pages=args.num_pages, enable_prefix_cache=not args.no_prefix_cache) as engine:
        extra, front = {}, engine
        if args.remote:
            ours, theirs = mp.Pipe(duplex=True)
            service = EngineService(engine, ours).start()
            front = RemoteEngine(theirs, service.info)
            extra = {"service": service, "remote": front}
        app = create_app(front, served_model_name="tiny")
        with ServerThread(app) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
            start_pages = snapshot(engine, app, extra)["free_pages"]
            before, counts, page_losses, rss = None, Counter(), [], []
            for r in range(args.warmup + args.rounds):
                if r == args.warmup:
                    if args.tracemalloc:
                        tracemalloc.start(8)
                    engine.flush_cache()
                    before = snapshot(engine, app, extra)
                    print(f"baseline after {r} rounds taken", flush=True)
                stop = threading.Event()  # a background load through the whole round, stopped before any snapshot
                load = threading.Thread(target=background_load, args=(srv.url, stop, prompts, counts), daemon=True)
                load.start()
                engine_round(front, r, prompts)
                http_round(http, r, prompts)
                update_round(front, http, r, paths, tensors)
                stop.set()
                load.join(60)
                wait_idle(engine)
                engine.flush_cache()  # every page back: whatever way this round's requests ended
                check = engine.check_invariants()
                if engine.scheduler.allocator.num_free != start_pages or not check.success:
                    page_losses.append((r, start_pages - engine.scheduler.allocator.num_free, check.message))
                rss.append(rss_mib())
            engine.flush_cache()
            after = snapshot(engine, app, extra)
            print(f"engine steps {engine.scheduler.num_steps}, "
                  f"weight version now {engine.weight_version}; background HTTP calls: {dict(counts)}")
            print(f"rounds whose end left KV pages out or broke an invariant: {page_losses or 'none'}")
            print(f"RSS (MiB) after each tenth of the rounds: {rss[:: max(1, len(rss) // 10)] + rss[-1:]}")
            print(f"KV free pages at start {start_pages}, after warm-up {before['free_pages']}, end {after['free_pages']}")
            print(f"invariants: {engine.check_invariants().message or 'ok'}")
            print("\n".join(diff(before, after, args.rounds)))
        if args.remote:
            front.shutdown()
            service.close()


if __name__ == "__main__":
    main()
