"""The rates SGLang's /v1/loads reports beside its counts (GetLoadsReqOutput / LoadSnapshot): generation
throughput over the latest steps (kept on the scheduler thread), the prefix-cache hit rate of the latest
admissions, and utilization; read by the scheduler's get_load."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

# SGLang measures gen_throughput over --decode-log-interval (default 40) decode batches
# (scheduler_metrics_mixin.py::log_decode_stats: tokens generated since the last report / seconds since it)
WINDOW_STEPS = 40
# SGLang's utilization: max(running / capacity, token_usage / 0.9) (SchedulerMetricsReporter._calculate_utilization)
TOKEN_USAGE_FULL = 0.9


@dataclass(kw_only=True, slots=True)
class LoadStats:
    clock: Callable[[], float] = time.perf_counter
    # (time a step was read back, tokens it generated) for the latest steps of the current busy spell; the oldest
    # entry only marks where the window starts
    steps: deque[tuple[float, int]] = field(default_factory=lambda: deque(maxlen=WINDOW_STEPS + 1))

    def on_step(self, generated: int, busy: bool) -> None:
        """A step was read back. `busy`: requests are still running or waiting; when none are, the window ends (a
        rate after an idle spell starts afresh, not diluted by the gap)."""
        if busy:
            self.steps.append((self.clock(), generated))
        else:
            self.steps.clear()

    def gen_throughput(self) -> float:
        """Tokens a second over the window; 0 while idle (SGLang's idle report sets 0 too)."""
        if len(self.steps) < 2:
            return 0.0
        elapsed = self.steps[-1][0] - self.steps[0][0]
        tokens = sum(n for _, n in list(self.steps)[1:])
        return round(tokens / elapsed, 2) if elapsed > 0 else 0.0


def cache_hit_rate(hit_tokens: int, prompt_tokens: int) -> float:
    """The prefix-cache share of the latest admitted batch's prompts (SGLang: its last prefill batch's
    hit tokens over hit plus new tokens, scheduler_metrics_mixin.py::log_prefill_stats)."""
    return round(hit_tokens / prompt_tokens, 4) if prompt_tokens else 0.0


def utilization(num_running: int, max_running: int, token_usage: float) -> float:
    """SGLang's: the larger of the running share of max_running_requests and KV usage against 90 % full."""
    running = num_running / max_running if max_running > 0 else 0.0
    return round(max(running, token_usage / TOKEN_USAGE_FULL), 4)
