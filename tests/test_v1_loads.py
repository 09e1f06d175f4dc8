"""/v1/loads as SGLang answers it (entrypoints/v1_loads.py::get_loads, managers/load_snapshot.py::LoadSnapshot.to_dict;
its earlier reply's dp_rank_count, num_total_reqs and aggregate too): the query (include, dp_rank, format), every
core field, gen_throughput / cache_hit_rate / utilization computed from the scheduler's state
(scheduler_metrics_mixin.py::get_loads and the stats it reads), sections, and the Prometheus form."""

from __future__ import annotations

import threading
import time
from datetime import datetime

import httpx
import pytest
from engine_support import make_engine, wait_idle

from hotswap.scheduler.load_stats import LoadStats, cache_hit_rate, utilization
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT = list(range(3, 15))  # 12 token ids: three 4-token pages
CORE_KEYS = {"dp_rank", "num_running_reqs", "num_waiting_reqs", "num_waiting_uncached_tokens", "num_used_tokens", "num_total_tokens",
             "max_total_num_tokens", "max_running_requests", "token_usage", "gen_throughput", "cache_hit_rate", "utilization"}


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3) as eng:
        yield eng


@pytest.fixture(scope="module")
def c(engine):
    with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        yield client


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def test_rates_from_recent_steps_admissions_and_usage():
    now = [100.0]
    stats = LoadStats(clock=lambda: now[0])
    assert stats.gen_throughput() == 0.0
    for generated in (4, 4, 4):  # the first step marks where the window starts
        stats.on_step(generated, busy=True)
        now[0] += 0.5
    assert stats.gen_throughput() == 8.0  # 8 tokens over the second between the first and the last step
    stats.on_step(4, busy=False)  # nothing left running or waiting: the window ends
    assert stats.gen_throughput() == 0.0
    assert cache_hit_rate(8, 12) == 0.6667 and cache_hit_rate(0, 0) == 0.0
    assert utilization(2, 8, 0.45) == 0.5 and utilization(6, 8, 0.45) == 0.75  # max(running share, usage / 0.9)


def test_engine_load_measures_throughput_and_prefix_hits(engine):
    greedy = {"max_new_tokens": 2, "temperature": 0}
    engine.generate(input_ids=PROMPT, sampling_params=greedy)
    engine.generate(input_ids=PROMPT, sampling_params=greedy)  # its full pages are in the prefix cache now
    load = engine.get_load()
    assert 0.0 < load.cache_hit_rate < 1.0 and load.gen_throughput == 0.0  # idle: no generation rate
    out: dict = {}
    t = threading.Thread(target=lambda: out.setdefault("r", engine.generate(
        input_ids=PROMPT, sampling_params={"max_new_tokens": 400, "temperature": 0, "ignore_eos": True})))
    t.start()
    steps = engine.get_load().num_steps
    wait_for(lambda: engine.get_load().num_steps >= steps + 4, "the request never ran")
    assert engine.pause_generation(mode="in_place").success  # held mid-generation: the window keeps its steps
    try:
        load = engine.get_load()
        assert load.num_running == 1 and load.gen_throughput > 0.0
        assert load.utilization == utilization(1, load.max_running_requests, load.kv_pages_used / load.kv_pages_total)
    finally:
        engine.continue_generation()
        engine.abort_request(abort_all=True)
        t.join(30)
        wait_idle(engine)


def test_v1_loads_reply_and_query_as_sglangs(c, engine):
    reply = c.get("/v1/loads").json()
    assert {"timestamp", "version", "accelerator", "num_accelerators", "dp_rank_count", "loads", "aggregate"} <= set(reply)
    assert datetime.fromisoformat(reply["timestamp"]).tzinfo is not None and reply["num_accelerators"] == 1
    entry = reply["loads"][0]
    assert CORE_KEYS <= set(entry) and entry["num_total_reqs"] == 0 and entry["max_running_requests"] == engine.config.max_running_requests
    assert entry["queues"] == {"waiting": 0, "grammar": 0, "paused": 0, "retracted": 0} and entry["disaggregation"]["mode"] == "null"
    assert reply["aggregate"]["total_reqs"] == 0 and reply["dp_rank_count"] == 1
    core = c.get("/v1/loads", params={"include": "core"}).json()["loads"][0]
    assert CORE_KEYS <= set(core) and "queues" not in core and "disaggregation" not in core
    queues = c.get("/v1/loads", params={"include": "core,queues"}).json()["loads"][0]
    assert "queues" in queues and "disaggregation" not in queues
    r = c.get("/v1/loads", params={"include": "core,gpu"})
    assert r.status_code == 400 and "Invalid include sections" in r.text
    assert c.get("/v1/loads", params={"dp_rank": 1}).json()["loads"] == []  # a rank this server does not have
    assert c.get("/v1/loads", params={"dp_rank": 0}).json()["loads"][0]["dp_rank"] == 0
    text = c.get("/v1/loads", params={"format": "prometheus"}).text
    assert 'sglang_gen_throughput{dp_rank="0"} ' in text and 'sglang_queues_waiting{dp_rank="0"} 0' in text
    assert "# TYPE sglang_num_running_reqs gauge" in text and "sglang_timestamp" not in text
    metrics = c.get("/metrics").text  # miles' dashboard whitelists both (sglang_scraper.py)
    assert "# TYPE sglang:gen_throughput gauge" in metrics and "# TYPE sglang:utilization gauge" in metrics
