"""Helpers for tests with a real trainer in a second process: a minimal HTTP front for an in-process
Engine (stdlib only; the real server lives in hotswap.server), a scripted trainer process, checkpoints.

The trainer runs in a `spawn` child that imports this module: keep module-level imports light (no Engine,
no transformers) so the child starts fast.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import os
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch
from safetensors.torch import load_file

CTX = mp.get_context("spawn")


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


# ---- the engine side: a JSON shim with the HTTP routes HttpEngineClient calls ------------------------


@dataclass
class Faults:
    """What a test front does wrong, per route: wait before handing a call to the engine (`delay_before`: it
    lands late), wait after it ran before replying (`delay_after`: applied, reply late), die on the n-th
    call of a route (`die_on`: no reply, the port stops listening, as a killed engine), or flatten the
    first tensor's shape in a bucket (`bad_shape`: the engine refuses it)."""

    delay_before: dict[str, float] = field(default_factory=dict)
    delay_after: dict[str, float] = field(default_factory=dict)
    die_on: dict[str, int] = field(default_factory=dict)
    bad_shape: bool = False
    calls: dict[str, int] = field(default_factory=dict)


def serve_engine_http(engine, faults: Faults | None = None) -> tuple[str, ThreadingHTTPServer]:
    """Serve `engine`'s weight ops on 127.0.0.1 (route -> Engine method, JSON body -> keyword args).
    Returns (base_url, server); call `server.shutdown()` when done."""
    from hotswap.trainer.client import HttpEngineClient

    methods = {route: name for name, route in HttpEngineClient.ROUTES.items()}
    faults = faults or Faults()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # keep pytest output clean
            pass

        def do_GET(self):  # the reads a trainer makes: the IPC token for shared-memory blocks, the weight version
            if self.path == "/get_ipc_token":
                self._reply(200, {"ipc_token": engine.get_ipc_token()})
            elif self.path == "/get_model_info":
                self._reply(200, engine.get_model_info())
            else:
                self._reply(404, {"success": False, "message": f"no route GET {self.path}"})

        def do_POST(self):
            name = methods.get(self.path)
            n = faults.calls[self.path] = faults.calls.get(self.path, 0) + 1
            if faults.die_on.get(self.path) == n:
                threading.Thread(target=lambda: (server.shutdown(), server.server_close()), daemon=True).start()
                self.close_connection = True
                self.connection.close()
                return
            time.sleep(faults.delay_before.get(self.path, 0.0))
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                if faults.bad_shape and name == "update_weights_from_tensor":
                    first = body["named_tensors"][0]
                    first["shape"] = [math.prod(first["shape"])]
                if name is None:
                    status, reply = 404, {"success": False, "message": f"no route {self.path}"}
                else:
                    out = getattr(engine, name)(**body)
                    reply = out.to_dict()
                    status = 200 if reply.get("success") else 400
            except Exception as exc:
                status, reply = 500, {"success": False, "message": f"{type(exc).__name__}: {exc}"}
            time.sleep(faults.delay_after.get(self.path, 0.0))
            self._reply(status, reply)

        def _reply(self, status: int, reply: dict) -> None:
            data = json.dumps(reply).encode()
            try:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)
            except OSError:  # the trainer died while waiting
                pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server


# ---- the trainer side: a scripted trainer process ------------------------------------------------------


