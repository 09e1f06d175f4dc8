"""The HTTP front end alone, streaming at a rate no CPU model reaches: a synthetic scheduler (no model) emits
one token for every running request each `--step-ms`, as a GPU's decode steps do (256 streams every 10 ms:
25,600 tok/s offered), and the real app (`create_app`, uvicorn) streams them to lean clients in other
processes (raw HTTP over asyncio, no SSE parsing but the last event's). It reports the front end's CPU per
streamed token (the event-loop thread in process, or the whole front end process with `--frontend-process`),
the rate it kept up with, and how many tokens a chunk carried (chunks coalesce when the front end is behind).

    python bench/frontend_stream.py --streams 256 --tokens 128 --step-ms 10 --paths generate-stream,completions-stream
    python bench/frontend_stream.py --frontend-process --cumulative    # SGLang's default (cumulative) native chunks
"""

from __future__ import annotations

import argparse
import json
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint, print_table, proc_cpu_s  # noqa: E402

from hotswap import protocol as p  # noqa: E402
from hotswap.cache.page_allocator import PoolCapacity  # noqa: E402
from hotswap.config import EngineConfig, model_config_for  # noqa: E402
from hotswap.engine.api import EngineAPI  # noqa: E402
from hotswap.engine.tokenizer import load_tokenizer  # noqa: E402
from hotswap.scheduler.detokenizer import detokenizer_for  # noqa: E402


class SyntheticScheduler:
    """A SchedulerPort that answers generate requests with one random token (and its logprob) per running
    request every `step_s`, sinking each output then flushing each consumer once per step, as the Scheduler does."""

    def __init__(self, vocab: int, step_s: float, capacity: PoolCapacity):
        self.vocab, self.step_s, self._capacity = vocab, step_s, capacity
        self._lock = threading.Lock()
        self._running: dict[str, list] = {}  # rid -> [request, tokens so far]
        self._stop = threading.Event()
        self.steps = 0
        self.thread = threading.Thread(target=self._run, name="hotswap-scheduler", daemon=True)
        self.thread.start()

    def capacity(self) -> PoolCapacity:
        return self._capacity

    def submit(self, request) -> Future:
        fut: Future = Future()
        with self._lock:
            if isinstance(request, p.GenerateBatch):
                for r in request.requests:
                    self._running[r.rid] = [r, 0]
                fut.set_result(None)
            elif isinstance(request, p.AbortRequest):
                self._running.pop(request.rid, None)
                fut.set_result(p.ControlOutput(success=True, message=""))
            elif isinstance(request, p.GetLoadRequest):
                fut.set_result(p.LoadOutput(success=True, message="", num_running=len(self._running), weight_version="default"))
            else:
                fut.set_exception(RuntimeError(f"the synthetic scheduler does not serve {type(request).__name__}"))
        return fut

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(5)

    def _run(self) -> None:
        rng = random.Random(0)
        next_at = time.monotonic()
        while not self._stop.is_set():
            next_at += self.step_s
            with self._lock:
                running = list(self._running.values())
            flushes: dict = {}
            for entry in running:
                req, done = entry
                entry[1] = done = done + 1
                sp = req.sampling_params
                last = done >= sp.max_new_tokens
                tid = rng.randrange(self.vocab)
                out = p.GenerateOutput(rid=req.rid, new_token_ids=[tid], new_logprobs=[-rng.random() * 4] if sp.return_logprob else [],
                                       new_top_logprobs=[], new_token_versions=["default"], text_delta="", finished=last,
                                       finish_reason={"type": "length", "length": done} if last else None,
                                       prompt_tokens=len(req.input_ids), cached_tokens=0, weight_version="default")
                if last:
                    with self._lock:
                        self._running.pop(req.rid, None)
                req.sink(out)
                if req.flush is not None:
                    flushes[req.flush] = None
            for flush in flushes:
                flush()
            self.steps += 1
            time.sleep(max(0.0, next_at - time.monotonic()))


class SyntheticEngine(EngineAPI):
    def __init__(self, model_path: Path, step_s: float, incremental: bool):
        config = EngineConfig(model_path=str(model_path), device="cpu", incremental_streaming_output=incremental)
        model_config = model_config_for(config)
        tokenizer = load_tokenizer(config)
        scheduler = SyntheticScheduler(model_config.vocab_size, step_s, PoolCapacity(num_pages=100_000, page_size=16))
        super().__init__(config, model_config, torch.device("cpu"), tokenizer, scheduler,
                         lambda skip, prompt_ids: detokenizer_for(tokenizer, skip, prompt_ids))

    def shutdown(self) -> None:
        self._closed = True
        self.scheduler.stop()


def _bodies(path: str, streams: int, tokens: int) -> tuple[str, list[dict]]:
    ids = list(range(1, 17))
    if path == "generate-stream":
        sp = {"max_new_tokens": tokens, "ignore_eos": True}
        return "/generate", [{"input_ids": ids, "sampling_params": sp, "return_logprob": True, "stream": True} for _ in range(streams)]
    body = {"model": "m", "max_tokens": tokens, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}, "logprobs": 0}
    if path == "completions-stream":
        return "/v1/completions", [{**body, "prompt": ids} for _ in range(streams)]
    body.pop("logprobs")
    return "/v1/chat/completions", [{**body, "input_ids": ids, "messages": [{"role": "user", "content": "x"}], "logprobs": True}
                                    for _ in range(streams)]


