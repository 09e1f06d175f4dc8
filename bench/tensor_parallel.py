"""Tensor parallelism: decode throughput and greedy parity at TP=2 beside TP=1, and a trainer's distributed
push into TP=1 and TP=2 engines beside a plain broadcast of the same bytes, in one run.

    python bench/tensor_parallel.py --shape tiny --device cpu                  # CPU smoke run (gloo)
    python bench/tensor_parallel.py --shape qwen3-8b --out bench/results/tensor_parallel_h200x4.txt

GPUs: decode uses cuda:0 (TP=1) and cuda:0-1 (TP=2); the push runs the trainer on cuda:0 and engines from
cuda:1 (TP=1: cuda:1; TP=2: cuda:1-2), so the full run needs 3 GPUs (cases that do not fit are skipped and
say so). NCCL_NVLS_ENABLE=0 (and PyTorch's and NVSHMEM's multicast switches) are set before anything starts
NCCL: NVLink multicast stays off.

- decode: engines on random weights (`load_format="dummy"` draws each HF tensor whole, so every TP size
  holds the same model); with --hf, HF transformers' own random weights are pushed into each engine
  (`update_weights_from_tensor`, relayed to the workers under TP) and HF's `generate` runs beside them.
  Roofline per GPU: each decode step reads its share of the weights and of every sequence's KV (both split
  by TP) at the D2D copy bandwidth measured in the run. Greedy parity: sequences of TP=2 (and HF) equal to TP=1's, and the mean common
  prefix (bf16 sums in another order can flip a near-tie late in a sequence).
- push: the trainer (this process, rank 0) pushes a state_dict of the shape's tensors with
  `DistributedWeightPusher` (flattened buckets, one begin/end session per push) into an engine served by
  `hotswap serve --tp-size N` in a subprocess, every engine rank receiving the whole bucket; the ceiling is
  `torch.distributed.broadcast` of the same bucket sizes from the same trainer to receivers on the same
  devices, timed in the same run (bus bandwidth = bytes / time for a broadcast). Then the engine's checksum
  manifest is compared with the trainer's `state_dict_manifest`.
"""

from __future__ import annotations

import os

# NVLink multicast off before torch can start NCCL; inherited by every process started here
for _var, _off in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ.setdefault(_var, _off)

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
import urllib.request  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src"
sys.path.insert(0, str(SRC))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint, d2d_bytes_per_s, device_name, kv_bytes_per_token, print_table, timed  # noqa: E402

from hotswap import Engine  # noqa: E402
from hotswap.trainer import DistributedWeightPusher, HttpEngineClient, free_port, iter_buckets, state_dict_manifest  # noqa: E402
from hotswap.wire.process_group import init_custom_process_group  # noqa: E402

GB = 1e9
TABLES: list[str] = []


def table(title: str, header: list[str], rows: list[list]) -> None:
    TABLES.append(print_table(title, header, [[str(c) for c in r] for r in rows]))


def whole_weight_bytes(engine: Engine) -> int:
    """The whole model's bytes (under TP, rank 0's weight map holds its slices only)."""
    return sum(torch.Size(s.hf_shape).numel() * s.dtype.itemsize for s in engine.model_runner.weight_map.slots.values())


def roofline_tok_s(engine: Engine, tp: int, batch: int, prompt: int, output: int, bandwidth: float) -> float:
    step_bytes = (whole_weight_bytes(engine) + batch * (prompt + output / 2) * kv_bytes_per_token(engine)) / tp
    return batch / (step_bytes / bandwidth)


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def parity(outs: list[list[int]], ref: list[list[int]]) -> str:
    same = sum(a == b for a, b in zip(outs, ref))
    prefix = statistics.mean(common_prefix(a, b) for a, b in zip(outs, ref))
    return f"{same}/{len(ref)} seqs, prefix {prefix:.0f}/{len(ref[0])}"


# ---- decode --------------------------------------------------------------------------------------