def bucket_bytes_for(weights: dict[str, torch.Tensor], n: int) -> int:
    """The smallest bucket size that splits `weights` into exactly `n` buckets."""
    from hotswap.trainer import iter_buckets, iter_named_tensors

    total = sum(t.numel() * t.element_size() for t in weights.values())
    size = -(-total // n)
    while len(list(iter_buckets(iter_named_tensors(weights), size))) > n:
        size += 256
    return size


def faulted(weights: dict[str, torch.Tensor], bucket_bytes: int, bucket: int, kind: str) -> dict[str, torch.Tensor]:
    """A copy of `weights` whose first tensor in bucket `bucket` is broken without changing the bucketing:
    "shape" (same bytes, flattened), "nan" (values), "unknown" (renamed)."""
    from hotswap.trainer import iter_buckets, iter_named_tensors

    name, t = list(iter_buckets(iter_named_tensors(weights), bucket_bytes))[bucket][0]
    out = {}
    for k, v in weights.items():
        if k != name:
            out[k] = v
        elif kind == "shape":
            out[k] = v.reshape(-1)
        elif kind == "nan":
            out[k] = torch.full_like(v, float("nan"))
        elif kind == "unknown":
            out[k.replace("layers.", "layerz.")] = v
        else:
            raise ValueError(kind)
    return out


def trainer_main(spec: dict, events) -> None:
    """A trainer process following `spec`; reports ("event", payload) tuples on `events`.

    spec: base_url (or base_urls: several engines), ranks_per_engine (their tensor-parallel size), checkpoint, master_port, group_name,
    buckets (count), load_format, pushes (list of
    {"version", "fault": None | (bucket, kind), "sleep_after_bucket": s, "stop_after_bucket": i,
     "hang_in_bucket": i}), timeout_s.
    """
    try:
        from hotswap.trainer import DistributedWeightPusher, HttpEngineClient, WeightPushError, state_dict_manifest

        if spec.get("device", "cpu").startswith("cuda"):
            torch.cuda.set_device(torch.device(spec["device"]))
        weights = {k: v.to(spec.get("device", "cpu")) for k, v in checkpoint_tensors(spec["checkpoint"]).items()}
        bucket_bytes = bucket_bytes_for(weights, spec.get("buckets", 3))
        engines = [HttpEngineClient(url, timeout_s=60) for url in spec.get("base_urls") or [spec["base_url"]]]
        engine = engines[0]
        pusher = DistributedWeightPusher(engines, master_address="127.0.0.1", master_port=spec["master_port"], group_name=spec["group_name"],
                                         backend=spec.get("backend", "gloo"), bucket_bytes=bucket_bytes,
                                         load_format=spec.get("load_format", "flattened_bucket"),
                                         ranks_per_engine=spec.get("ranks_per_engine", 1), timeout_s=spec.get("timeout_s", 30))
        pusher.connect()
        events.put(("connected", {"pid": os.getpid(), "manifest": state_dict_manifest({k: v.cpu() for k, v in weights.items()})}))
        for job in spec.get("pushes", [{}]):
            sd = weights if not job.get("fault") else faulted(weights, bucket_bytes, *job["fault"])

            def progress(i, n, nbytes, job=job):
                events.put(("bucket", i))
                if job.get("sleep_after_bucket"):
                    time.sleep(job["sleep_after_bucket"])
                if job.get("stop_after_bucket") == i:
                    if job.get("hang_in_bucket"):  # announce the next bucket to the engine, never broadcast it
                        names = [n for n in weights][-1:]
                        threading.Thread(target=engine.update_weights_from_distributed, daemon=True, kwargs=dict(
                            names=names, dtypes=["float32"], shapes=[list(weights[names[0]].shape)], group_name=spec["group_name"],
                            load_format=spec.get("load_format", "flattened_bucket"))).start()
                        time.sleep(0.5)
                    events.put(("stopped", i))
                    time.sleep(3600)  # the test kills this process

            try:
                res = pusher.push(sd, weight_version=job.get("version"), progress=progress)
                events.put(("pushed", {"version": res.weight_version, "buckets": res.num_buckets, "tensors": res.num_tensors,
                                       "bytes": res.num_bytes, "elapsed_s": res.elapsed_s}))
            except WeightPushError as exc:
                events.put(("push_failed", {"reason": exc.reason, "rolled_back": exc.rolled_back, "group_broken": exc.group_broken,
                                             "received": [r.received for r in exc.results]}))
        closed = pusher.close()
        events.put(("closed", [r.success for r in closed]))
    except BaseException as exc:
        events.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


class TrainerProcess:
    """A `trainer_main` child and its event queue."""

    def __init__(self, spec: dict, target=trainer_main):
        self.events = CTX.Queue()
        self.process = CTX.Process(target=target, args=(spec, self.events), daemon=True)
        self.process.start()

    def expect(self, kind: str, timeout: float = 30.0):
        """Wait for the next event of `kind` (skipping others); fail on the child's error."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {kind!r} event from the trainer within {timeout} s")
            try:
                ev, payload = self.events.get(timeout=min(left, 0.5))
            except Exception:
                if not self.process.is_alive() and self.events.empty():
                    raise RuntimeError(f"trainer exited (code {self.process.exitcode}) before {kind!r}") from None
                continue
            if ev == "error":
                raise RuntimeError(f"trainer failed: {payload}")
            if ev == kind:
                return payload

    def kill(self) -> None:
        if self.process.is_alive():
            self.process.kill()
        self.process.join(10)

    def join(self, timeout: float = 30.0) -> int | None:
        self.process.join(timeout)
        return self.process.exitcode


def engine_main(spec: dict, events) -> None:
    """An engine in its own process behind the HTTP shim: reports ("ready", base_url), serves until
    `spec["stop"]` (an Event) is set, then reports ("checksums", {name: sha256}) and exits."""
    try:
        from hotswap import Engine

        with Engine(spec["checkpoint"], device="cpu", page_size=4) as engine:
            url, server = serve_engine_http(engine)
            events.put(("ready", url))
            spec["stop"].wait(120)
            events.put(("checksums", engine.check_weights("checksum").checksums))
            server.shutdown()
    except BaseException as exc:
        events.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


def ipc_trainer_main(spec: dict, events) -> None:
    """A trainer pushing by handle (IPCWeightPusher) to `spec["base_url"]`: shared memory for CPU tensors,
    CUDA IPC when spec["device"] is "cuda". Reports ("pushed", {..., "leftover_blocks": [...]}) or
    ("push_failed", {...}) per entry of spec["pushes"], then ("done", None)."""
    try:
        import hotswap.wire.ipc as ipc
        from hotswap.trainer import HttpEngineClient, IPCWeightPusher, WeightPushError

        created = []
        real_bucket = ipc.SharedMemoryBucket

        class Recording(real_bucket):
            def __init__(self, named, **kw):
                super().__init__(named, **kw)
                created.append(self.name)

        import hotswap.trainer.ipc as trainer_ipc

        trainer_ipc.SharedMemoryBucket = Recording
        device = spec.get("device", "cpu")
        weights = {k: v.to(device) for k, v in checkpoint_tensors(spec["checkpoint"]).items()}
        bucket_bytes = bucket_bytes_for(weights, spec.get("buckets", 3))
        pusher = IPCWeightPusher(HttpEngineClient(spec["base_url"], timeout_s=60), bucket_bytes=bucket_bytes)
        for job in spec.get("pushes", [{}]):
            sd = weights if not job.get("fault") else faulted(weights, bucket_bytes, *job["fault"])
            created.clear()
            try:
                res = pusher.push(sd, weight_version=job.get("version"))
                payload = {"version": res.weight_version, "buckets": res.num_buckets, "tensors": res.num_tensors, "bytes": res.num_bytes}
                kind = "pushed"
            except WeightPushError as exc:
                payload, kind = {"reason": exc.reason, "rolled_back": exc.rolled_back}, "push_failed"
            payload["blocks"] = list(created)
            payload["leftover_blocks"] = [n for n in created if os.path.exists(f"/dev/shm/{n.lstrip('/')}")]
            events.put((kind, payload))
        pusher.close()
        events.put(("done", None))
    except BaseException as exc:
        events.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise



def broadcaster_main(commands, events) -> None:
    """A bare trainer rank 0 driven by `commands`: ("join", port, group_name, timeout_s) creates a gloo group of
    two (leaving the previous one), ("send", tensors) broadcasts each tensor, None ends. Reports ("joined", name),
    ("sent", None) or ("failed", why) per command."""
    try:
        from datetime import timedelta

        import torch.distributed as dist

        from hotswap.wire.process_group import destroy_custom_process_group, init_custom_process_group, short_error

        pg = None
        while (cmd := commands.get()) is not None:
            try:
                if cmd[0] == "join":
                    _, port, name, timeout_s = cmd
                    old, pg = pg, None
                    if old is not None:
                        destroy_custom_process_group(old)
                    pg = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0,
                                                   group_name=name, timeout=timedelta(seconds=timeout_s))
                    events.put(("joined", name))
                else:
                    for t in cmd[1]:
                        dist.broadcast(t, src=0, group=pg)
                    events.put(("sent", None))
            except Exception as exc:
                events.put(("failed", short_error(exc)))
    except BaseException as exc:
        events.put(("error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
        raise


@contextmanager
def broadcaster() -> Iterator[tuple]:
    """A `broadcaster_main` trainer process: its (commands, events) queues; ended and reaped on exit."""
    commands, events = CTX.Queue(), CTX.Queue()
    trainer = CTX.Process(target=broadcaster_main, args=(commands, events), daemon=True)
    trainer.start()
    try:
        yield commands, events
    finally:
        commands.put(None)
        trainer.join(10)
        if trainer.is_alive():
            trainer.kill()


def join_broadcaster(engine, commands, events, name: str, timeout_s: float = 30) -> None:
    """The broadcaster (leaving its previous group) and `engine` make a gloo group of two named `name`."""
    from hotswap.trainer import free_port

    port = free_port()
    commands.put(("join", port, name, timeout_s))
    res = engine.init_weights_update_group("127.0.0.1", port, 1, 2, group_name=name, backend="gloo", timeout_s=timeout_s)
    assert res.success, res.message
    assert events.get(timeout=timeout_s) == ("joined", name)
