"""Several HTTP front end processes on one port (`hotswap serve --frontend-workers N`): every request is served
whichever process accepts it, /metrics shows the whole server's counters from any of them, and SIGTERM drains
them all. Their counters are shared through a folder (server/metrics_share.py): the sum is checked here too."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest
from serve_support import free_port, serve_env, wait_healthy

from hotswap.server.metrics import Metrics
from hotswap.server.metrics_share import MetricsShare


def counted(metrics: Metrics) -> Metrics:
    metrics.observe_http("POST", "/generate", 200)
    metrics.observe_http("GET", "/health", 200)
    metrics.observe_generation("/generate", [{"meta_info": {"prompt_tokens": 5, "completion_tokens": 7, "cached_tokens": 2,
                                                            "finish_reason": {"type": "length"}}}])
    metrics.observe_disconnect()
    metrics.observe_weight_update("/update_weights_from_disk", True, 0.2)
    metrics.observe_weight_update("/update_weights_from_disk", False, 0.1)
    return metrics


def test_a_snapshot_absorbed_adds_every_counter():
    one, two = counted(Metrics()), counted(counted(Metrics()))
    total = Metrics()
    total.absorb(one.snapshot())
    total.absorb(two.snapshot())
    three = counted(counted(counted(Metrics())))
    assert total.snapshot() == three.snapshot()
    assert total.render() == three.render()


def test_each_front_end_shows_its_live_counters_plus_the_others_latest(tmp_path):
    a, b = MetricsShare(str(tmp_path), 0), MetricsShare(str(tmp_path), 1)
    mine_a, mine_b = counted(Metrics()), counted(counted(Metrics()))
    assert a.total(mine_a).snapshot() == mine_a.snapshot()  # b has not published: it counts nothing yet
    b.publish(mine_b)
    (tmp_path / "worker-7.json").write_text("{not json")  # a file being replaced or damaged is skipped, not fatal
    assert a.total(mine_a).snapshot() == counted(counted(counted(Metrics()))).snapshot()
    counted(mine_a)  # a's own requests count at once, the others' as of their last publish
    assert a.total(mine_a).snapshot()["totals"][0] == 4 * 5
    b.start(mine_b)  # published every interval and once more when stopped
    counted(mine_b)
    b.stop()
    assert a.total(mine_a).snapshot()["totals"][0] == 5 * 5


def serve_two(model, *flags: str) -> tuple[subprocess.Popen, str]:
    """`hotswap serve` with two front end processes on a free port, healthy."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hotswap.cli", "serve", "--model-path", str(model), "--port", str(port), "--device", "cpu",
                             "--page-size", "4", "--frontend-workers", "2", "--no-warmup", "--log-level", "info", *flags],
                            env=serve_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url)
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return proc, url


def generate_requests(metrics_text: str) -> int:
    m = re.search(r'hotswap_http_requests_total\{method="POST",route="/generate",status="200"\} (\d+)', metrics_text)
    return int(m.group(1)) if m else 0


@pytest.mark.timeout(300)
def test_two_front_ends_serve_one_port_count_together_and_drain(tiny_qwen3):
    proc, url = serve_two(tiny_qwen3, "--num-pages", "512", "--drain-timeout", "2")
    try:
        body = {"text": "Alice likes", "sampling_params": {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}}

        def one(i: int) -> tuple[str, list]:
            with httpx.Client(base_url=url, timeout=60) as c:  # a connection each: the kernel spreads them over both
                if i % 2:
                    with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                        assert r.status_code == 200
                        events = [x for x in r.iter_lines() if x.startswith("data: {")]
                    return "stream", events
                r = c.post("/generate", json=body)
                assert r.status_code == 200
                return "plain", r.json()["output_ids"]

        sent = 24
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(sent)))
        plain = {tuple(out) for kind, out in results if kind == "plain"}
        assert len(plain) == 1 and all(events for kind, events in results if kind == "stream")  # same greedy answer everywhere
        deadline = time.monotonic() + 20
        while True:  # each scrape reaches either process; both must show all the requests once the other has published
            scrapes = [generate_requests(httpx.get(url + "/metrics", timeout=10).text) for _ in range(6)]
            if all(n == sent for n in scrapes):
                break
            assert all(n <= sent for n in scrapes) and time.monotonic() < deadline, scrapes
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read()
    pids = [int(p) for p in re.search(r"HTTP front end process\(es\) ([\d, ]+) ready", err).group(1).split(", ")]
    assert len(pids) == 2
    for pid in pids:  # both exited with the server
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