def bench_decode(path: Path, device: torch.device, cases: list[tuple[int, int, int]], tps: list[int], use_hf: bool) -> None:
    on_gpu = device.type == "cuda"
    dtype = torch.bfloat16 if on_gpu else torch.float32
    hf = None
    if use_hf:
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype).eval()
    g = torch.Generator().manual_seed(0)
    prompts = {c: torch.randint(3, 500, (c[0], c[1]), generator=g).tolist() for c in cases}
    max_batch = max(b for b, _, _ in cases)
    num_pages = max(b * -(-(p + o + 1) // 16) for b, p, o in cases) + 64
    greedy: dict[tuple, list[list[int]]] = {}
    rows = []
    d2d = d2d_bytes_per_s(device) if on_gpu else float("nan")
    for tp in tps:
        engine = Engine(str(path), device=str(device), load_format="dummy", tensor_parallel_size=tp, max_running_requests=max_batch,
                        page_size=16, num_pages=num_pages)
        if hf is not None:
            res = engine.update_weights_from_tensor(list(hf.state_dict().items()))
            assert res.success, res.message
        for case in cases:
            batch, prompt, output = case
            sp = {"max_new_tokens": output, "temperature": 0, "ignore_eos": True}
            engine.generate(input_ids=prompts[case][:1], sampling_params=dict(sp, max_new_tokens=4))  # warm-up
            engine.flush_cache()
            outs, t = timed(lambda: engine.generate(input_ids=prompts[case], sampling_params=sp), on_gpu)
            engine.flush_cache()
            ids = [o["output_ids"] for o in outs]
            greedy.setdefault(case, ids)  # TP=1 runs first: the reference
            ours = batch * output / t
            roof = roofline_tok_s(engine, tp, batch, prompt, output, d2d) if on_gpu else float("nan")
            row = [tp, f"{batch}, {prompt}/{output}", f"{ours:,.0f}", f"{roof:,.0f}" if on_gpu else "-",
                   f"{100 * ours / roof:.1f}%" if on_gpu else "-", parity(ids, greedy[case])]
            if hf is not None and tp == tps[0]:
                kw = dict(max_new_tokens=output, min_new_tokens=output, do_sample=False, eos_token_id=None, pad_token_id=0)
                x = torch.tensor(prompts[case], device=device)
                with torch.no_grad():
                    hf.generate(x[:, :8], **dict(kw, max_new_tokens=4, min_new_tokens=4))
                    ref, t_hf = timed(lambda: hf.generate(x, **kw), on_gpu)
                ref_ids = ref[:, prompt:].tolist()
                row += [f"{batch * output / t_hf:,.0f}", parity(greedy[case], ref_ids)]
            elif hf is not None:
                row += ["", ""]
            rows.append(row)
        engine.shutdown()
    bw = f"{d2d / 1e12:.2f} TB/s" if on_gpu else "-"
    header = ["TP", "batch, prompt/output", "hotswap output tok/s", f"decode roofline tok/s (per-GPU share, {bw} D2D measured)", "% of roofline",
              "greedy = TP=1"] + (["HF tok/s (1 device)", "TP=1 greedy = HF"] if hf is not None else [])
    table(f"decode, {path.name}, {device_name(device)}, {dtype}, TP {tps}", header, rows)


# ---- push ----------------------------------------------------------------------------------------


def _raw_receiver(rank: int, world: int, port: int, backend: str, device: str, sizes: list[int], reps: int) -> None:
    """A receiving rank of the plain-broadcast ceiling: one buffer of the largest bucket, narrowed per bucket."""
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    pg = init_custom_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=rank,
                                   group_name="raw", timeout=timedelta(seconds=600))
    buf = torch.empty(max(sizes), dtype=torch.uint8, device=dev)
    done = torch.zeros(1, device=dev)
    for _ in range(reps):
        for n in sizes:
            torch.distributed.broadcast(buf[:n], src=0, group=pg)
        torch.distributed.all_reduce(done, group=pg)  # the trainer's clock stops once every rank holds every bucket
    if dev.type == "cuda":
        torch.cuda.synchronize()
    os._exit(0)  # skip tearing the group down


def raw_broadcast_s(sizes: list[int], devices: list[str], trainer: torch.device, backend: str, reps: int) -> float:
    """Median time to broadcast buckets of `sizes` bytes to one receiver per device."""
    import torch.multiprocessing as mp

    port, world = free_port(), len(devices) + 1
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_raw_receiver, args=(r, world, port, backend, d, sizes, reps), daemon=True) for r, d in enumerate(devices, 1)]
    for p in procs:
        p.start()
    pg = init_custom_process_group(backend=backend, init_method=f"tcp://127.0.0.1:{port}", world_size=world, rank=0, group_name="raw",
                                   timeout=timedelta(seconds=600))
    buf = torch.empty(max(sizes), dtype=torch.uint8, device=trainer).random_()
    done = torch.zeros(1, device=trainer)
    times = []
    for _ in range(reps):
        _, t = timed(lambda: [torch.distributed.broadcast(buf[:n], src=0, group=pg) for n in sizes] + [torch.distributed.all_reduce(done, group=pg)],
                     trainer.type == "cuda")
        times.append(t)
    for p in procs:
        p.join(60)
    torch.distributed.destroy_process_group(pg)
    return statistics.median(times[1:] if reps > 1 else times)


