"""The HTTP clients of bench/rollout.py, in their own process: reads {url, path, jobs, mode, concurrency}
as JSON on stdin, runs every job through `--concurrency` connections (asyncio + httpx), and writes
{start, end, tokens, cpu_s} (wall-clock seconds, completion tokens counted by the server, this process's CPU
seconds) as JSON on stdout. Streams count from their last chunk (native meta_info, or OpenAI usage with
include_usage). A client process whose CPU time is close to its wall time is the bound, not the server."""

from __future__ import annotations

import asyncio
import json
import sys
import time


def _request_body(path: str, ids: list[int], sp: dict, mode: str, model: str) -> tuple[str, dict]:
    stream = path.endswith("-stream")
    if path.startswith("generate"):
        return "/generate", {"input_ids": ids, "sampling_params": sp, "return_logprob": mode == "sampled", "stream": stream}
    body = {"model": model, "prompt": ids, "max_tokens": sp["max_new_tokens"], "temperature": sp["temperature"],
            "ignore_eos": True, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    if mode == "sampled":
        body.update(seed=sp["seed"], logprobs=0)
    return "/v1/completions", body


async def _clients(url: str, path: str, jobs: list[tuple[list[int], dict]], mode: str, concurrency: int) -> dict:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(3600.0), limits=limits) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        gate = asyncio.Semaphore(concurrency)
        start = time.time()

        def tokens_of(out: dict) -> int:
            return out["meta_info"]["completion_tokens"] if "meta_info" in out else out["usage"]["completion_tokens"]

        async def one(ids: list[int], sp: dict) -> int:
            route, body = _request_body(path, ids, sp, mode, model)
            async with gate:
                if not body["stream"]:
                    r = await client.post(route, json=body)
                    r.raise_for_status()
                    return tokens_of(r.json())
                last = None
                async with client.stream("POST", route, json=body) as r:
                    r.raise_for_status()
                    async for line in r.aiter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            last = line
                return tokens_of(json.loads(last[len("data: "):]))  # the last chunk: meta_info / usage

        counts = await asyncio.gather(*(one(ids, sp) for ids, sp in jobs))
        return {"start": start, "end": time.time(), "tokens": sum(counts)}


def main() -> None:
    order = json.load(sys.stdin)
    cpu = time.process_time()
    res = asyncio.run(_clients(order["url"], order["path"], order["jobs"], order["mode"], order["concurrency"]))
    res["cpu_s"] = time.process_time() - cpu
    json.dump(res, sys.stdout)


if __name__ == "__main__":
    main()