@pytest.mark.timeout(300)
def test_a_front_end_that_dies_takes_the_server_down_with_it(tiny_qwen3):
    """No server left answering on a fraction of its processes: one killed, the other drains and exits, and
    `hotswap serve` reports the failure (exit code not 0) after shutting the engine down."""
    proc, _ = serve_two(tiny_qwen3, "--num-pages", "256", "--drain-timeout", "1")
    try:
        pids = []
        deadline = time.monotonic() + 30
        while not pids:  # the ready line names both processes
            line = proc.stderr.readline()
            assert line and time.monotonic() < deadline
            if m := re.search(r"HTTP front end process\(es\) ([\d, ]+) ready", line):
                pids = [int(p) for p in m.group(1).split(", ")]
        os.kill(pids[1], signal.SIGKILL)
        assert proc.wait(timeout=60) != 0
        err = proc.stderr.read()
        assert f"the HTTP front end process {pids[1]} exited with code -9" in err and "engine shut down" in err
        with pytest.raises(ProcessLookupError):
            os.kill(pids[0], 0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(300)
def test_a_group_whose_front_ends_cannot_start_is_stopped_whole(engine):
    """Each worker fails in create_app (an API key of spaces): start raises naming it, every process is gone,
    the shared counters' folder removed, and the engine still serves."""
    from hotswap.server.frontend_process import FrontendGroup, FrontendOptions
    from hotswap.server.launch import bind_socket

    sock = bind_socket("127.0.0.1", 0)
    group = FrontendGroup(engine, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1], api_key="  "), workers=2)
    folder = group.metrics_dir
    assert os.path.isdir(folder)
    with pytest.raises(RuntimeError, match="exited during startup"):
        group.start(timeout=120)
    assert all(not f.process.is_alive() for f in group.fronts) and not os.path.exists(folder)
    assert engine.generate("Alice likes", {"max_new_tokens": 2, "temperature": 0})["output_ids"]


def test_several_front_ends_need_the_front_end_process(tiny_qwen3):
    proc = subprocess.run([sys.executable, "-m", "hotswap.cli", "serve", "--model-path", str(tiny_qwen3), "--port", "0", "--device", "cpu",
                           "--frontend-workers", "2", "--no-frontend-process"], env=serve_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--frontend-workers must be at least 1, and 1 with --no-frontend-process; got 2" in proc.stderr


@pytest.mark.parametrize("cores,apart,expected", [(16, True, 2), (4, True, 2), (2, True, 1), (None, True, 1), (16, False, 1)])
def test_the_default_is_two_front_ends_where_they_run_apart_on_a_machine_with_the_cores(monkeypatch, cores, apart, expected):
    """One front end process saturates at a rollout's 512 streams (they then end at ~1.27x the offline time; two: ~1.02x);
    a small machine, or the front end in the engine's process (one thread), keeps one."""
    from hotswap.server import launch

    monkeypatch.setattr(launch.os, "cpu_count", lambda: cores)
    monkeypatch.delattr(launch.os, "sched_getaffinity", raising=False)
    assert launch.default_frontend_workers(apart) == expected


def test_the_default_counts_the_cores_this_process_may_use(monkeypatch):
    from hotswap.server import launch

    monkeypatch.setattr(launch.os, "cpu_count", lambda: 64)
    monkeypatch.setattr(launch.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    assert launch.default_frontend_workers(True) == 1  # a 64-core host, two of them ours