def serve_engine(engine_json: str, url_file: str) -> None:
    """The push section's engine process: an Engine (EngineConfig fields as JSON) behind the real HTTP app,
    until SIGTERM. Writes its base URL to `url_file` once it serves."""
    import signal
    import threading

    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    engine = Engine(**json.loads(engine_json))
    srv = ServerThread(create_app(engine), log_level="error").start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    Path(url_file).write_text(srv.url)
    stop.wait()
    srv.stop()
    engine.shutdown()


def start_engine(engine_kw: dict) -> tuple[subprocess.Popen, str]:
    """`serve_engine` in a subprocess; returns (process, base url) once /health answers."""
    url_file = Path(tempfile.mkdtemp()) / "url"
    cmd = [sys.executable, __file__, "--serve-engine", json.dumps(engine_kw), "--url-file", str(url_file)]
    proc = subprocess.Popen(cmd, env=dict(os.environ, PYTHONPATH=f"{SRC}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"))
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine process exited with code {proc.returncode} ({engine_kw})")
        if url_file.exists():
            url = url_file.read_text()
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return proc, url
            except OSError:
                pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"the engine did not answer /health within 900 s ({engine_kw})")
        time.sleep(0.5)


def push_state_dict(path: Path, device: torch.device) -> dict[str, torch.Tensor]:
    """Random tensors with the checkpoint's HF names and shapes, in the engine's dtype (a trainer's state_dict)."""
    from hotswap.config import EngineConfig, model_config_for
    from hotswap.models.decoder import CausalLM
    from hotswap.weights.mapping import WeightMap

    mc = model_config_for(EngineConfig(model_path=str(path)))
    with torch.device("meta"):
        wm = WeightMap(CausalLM(mc))
    g = torch.Generator(device=device).manual_seed(1)
    return {n: torch.empty(wm.slots[n].hf_shape, dtype=mc.torch_dtype, device=device).normal_(0, 0.02, generator=g) for n in wm.names}


# (label, engine config beyond the defaults, push modes): rollback protection is what the engine adds to the transfer
PUSH_CONFIGS = [
    ("originals: 1 GiB on the GPU, the rest in pinned host memory (defaults)", {}, (True, False)),
    ("originals kept on the GPU (rollback_device_budget_bytes = model)", {"rollback_device_budget_bytes": None}, (True,)),
]


