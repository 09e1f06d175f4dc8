"""flush_cache's `timeout` (SGLang's `/flush_cache?timeout=`, `FlushCacheReqInput.timeout_s`): with requests
running, a flush waits up to the timeout for them and acts the first time none runs; past it, it is refused and
nothing changes; one such flush waits at a time; a bad timeout is a 400 naming it (scheduler/cache_flush.py)."""

from __future__ import annotations

import threading
import time

import httpx
import pytest
from engine_support import make_engine, wait_idle, wait_running

from hotswap.scheduler.pause import GenerationPause
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT = list(range(3, 15))
LONG = {"max_new_tokens": 300, "temperature": 0, "ignore_eos": True}


def start_frozen(engine) -> tuple[threading.Thread, dict]:
    """Generate in a thread and freeze the request where it runs (`pause_generation(mode="in_place")`: it stays
    running, with its pages, until continue_generation). Its output is in the dict's "out" once the thread ends."""
    results: dict = {}
    t = threading.Thread(target=lambda: results.setdefault("out", engine.generate(input_ids=PROMPT, sampling_params=LONG)))
    t.start()
    wait_running(engine, 1)
    assert engine.pause_generation(mode="in_place").success
    assert engine.get_load().num_running == 1
    return t, results


def in_thread(fn) -> tuple[threading.Thread, dict]:
    results: dict = {}
    t = threading.Thread(target=lambda: results.setdefault("out", fn()))
    t.start()
    return t, results


def cached_tokens(engine) -> int:
    return engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 1})["meta_info"]["cached_tokens"]


@pytest.fixture()
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3) as eng:
        yield eng


def test_a_flush_with_a_timeout_waits_for_the_running_request_and_then_flushes(engine):
    assert cached_tokens(engine) == 0 and cached_tokens(engine) > 0  # the prompt is cached now
    thread, results = start_frozen(engine)
    refused = engine.flush_cache()  # no timeout: SGLang's immediate rule
    assert not refused.success and "1 request(s) are running" in refused.message
    flusher, flushed = in_thread(lambda: engine.flush_cache(timeout_s=60))
    time.sleep(0.3)
    assert flusher.is_alive()  # waiting for the frozen request
    assert engine.continue_generation().success
    flusher.join(timeout=30)
    out = flushed["out"]
    assert out.success and "after the running requests finished" in out.message, out.message
    thread.join(timeout=30)
    assert results["out"]["meta_info"]["finish_reason"]["type"] == "length"  # it finished, and was not cut short
    assert len(results["out"]["output_ids"]) == 300
    wait_idle(engine)
    assert cached_tokens(engine) == 0  # flushed after it finished (its own prompt and output were cached, then dropped)


def test_a_flush_past_its_timeout_is_refused_and_changes_nothing(engine):
    cached_tokens(engine)
    thread, results = start_frozen(engine)
    t0 = time.monotonic()
    out = engine.flush_cache(timeout_s=0.3)
    waited = time.monotonic() - t0
    assert not out.success and "still running after the timeout of 0.3 s" in out.message
    assert 0.3 <= waited < 10
    assert engine.get_load().num_running == 1  # the request is there still
    assert engine.continue_generation().success
    thread.join(timeout=30)
    assert len(results["out"]["output_ids"]) == 300  # and finishes whole
    wait_idle(engine)
    assert cached_tokens(engine) > 0  # the prefix cache was not flushed


def test_one_flush_waits_at_a_time_and_a_loop_that_dies_answers_it(tiny_qwen3, monkeypatch):
    engine = make_engine(tiny_qwen3)
    try:
        thread, _ = start_frozen(engine)
        waiter, first = in_thread(lambda: engine.flush_cache(timeout_s=120))
        deadline = time.monotonic() + 10
        while True:  # the second flush, once the first waits, is refused by name
            second = engine.flush_cache(timeout_s=5)
            if "already waiting" in second.message or time.monotonic() > deadline:
                break
            time.sleep(0.01)
        assert not second.success and "another flush_cache is already waiting" in second.message

        def broken(self) -> None:
            raise RuntimeError("injected scheduler fault")

        monkeypatch.setattr(GenerationPause, "expire", broken)  # the loop's next pass raises: the scheduler stops
        waiter.join(timeout=30)
        assert not waiter.is_alive()  # answered, not left waiting for requests that will never finish
        out = first["out"]
        assert not out.success and "flush_cache not run" in out.message and "injected scheduler fault" in out.message, out.message
        thread.join(timeout=30)
    finally:
        monkeypatch.undo()
        engine.shutdown()


def test_the_http_timeout_parameter(engine):
    srv = ServerThread(create_app(engine)).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for bad in ("-1", "abc", "nan", "inf"):
                r = c.get("/flush_cache", params={"timeout": bad})
                assert r.status_code == 400, (bad, r.text)
                assert "timeout" in r.text and "finite number >= 0" in r.text
            thread, results = start_frozen(engine)
            assert c.get("/flush_cache").status_code == 400  # refused at once without a timeout, as SGLang
            flusher, flushed = in_thread(lambda: c.post("/flush_cache", params={"timeout": "60"}))
            time.sleep(0.3)
            assert flusher.is_alive()
            assert c.post("/continue_generation", json={}).status_code == 200
            flusher.join(timeout=30)
            r = flushed["out"]
            assert r.status_code == 200 and r.json()["success"], r.text
            thread.join(timeout=30)
            assert len(results["out"]["output_ids"]) == 300
            assert c.get("/flush_cache", params={"timeout": "0"}).status_code == 200  # idle: at once
    finally:
        srv.stop()
