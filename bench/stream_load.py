"""Many concurrent clients: the same workload offline (`Engine.generate`), over HTTP streaming and over HTTP
non-streaming native `/generate`, in one run, with the ratio of each HTTP time to the offline time.

The engine and its server live in this process; the clients run in a separate process (as real clients
would), so their JSON/SSE parsing does not share this process's GIL with the scheduler.

    python bench/stream_load.py --shape tiny --clients 128 --tokens 64                 # CPU
    python bench/stream_load.py --shape qwen3-0.6b --clients 512 --tokens 256 --stream-interval 1
    py-spy record --threads -f raw -o stream.txt -- python bench/stream_load.py --modes stream   # where the time goes
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import config_only_checkpoint, device_name  # noqa: E402

from hotswap import Engine  # noqa: E402
from hotswap.server.app import create_app  # noqa: E402
from hotswap.server.launch import ServerThread  # noqa: E402


def _client_run(url: str, prompts: list[list[int]], params: dict, stream: bool, conn) -> None:
    """In the client process: one request per prompt, all at once; sends back (seconds, tokens, chunks)."""
    import httpx

    async def one(client: httpx.AsyncClient, ids: list[int]) -> tuple[int, int]:
        body = {"input_ids": ids, "sampling_params": params, "stream": stream}
        if not stream:
            r = await client.post("/generate", json=body)
            r.raise_for_status()
            return r.json()["meta_info"]["completion_tokens"], 1
        tokens = chunks = 0
        async with client.stream("POST", "/generate", json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    out = json.loads(line[6:])
                    if "error" in out:
                        raise RuntimeError(out["error"])
                    tokens += len(out["delta_output_ids"])
                    chunks += 1
        return tokens, chunks

    async def main() -> tuple[float, int, int]:
        limits = httpx.Limits(max_connections=len(prompts) + 8, max_keepalive_connections=len(prompts) + 8)
        async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
            start = time.perf_counter()
            results = await asyncio.gather(*(one(client, ids) for ids in prompts))
            return time.perf_counter() - start, sum(t for t, _ in results), sum(c for _, c in results)

    conn.send(asyncio.run(main()))
    conn.close()


def over_http(url: str, prompts: list[list[int]], params: dict, stream: bool) -> tuple[float, int, int]:
    parent, child = mp.Pipe(duplex=False)
    proc = mp.get_context("spawn").Process(target=_client_run, args=(url, prompts, params, stream, child))
    proc.start()
    result = parent.recv()
    proc.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny")
    ap.add_argument("--clients", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=64, help="output tokens per request (ignore_eos)")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--stream-interval", type=int, default=1)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--modes", default="nonstream,stream", help="HTTP runs beside the offline one: nonstream, stream")
    args = ap.parse_args()

    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else "cpu" if args.device == "auto" else args.device)
    on_gpu = device.type == "cuda"
    tmp = Path(tempfile.mkdtemp(prefix="hotswap-stream-"))
    path = config_only_checkpoint(tmp / args.shape, args.shape, "bfloat16" if on_gpu else "float32", max_positions=1024)
    engine = Engine(str(path), device=str(device), load_format="dummy", max_running_requests=max(args.clients, 8),
                    **({"stream_interval": args.stream_interval} if args.stream_interval != 1 else {}),
                    **({} if on_gpu else {"page_size": 4, "num_pages": 4096}))
    rng = random.Random(0)
    vocab = engine.model_config.vocab_size
    prompts = [[rng.randrange(1, vocab) for _ in range(args.prompt_len)] for _ in range(args.clients)]
    params = {"max_new_tokens": args.tokens, "temperature": 0, "ignore_eos": True}
    expected = args.clients * args.tokens
    engine.generate(input_ids=prompts, sampling_params=params)  # warm-up (graphs, allocator)

    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    offline = time.perf_counter() - start
    assert sum(o["meta_info"]["completion_tokens"] for o in outs) == expected

    modes = args.modes.split(",")
    rows = [("offline Engine.generate", offline)]
    with ServerThread(create_app(engine)) as srv:
        over_http(srv.url, prompts[:8], params, True)  # warm-up the server path
        if "nonstream" in modes:
            secs, tokens, _ = over_http(srv.url, prompts, params, False)
            assert tokens == expected, (tokens, expected)
            rows.append(("HTTP /generate non-streaming", secs))
        if "stream" in modes:
            secs, tokens, chunks = over_http(srv.url, prompts, params, True)
            assert tokens == expected, (tokens, expected)
            rows.append((f"HTTP /generate streaming ({chunks} chunks)", secs))
    engine.shutdown()

    print(f"# stream_load on {device_name(device)}: shape {args.shape}, {args.clients} clients x {args.tokens} tokens "
          f"(prompt {args.prompt_len}), stream_interval {args.stream_interval}")
    print("| mode | seconds | output tok/s | / offline |")
    print("|---|---|---|---|")
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} | {expected / secs:,.0f} | {secs / offline:.2f}x |")


if __name__ == "__main__":
    main()
