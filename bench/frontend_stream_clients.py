"""The clients of bench/frontend_stream.py, in their own process (stdlib only, so they start at once): reads
{host, port, route, bodies} as JSON on stdin, sends every body at once, each over its own connection (raw
HTTP/1.1, `Connection: close`), reads each reply to its end without parsing it but its last event, and writes
{start, end, tokens, events, cpu_s} as JSON on stdout (tokens: the last event's count; events: data events)."""

from __future__ import annotations

import asyncio
import json
import sys
import time


async def _one(host: str, port: int, route: str, body: dict) -> tuple[int, int]:
    """One streaming request over its own connection; returns (tokens by the last event, data events)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(f"POST {route} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\nContent-Length: {len(payload)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + payload)
    raw = bytearray()
    while data := await reader.read(1 << 16):
        raw += data
    writer.close()
    events = raw.count(b"data: ") - raw.count(b"data: [DONE]")
    end = raw.rfind(b"\n\n", 0, raw.rfind(b"data: [DONE]"))
    last = json.loads(raw[raw.rfind(b"data: ", 0, end) + 6 : end])
    tokens = last["meta_info"]["completion_tokens"] if "meta_info" in last else last["usage"]["completion_tokens"]
    return tokens, events


def main() -> None:
    order = json.load(sys.stdin)

    async def run() -> list:
        return await asyncio.gather(*(_one(order["host"], order["port"], order["route"], b) for b in order["bodies"]))

    cpu, start = time.process_time(), time.time()
    res = asyncio.run(run())
    json.dump({"start": start, "end": time.time(), "tokens": sum(t for t, _ in res), "events": sum(e for _, e in res),
               "cpu_s": time.process_time() - cpu}, sys.stdout)


if __name__ == "__main__":
    main()
