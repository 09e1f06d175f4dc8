"""Prometheus text-format metrics: counters kept by the routes, gauges read from the engine's load.

No prometheus_client dependency: the exposition format is a few lines of text. Beside hotswap's own families
the same facts are exported under SGLang's (`sglang:num_running_reqs`...) and vLLM's (`vllm:num_requests_running`,
`vllm:cache_config_info`...) names, which RL frameworks scrape (miles' dashboard, prime-rl's concurrency
controller; docs/framework_calls.md).
"""

from __future__ import annotations

import math
import threading
from collections import defaultdict

# seconds; weight updates range from milliseconds (tiny models, one bucket) to minutes (large disk loads)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, math.inf)
# seconds; SGLang's default buckets of sglang:e2e_request_latency_seconds (metrics/collector.py, TokenizerMetricsCollector)
E2E_BUCKETS = (0.1, 0.2, 0.4, 0.6, 0.8, 1.0, 2.0, 4.0, 6.0, 8.0, 10.0, 20.0, 40.0, 60.0, 80.0, 100.0, 200.0, 400.0, 800.0, math.inf)


_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})


def _escape(value: str) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items()) + "}"


def _num(x: float) -> str:
    if x == math.inf:
        return "+Inf"
    return repr(float(x)) if isinstance(x, float) else str(x)


def _observe(buckets: list[int], bounds: tuple[float, ...], value: float) -> None:
    """Count `value` in every cumulative bucket it falls under."""
    for i, bound in enumerate(bounds):
        if value <= bound:
            buckets[i] += 1


def _histogram(lines: list[str], name: str, labels: dict, bounds: tuple[float, ...], buckets: list[int], total: float, count: int) -> None:
    """One labelled histogram's samples: its cumulative buckets, sum and count."""
    for bound, n in zip(bounds, buckets):
        lines.append(f"{name}_bucket{_labels(**labels, le=_num(bound))} {n}")
    lines.append(f"{name}_sum{_labels(**labels)} {_num(total)}")
    lines.append(f"{name}_count{_labels(**labels)} {count}")