def bench_push(path: Path, device: torch.device, bucket_bytes: int, reps: int) -> None:
    on_gpu = device.type == "cuda"
    trainer = torch.device("cuda", 0) if on_gpu else torch.device("cpu")
    backend = "nccl" if on_gpu else "gloo"
    if on_gpu:
        torch.cuda.set_device(trainer)
    sd = push_state_dict(path, trainer)
    nbytes = sum(t.numel() * t.element_size() for t in sd.values())
    largest = max(t.numel() * t.element_size() for t in sd.values())  # travels alone when over bucket_bytes
    sizes = [sum(t.numel() * t.element_size() for _, t in b) for b in iter_buckets(list(sd.items()), bucket_bytes)]
    manifest = state_dict_manifest({k: v.cpu() for k, v in sd.items()})
    gpus = torch.cuda.device_count() if on_gpu else 0
    rows = []
    for tp in (1, 2):
        devices = [f"cuda:{1 + r}" for r in range(tp)] if on_gpu else ["cpu"] * tp
        if on_gpu and 1 + tp > gpus:
            rows.append([tp, ", ".join(devices), "-", "-", "-", "-", "-", "-", f"skipped: needs {1 + tp} GPUs, {gpus} visible"])
            continue
        raw = raw_broadcast_s(sizes, devices, trainer, backend, reps + 1)
        for k, (label, extra, modes) in enumerate(PUSH_CONFIGS):
            engine_kw = {"model_path": str(path), "device": devices[0], "tensor_parallel_size": tp, "load_format": "dummy", "num_pages": 64,
                         "weight_update_bucket_bytes": max(bucket_bytes, largest),
                         **{key: (nbytes if v is None else v) for key, v in extra.items()}}
            proc, url = start_engine(engine_kw)
            try:
                client = HttpEngineClient(url, timeout_s=3600)
                for sessions in modes:
                    pusher = DistributedWeightPusher([client], master_port=free_port(), group_name=f"bench-push-{k}-{sessions}", backend=backend,
                                                     ranks_per_engine=tp, bucket_bytes=bucket_bytes, device=trainer, timeout_s=600,
                                                     use_sessions=sessions)
                    pusher.connect()
                    pusher.push(sd, weight_version="warm-up")  # first use of the communicators, the host arena
                    times = [pusher.push(sd, weight_version=f"push-{i}").elapsed_s for i in range(reps)]
                    pusher.close()
                    check = client.check_weights("checksum", expected=manifest) if k == 0 and sessions else None
                    t = statistics.median(times)
                    mode = "one session per push" if sessions else "each bucket atomic alone"
                    verdict = "-" if check is None else "manifest = trainer's" if check.success else f"MISMATCH: {check.message}"
                    rows.append([tp, ", ".join(devices), f"{mode}; {label}", f"{nbytes / GB:.2f}", f"{t * 1e3:,.1f}", f"{nbytes / t / GB:,.2f}",
                                 f"{nbytes / raw / GB:,.2f}", f"{100 * raw / t:.0f}%", verdict])
            finally:
                proc.terminate()
                proc.wait(120)
    table(f"distributed push, {path.name}, trainer {device_name(trainer)} -> engines ({backend}, flattened {bucket_bytes >> 20} MiB buckets, "
          f"{len(sizes)} buckets, median of {reps})",
          ["TP", "engine devices", "push", "GB", "push ms", "push GB/s", "plain broadcast GB/s (bus bw)", "% of plain broadcast", "checksums"], rows)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu")
    ap.add_argument("--sections", default="decode,push")
    ap.add_argument("--cases", default=None, help="BATCHxPROMPTxOUTPUT,... (default by device)")
    ap.add_argument("--hf", action=argparse.BooleanOptionalAction, default=True, help="HF transformers beside TP=1 (default on)")
    ap.add_argument("--bucket-mb", type=int, default=1024, help="trainer bucket size (the engine's limit is raised to fit the largest tensor)")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default=None, help="append the tables to this file")
    ap.add_argument("--serve-engine", default=None, help=argparse.SUPPRESS)  # internal: the push section's engine process
    ap.add_argument("--url-file", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve_engine:
        serve_engine(args.serve_engine, args.url_file)
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device))
    on_gpu = device.type == "cuda"
    cases = [tuple(int(x) for x in c.split("x")) for c in (args.cases or ("1x128x128,32x128x256,128x128x256" if on_gpu else "1x16x16,4x24x16")).split(",")]
    max_pos = max(p + o for _, p, o in cases) + 16
    path = config_only_checkpoint(Path(tempfile.mkdtemp()) / args.shape, args.shape, "bfloat16" if on_gpu else "float32",
                                  max_positions=max(max_pos, 1024))
    sections = set(args.sections.split(","))
    if "decode" in sections:
        tps = [1, 2] if not on_gpu or torch.cuda.device_count() >= 2 else [1]
        bench_decode(path, device, cases, tps, args.hf)
    if "push" in sections:
        bench_push(path, device, args.bucket_mb << 20, args.reps)
    if args.out:
        with open(args.out, "a") as f:
            f.write("\n\n".join(TABLES) + "\n\n")


if __name__ == "__main__":
    main()
