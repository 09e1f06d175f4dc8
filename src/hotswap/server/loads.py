"""SGLang's /v1/loads reply (entrypoints/v1_loads.py::get_loads over managers/load_snapshot.py::LoadSnapshot.to_dict),
built from the engine's LoadOutput for its one DP rank: the query (`include`, `dp_rank`, `format`), each rank's core
fields and sections, the envelope, and the Prometheus text form."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone

from hotswap import protocol as p
from hotswap.server.http_utils import APIError

SECTIONS = frozenset({"core", "memory", "spec", "lora", "disagg", "queues", "all"})  # SGLang's VALID_SECTIONS
# a section's key in an entry -> its `include` name, and its Prometheus prefix (SGLang's section_prefixes)
_SECTION_NAMES = {"memory": "memory", "speculative": "spec", "lora": "lora", "disaggregation": "disagg", "queues": "queues"}


@dataclass(frozen=True, slots=True)
class LoadsQuery:
    include: frozenset[str] | None  # None: every section (SGLang's default, "all")
    dp_rank: int | None  # only this rank; a rank the server does not have gives no entries (SGLang's rule)
    prometheus: bool  # format=prometheus: the text exposition form instead of JSON


def parse_query(include: str | None, dp_rank: str | None, fmt: str | None) -> LoadsQuery:
    """SGLang's query: include is comma-separated; an unknown section is a 400 naming it."""
    sections = None
    if include:
        sections = frozenset(s.strip() for s in include.split(","))
        if not sections <= SECTIONS:
            raise APIError(400, f"Invalid include sections: {sorted(sections - SECTIONS)}. Valid options: {sorted(SECTIONS)}", param="include")
    rank = None
    if dp_rank is not None:
        try:
            rank = int(dp_rank)
        except ValueError:
            raise APIError(400, f"dp_rank must be an integer, got {dp_rank!r}", param="dp_rank") from None
    return LoadsQuery(include=sections, dp_rank=rank, prometheus=fmt == "prometheus")


@dataclass(frozen=True, slots=True)
class TokenLoad:
    """The token counts SGLang's load routes report (ServerState.sglang_load)."""

    used: int  # KV tokens in use
    total: int  # in use plus still to prefill (what SGLang's DP balancing and router read)
    capacity: int  # the KV cache's size in tokens


def entry(load: p.LoadOutput, tokens: TokenLoad, query: LoadsQuery) -> dict:
    """One DP rank's dict: SGLang's core keys (LoadSnapshot._CORE_KEYS; `num_total_reqs` from its earlier reply),
    hotswap's beside them, then the sections asked for that this engine has (no speculative decoding, LoRA or memory
    breakdown here: those are left out, as SGLang leaves out a section it has no value for)."""
    out = {
        "dp_rank": 0, "num_running_reqs": load.num_running, "num_waiting_reqs": load.num_waiting,
        # a waiting request's prefix-cache hit is found only at admission: all its tokens still to compute count
        "num_waiting_uncached_tokens": load.num_waiting_tokens,
        "num_used_tokens": tokens.used, "num_total_tokens": tokens.total, "max_total_num_tokens": tokens.capacity,
        "max_running_requests": load.max_running_requests,
        "token_usage": round(tokens.used / tokens.capacity, 4) if tokens.capacity else 0.0,
        "gen_throughput": load.gen_throughput, "cache_hit_rate": load.cache_hit_rate, "utilization": load.utilization,
        "num_total_reqs": load.num_running + load.num_waiting,
        "num_reqs": load.num_running + load.num_waiting, "weight_version": load.weight_version, "timestamp": time.time(),
    }
    wanted = query.include is None or "all" in query.include
    sections = {
        "disaggregation": {"mode": "null", "prefill_bootstrap_queue_reqs": 0, "prefill_inflight_queue_reqs": 0,
                           "decode_prealloc_queue_reqs": 0, "decode_transfer_queue_reqs": 0, "decode_retracted_queue_reqs": 0,
                           "kv_transfer_speed_gb_s": 0.0, "kv_transfer_latency_ms": 0.0},
        # paused: the requests a pause_generation holds (running in place and queued); grammar: no grammar queue here
        "queues": {"waiting": load.num_waiting, "grammar": 0, "paused": load.num_running + load.num_waiting if load.paused else 0,
                   "retracted": load.num_retracted},
    }
    for key, section in sections.items():
        if wanted or _SECTION_NAMES[key] in query.include:
            out[key] = section
    return out


def aggregate(loads: list[dict]) -> dict:
    """SGLang's earlier reply's `aggregate` (v1_loads.py::_compute_aggregate)."""
    n = len(loads)
    return {
        "total_running_reqs": sum(d["num_running_reqs"] for d in loads),
        "total_waiting_reqs": sum(d["num_waiting_reqs"] for d in loads),
        "total_reqs": sum(d["num_running_reqs"] + d["num_waiting_reqs"] for d in loads),
        "avg_token_usage": round(sum(d["token_usage"] for d in loads) / n, 4) if n else 0.0,
        "avg_throughput": round(sum(d["gen_throughput"] for d in loads) / n, 2) if n else 0.0,
        "avg_utilization": round(sum(d["utilization"] for d in loads) / n, 4) if n else 0.0,
    }


def envelope(loads: list[dict], *, version: str, accelerator: str | None, num_accelerators: int) -> dict:
    """The reply: SGLang's current keys (timestamp as UTC ISO 8601, version, accelerator, num_accelerators, loads) and
    its earlier ones (dp_rank_count, aggregate), which older clients read."""
    return {"timestamp": datetime.now(timezone.utc).isoformat(), "version": version, "accelerator": accelerator,
            "num_accelerators": num_accelerators, "dp_rank_count": len(loads), "loads": loads, "aggregate": aggregate(loads)}


def prometheus(loads: list[dict]) -> str:
    """SGLang's format=prometheus: a gauge per numeric field, `sglang_<key>` (a section's `sglang_<section>_<key>`),
    labelled by dp_rank."""
    samples: dict[str, list[tuple[int, float]]] = {}
    for load in loads:
        rank = load["dp_rank"]
        for key, value in load.items():
            if isinstance(value, dict):
                for sub, v in value.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        samples.setdefault(f"sglang_{_SECTION_NAMES.get(key, key)}_{sub}", []).append((rank, v))
            elif key not in ("dp_rank", "timestamp") and isinstance(value, (int, float)) and not isinstance(value, bool):
                samples.setdefault(f"sglang_{key}", []).append((rank, value))
    lines = []
    for name, rows in samples.items():
        lines.append(f"# TYPE {name} gauge")
        lines += [f'{name}{{dp_rank="{rank}"}} {value}' for rank, value in rows]
    return "\n".join(lines) + "\n"