def run_path(host: str, port: int, path: str, args, cpu_of, engine_scheduler_tid: int) -> dict:
    route, bodies = _bodies(path, args.streams, args.tokens)
    procs = []
    sched = engine_scheduler_tid
    before, sched_before = cpu_of(), proc_cpu_s(f"/proc/self/task/{sched}/stat")
    for k in range(args.client_procs):
        order = json.dumps({"host": host, "port": port, "route": route, "bodies": bodies[k :: args.client_procs]})
        proc = subprocess.Popen([sys.executable, str(Path(__file__).with_name("frontend_stream_clients.py"))], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        procs.append((proc, order))
    with ThreadPoolExecutor(len(procs)) as pool:  # every process gets its order at once
        results = [json.loads(out) for out, _ in pool.map(lambda po: po[0].communicate(po[1], timeout=600), procs)]
    cpu = cpu_of() - before
    sched_cpu = proc_cpu_s(f"/proc/self/task/{sched}/stat") - sched_before
    tokens = sum(r["tokens"] for r in results)
    wall = max(r["end"] for r in results) - min(r["start"] for r in results)  # from the first request to the last reply
    events = sum(r["events"] for r in results)
    if tokens != args.streams * args.tokens:
        raise RuntimeError(f"{path}: {tokens} tokens streamed, asked for {args.streams * args.tokens}")
    return {"path": path, "wall_s": wall, "tok_s": tokens / wall, "frontend_cpu_s": cpu, "us_per_token": 1e6 * cpu / tokens,
            "tokens_per_chunk": tokens / events, "client_cpu_s": sum(r["cpu_s"] for r in results),
            "scheduler_cpu_s": sched_cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--streams", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=128, help="tokens a stream asks for")
    ap.add_argument("--step-ms", type=float, default=10.0, help="the synthetic scheduler's step period")
    ap.add_argument("--paths", default="generate-stream,completions-stream,chat-stream")
    ap.add_argument("--cumulative", action="store_true",
                    help="native chunks in SGLang's default shape (everything so far); else the server's --incremental-streaming-output")
    ap.add_argument("--frontend-process", action="store_true", help="the front end in its own process, as `hotswap serve` runs it")
    ap.add_argument("--frontend-workers", type=int, default=1, help="with --frontend-process: this many front end processes on the port")
    ap.add_argument("--client-procs", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.frontend_workers != 1 and not args.frontend_process or args.frontend_workers < 1:
        ap.error("--frontend-workers takes a count >= 1, and more than 1 only with --frontend-process")

    from hotswap.server.app import create_app
    from hotswap.server.frontend_process import FrontendGroup, FrontendOptions
    from hotswap.server.launch import ServerThread

    tmp = tempfile.TemporaryDirectory()
    engine = SyntheticEngine(config_only_checkpoint(Path(tmp.name) / "ckpt", "tiny"), args.step_ms / 1000, not args.cumulative)
    if args.frontend_process:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        server = FrontendGroup(engine, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1]), args.frontend_workers).start()
        host, port = server.fronts[0].address
        cpu_of = lambda: sum(proc_cpu_s(f"/proc/{pid}/stat") for pid in server.pids)
    else:
        server = ServerThread(create_app(engine), host="127.0.0.1", port=0).start()
        host, port = "127.0.0.1", server.port
        loop_thread = next(t for t in threading.enumerate() if t.name == "hotswap-http")
        cpu_of = lambda: proc_cpu_s(f"/proc/self/task/{loop_thread.native_id}/stat")
    rows = []
    try:
        for path in args.paths.split(","):
            r = run_path(host, port, path, args, cpu_of, engine.scheduler.thread.native_id)
            rows.append([r["path"], f"{r['wall_s']:.2f}", f"{r['tok_s']:,.0f}", f"{r['frontend_cpu_s']:.2f}", f"{r['us_per_token']:.1f}",
                         f"{r['tokens_per_chunk']:.2f}", f"{r['scheduler_cpu_s']:.2f}", f"{r['client_cpu_s']:.1f}"])
            if args.json:
                with open(args.json, "a") as f:
                    f.write(json.dumps({**r, **vars(args)}) + "\n")
    finally:
        server.stop()
        engine.shutdown()
    offered = args.streams / (args.step_ms / 1000)
    where = (f"{args.frontend_workers} front end process(es)" if args.frontend_process else "event-loop thread")
    print_table(f"front end, synthetic scheduler: {args.streams} streams x {args.tokens} tokens, a step every {args.step_ms:g} ms "
                      f"({offered:,.0f} tok/s offered), {'cumulative' if args.cumulative else 'incremental'} native chunks, "
                      f"{args.client_procs} client processes",
                      ["path", "wall s", "tok/s", f"CPU s ({where})", "us CPU / token", "tokens / chunk", "scheduler thread CPU s", "client CPU s"], rows)


if __name__ == "__main__":
    main()