class Metrics:
    """Thread-safe counters the HTTP layer updates; `render(load)` writes the exposition text."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.http_requests: dict[tuple[str, str, int], int] = defaultdict(int)  # (method, route, status)
        self.generation_requests: dict[str, int] = defaultdict(int)  # route -> engine requests (one per choice)
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.cached_tokens = 0  # prompt tokens served from the prefix cache
        self.finished_requests = 0
        self.aborted_requests = 0
        self.disconnects = 0
        self.weight_updates: dict[tuple[str, str], int] = defaultdict(int)  # (route, result)
        self.weight_update_buckets: dict[str, list[int]] = {}
        self.weight_update_sum: dict[str, float] = defaultdict(float)
        self.weight_update_count: dict[str, int] = defaultdict(int)
        self.e2e_buckets = [0] * len(E2E_BUCKETS)  # finished requests' meta_info e2e_latency, cumulative per bound
        self.e2e_sum = 0.0
        self.e2e_count = 0

    # ---- updates -----------------------------------------------------------------------------------

    def observe_http(self, method: str, route: str, status: int) -> None:
        """Count one request. `route` is the matched route's path or one of a few fixed words ('unmatched'...);
        methods outside HTTP's standard ones count as 'OTHER', so clients cannot grow the label set."""
        method = method if method in _HTTP_METHODS else "OTHER"
        with self._lock:
            self.http_requests[(method, route, int(status))] += 1

    def observe_generation(self, route: str, outputs: list[dict]) -> None:
        """Count the engine requests behind one HTTP call and their tokens, from the final output dicts."""
        with self._lock:
            for out in outputs:
                meta = out.get("meta_info", {})
                self.generation_requests[route] += 1
                self.prompt_tokens += int(meta.get("prompt_tokens") or 0)
                self.completion_tokens += int(meta.get("completion_tokens") or 0)
                self.cached_tokens += int(meta.get("cached_tokens") or 0)
                self.finished_requests += 1
                reason = meta.get("finish_reason") or {}
                if reason.get("type") == "abort":
                    self.aborted_requests += 1
                if meta.get("e2e_latency") is not None:
                    _observe(self.e2e_buckets, E2E_BUCKETS, float(meta["e2e_latency"]))
                    self.e2e_sum += float(meta["e2e_latency"])
                    self.e2e_count += 1

    def observe_disconnect(self) -> None:
        with self._lock:
            self.disconnects += 1

    def observe_weight_update(self, route: str, success: bool, seconds: float) -> None:
        with self._lock:
            self.weight_updates[(route, "success" if success else "failure")] += 1
            if not success:
                return
            _observe(self.weight_update_buckets.setdefault(route, [0] * len(DURATION_BUCKETS)), DURATION_BUCKETS, seconds)
            self.weight_update_sum[route] += seconds
            self.weight_update_count[route] += 1

    # ---- several front end processes: each counts its own, a scrape shows the sum --------------------

    def snapshot(self) -> dict:
        """Every counter as JSON-able data (`absorb` adds one into another Metrics)."""
        with self._lock:
            return {"http_requests": [[m, r, s, v] for (m, r, s), v in self.http_requests.items()],
                    "generation_requests": dict(self.generation_requests),
                    "totals": [self.prompt_tokens, self.completion_tokens, self.cached_tokens, self.finished_requests,
                               self.aborted_requests, self.disconnects],
                    "weight_updates": [[r, res, v] for (r, res), v in self.weight_updates.items()],
                    "weight_update_buckets": {r: list(b) for r, b in self.weight_update_buckets.items()},
                    "weight_update_sum": dict(self.weight_update_sum), "weight_update_count": dict(self.weight_update_count),
                    "e2e": [list(self.e2e_buckets), self.e2e_sum, self.e2e_count]}

    def absorb(self, snap: dict) -> None:
        """Add the counters of a `snapshot` (another front end process's) to these."""
        with self._lock:
            for m, r, s, v in snap["http_requests"]:
                self.http_requests[(m, r, int(s))] += int(v)
            for r, v in snap["generation_requests"].items():
                self.generation_requests[r] += int(v)
            prompt, completion, cached, finished, aborted, disconnects = map(int, snap["totals"])
            self.prompt_tokens += prompt
            self.completion_tokens += completion
            self.cached_tokens += cached
            self.finished_requests += finished
            self.aborted_requests += aborted
            self.disconnects += disconnects
            for r, res, v in snap["weight_updates"]:
                self.weight_updates[(r, res)] += int(v)
            for r, counts in snap["weight_update_buckets"].items():
                mine = self.weight_update_buckets.setdefault(r, [0] * len(DURATION_BUCKETS))
                for i, c in enumerate(counts[: len(mine)]):
                    mine[i] += int(c)
            for r, v in snap["weight_update_sum"].items():
                self.weight_update_sum[r] += float(v)
            for r, v in snap["weight_update_count"].items():
                self.weight_update_count[r] += int(v)
            buckets, total, count = snap["e2e"]
            for i, c in enumerate(buckets[: len(self.e2e_buckets)]):
                self.e2e_buckets[i] += int(c)
            self.e2e_sum += float(total)
            self.e2e_count += int(count)

    # ---- exposition --------------------------------------------------------------------------------

    def render(self, load=None, model_name: str = "", page_size: int = 1) -> str:
        """`load` is the engine's LoadOutput (None when the engine could not answer); `page_size`: tokens per
        KV page (vLLM's block_size)."""
        lines: list[str] = []

        def family(name: str, kind: str, help_: str, samples: list[tuple[dict, float]]) -> None:
            lines.append(f"# HELP {name} {help_}")
            lines.append(f"# TYPE {name} {kind}")
            for labels, value in samples:
                lines.append(f"{name}{_labels(**labels)} {_num(value)}")

        with self._lock:
            family("hotswap_http_requests_total", "counter", "HTTP requests by method, route and status code.",
                   [({"method": m, "route": r, "status": str(s)}, v) for (m, r, s), v in sorted(self.http_requests.items())])
            family("hotswap_generation_requests_total", "counter", "Engine generation requests (one per choice) by route.",
                   [({"route": r}, v) for r, v in sorted(self.generation_requests.items())])
            family("hotswap_prompt_tokens_total", "counter", "Prompt tokens of finished generation requests.", [({}, self.prompt_tokens)])
            family("hotswap_generation_tokens_total", "counter", "Generated tokens of finished generation requests.",
                   [({}, self.completion_tokens)])
            family("hotswap_aborted_requests_total", "counter", "Generation requests that finished aborted.", [({}, self.aborted_requests)])
            family("hotswap_client_disconnects_total", "counter", "Clients that went away before their request finished.",
                   [({}, self.disconnects)])
            family("hotswap_weight_updates_total", "counter", "Weight-update calls by route and result.",
                   [({"route": r, "result": res}, v) for (r, res), v in sorted(self.weight_updates.items())])
            lines.append("# HELP hotswap_weight_update_duration_seconds Wall time of successful weight-update calls.")
            lines.append("# TYPE hotswap_weight_update_duration_seconds histogram")
            for route in sorted(self.weight_update_buckets):
                _histogram(lines, "hotswap_weight_update_duration_seconds", {"route": route}, DURATION_BUCKETS,
                           self.weight_update_buckets[route], self.weight_update_sum[route], self.weight_update_count[route])

        family("hotswap_engine_up", "gauge", "1 when the engine answered the load query.", [({}, 0 if load is None else 1)])
        if load is not None:
            total = load.kv_pages_total or 0
            family("hotswap_num_running_requests", "gauge", "Requests in the running batch.", [({}, load.num_running)])
            family("hotswap_num_waiting_requests", "gauge", "Queue depth: requests waiting for admission (or for a weight update).",
                   [({}, load.num_waiting)])
            family("hotswap_kv_pages_used", "gauge", "KV-cache pages in use (requests and prefix cache).", [({}, load.kv_pages_used)])
            family("hotswap_kv_pages_total", "gauge", "KV-cache pages in the pool.", [({}, total)])
            family("hotswap_kv_cache_usage_ratio", "gauge", "Fraction of KV-cache pages in use.",
                   [({}, (load.kv_pages_used / total) if total else 0.0)])
            family("hotswap_generation_paused", "gauge", "1 while generation is held (paused or inside a weight-update session).",
                   [({}, int(bool(load.paused)))])
            family("hotswap_weight_version_info", "gauge", "The weight version the engine serves (value is always 1).",
                   [({"version": load.weight_version, "model": model_name}, 1)])
        self._render_sglang(family, lines, load, model_name, page_size)
        self._render_vllm(family, load, model_name, page_size)
        return "\n".join(lines) + "\n"

    def _render_sglang(self, family, lines: list[str], load, model_name: str, page_size: int) -> None:
        """SGLang's names (srt/metrics/collector.py), read by miles' dashboard (`sglang_scraper.py`, which also keeps
        `sglang:e2e_request_latency_seconds` _sum and _count)."""
        labels = {"model_name": model_name, "engine_type": "unified"}
        with self._lock:
            lines.append("# HELP sglang:e2e_request_latency_seconds Histogram of end-to-end request latency in seconds.")
            lines.append("# TYPE sglang:e2e_request_latency_seconds histogram")
            _histogram(lines, "sglang:e2e_request_latency_seconds", labels, E2E_BUCKETS, self.e2e_buckets, self.e2e_sum, self.e2e_count)
            counters = [("prompt_tokens_total", "Prompt tokens.", self.prompt_tokens),
                        ("generation_tokens_total", "Generated tokens.", self.completion_tokens),
                        ("cached_tokens_total", "Prompt tokens served from the prefix cache.", self.cached_tokens),
                        ("num_requests_total", "Finished requests.", self.finished_requests),
                        ("num_aborted_requests_total", "Requests that finished aborted.", self.aborted_requests)]
            hit_rate = self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
        for name, help_, value in counters:
            family(f"sglang:{name}", "counter", help_, [(labels, value)])
        if load is None:
            return
        used, total = load.kv_pages_used * page_size, (load.kv_pages_total or 0) * page_size
        for name, help_, value in (("num_running_reqs", "Running requests.", load.num_running),
                                   ("num_queue_reqs", "Queued requests.", load.num_waiting),
                                   ("num_used_tokens", "KV-cache tokens in use.", used),
                                   ("token_usage", "Fraction of KV-cache tokens in use.", used / total if total else 0.0),
                                   ("cache_hit_rate", "Prefix-cache hit rate (cached / prompt tokens, since start).", hit_rate),
                                   ("gen_throughput", "Generation throughput (tokens/s) over the latest steps; 0 while idle.",
                                    load.gen_throughput),
                                   ("utilization", "max(running / max_running_requests, token_usage / 0.9).", load.utilization)):
            family(f"sglang:{name}", "gauge", help_, [(labels, value)])

    def _render_vllm(self, family, load, model_name: str, page_size: int) -> None:
        """vLLM's names (v1/metrics/loggers.py), read by prime-rl's `orchestrator/inference_metrics.py` (engine
        label "0"; capacity from `cache_config_info`'s labels)."""
        labels = {"model_name": model_name, "engine": "0"}
        with self._lock:
            counters = [("prompt_tokens_total", "Prompt tokens.", self.prompt_tokens),
                        ("generation_tokens_total", "Generated tokens.", self.completion_tokens),
                        ("prefix_cache_queries_total", "Prompt tokens looked up in the prefix cache.", self.prompt_tokens),
                        ("prefix_cache_hits_total", "Prompt tokens found in the prefix cache.", self.cached_tokens)]
        for name, help_, value in counters:
            family(f"vllm:{name}", "counter", help_, [(labels, value)])
        if load is None:
            return
        total = load.kv_pages_total or 0
        family("vllm:num_requests_running", "gauge", "Running requests.", [(labels, load.num_running)])
        family("vllm:num_requests_waiting", "gauge", "Waiting requests.", [(labels, load.num_waiting)])
        family("vllm:kv_cache_usage_perc", "gauge", "Fraction of KV-cache blocks in use (1 = full).",
               [(labels, load.kv_pages_used / total if total else 0.0)])
        family("vllm:num_preemptions_total", "counter", "Requests preempted for KV space.", [(labels, load.num_preemptions)])
        family("vllm:cache_config_info", "gauge", "KV-cache configuration (in the labels).",
               [({**labels, "block_size": str(page_size), "num_gpu_blocks": str(total), "kv_cache_size_tokens": str(total * page_size)}, 1)])
