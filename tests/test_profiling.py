"""SGLang's start_profile / stop_profile / freeze_gc, as slime's engine wrapper and tools/profile_rollout.py call
them: a trace of the steps that ran lands in output_dir as a gzipped Chrome trace, a run stops by itself after
num_steps, bad requests are refused naming what was wrong and change nothing, and over HTTP the trace
folder is confined and a browser's GET is refused."""

from __future__ import annotations

import gc
import gzip
import json
from pathlib import Path

import httpx
import pytest

from hotswap import Engine
from hotswap.server.access import AccessPolicy
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


def _trace(path: Path) -> dict:
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _traces(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.trace.json.gz"))


def test_a_profile_holds_the_steps_between_start_and_stop(engine, tmp_path):
    assert engine.start_profile(output_dir=str(tmp_path), profile_prefix="rollout").success
    engine.generate("Alice likes", GREEDY)
    out = engine.stop_profile()
    assert out.success, out.message
    (path,) = _traces(tmp_path)
    assert path.name.startswith("rollout-") and path.name.endswith("-TP-0.trace.json.gz") and str(path) in out.message
    names = {e.get("name", "") for e in _trace(path)["traceEvents"]}
    assert any(n.startswith("aten::") for n in names)  # the model's ops, recorded on the scheduler thread


def test_num_steps_stops_the_run_by_itself(engine, tmp_path):
    assert engine.start_profile(output_dir=str(tmp_path), num_steps=2).success
    engine.generate("Alice likes", GREEDY)  # 6 steps: the trace is written after the second
    assert len(_traces(tmp_path)) == 1
    assert not engine.stop_profile().success  # nothing is running any more


def test_start_step_waits_for_that_step(engine, tmp_path):
    steps = engine.get_load().num_steps
    assert engine.start_profile(output_dir=str(tmp_path), start_step=steps + 1000, num_steps=1).success
    engine.generate("Alice likes", GREEDY)
    assert _traces(tmp_path) == []  # step 1000 never came
    out = engine.stop_profile()
    assert out.success and "nothing was written" in out.message
    assert _traces(tmp_path) == []


def test_a_trace_that_cannot_be_written_costs_the_engine_nothing(engine, tmp_path):
    """The run ends by itself inside the loop: its folder gone by then, the write fails, is logged, and serving goes on."""
    folder = tmp_path / "gone"
    assert engine.start_profile(output_dir=str(folder), num_steps=2).success
    folder.rmdir()
    assert engine.generate("Alice likes", GREEDY)["meta_info"]["completion_tokens"] == 6
    assert not engine.stop_profile().success  # the run is over, not left half-stopped
    assert engine.start_profile(output_dir=str(tmp_path), num_steps=1).success  # and a new one starts
    engine.generate("Alice likes", GREEDY)
    assert len(_traces(tmp_path)) == 1


@pytest.mark.parametrize(("kwargs", "named"), [
    ({"activities": ["CPU", "DISK"]}, "DISK"),
    ({"activities": ["MEM"]}, "MEM"),  # these three record nothing on a CPU engine
    ({"activities": ["GPU"]}, "GPU"),
    ({"activities": ["CPU", "CUDA_PROFILER"]}, "CUDA_PROFILER"),
    ({"num_steps": 0}, "num_steps"),
    ({"start_step": -1}, "start_step"),
    ({"profile_by_stage": True}, "profile_by_stage"),
    ({"profile_prefix": "../../etc/x"}, "profile_prefix"),
])
def test_bad_requests_are_refused_naming_what_was_wrong(engine, tmp_path, kwargs, named):
    out = engine.start_profile(output_dir=str(tmp_path), **kwargs)
    assert not out.success and named in out.message
    assert not engine.stop_profile().success  # no run was left behind
    assert list(tmp_path.iterdir()) == []


def test_a_second_start_is_refused_and_the_first_run_goes_on(engine, tmp_path):
    assert engine.start_profile(output_dir=str(tmp_path)).success
    again = engine.start_profile(output_dir=str(tmp_path))
    assert not again.success and "already running" in again.message
    engine.generate("Alice likes", GREEDY)
    assert engine.stop_profile().success and len(_traces(tmp_path)) == 1


def test_freeze_gc_leaves_existing_objects_out_of_collections(engine):
    gc.unfreeze()
    try:
        assert engine.freeze_gc().success
        assert gc.get_freeze_count() > 0
        assert engine.generate("Alice likes", GREEDY)["meta_info"]["completion_tokens"] == 6
    finally:
        gc.unfreeze()


def test_http_routes_reply_as_sglang_and_confine_the_trace_folder(engine, tmp_path):
    policy = AccessPolicy(save_roots=(str(tmp_path),))
    with ServerThread(create_app(engine, served_model_name="tiny", policy=policy)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        folder = tmp_path / "traces"
        r = http.post("/start_profile", json={"output_dir": str(folder), "num_steps": None, "activities": ["CPU"],
                                              "with_stack": None, "record_shapes": None, "profile_by_stage": False})
        assert (r.status_code, r.text) == (200, "Start profiling.\n")
        assert http.post("/generate", json={"text": "Alice likes", "sampling_params": GREEDY}).status_code == 200
        r = http.post("/stop_profile", json={})
        assert (r.status_code, r.text) == (200, "Stop profiling. This will take some time.\n")
        assert len(_traces(folder)) == 1

        r = http.post("/stop_profile", json={})  # nothing running: refused with the reason
        assert r.status_code == 400 and r.json()["success"] is False and "start_profile first" in r.json()["message"]
        outside = tmp_path.parent / "elsewhere"
        r = http.post("/start_profile", json={"output_dir": str(outside)})
        assert r.status_code == 403 and "output_dir" in r.text and not outside.exists()
        r = http.get("/start_profile", headers={"Sec-Fetch-Site": "same-site"})
        assert r.status_code == 403
        assert not engine.stop_profile().success  # neither refusal started a run

        gc.unfreeze()
        try:
            r = http.get("/freeze_gc")
            assert (r.status_code, r.text) == (200, "Garbage collection frozen.\n") and gc.get_freeze_count() > 0
        finally:
            gc.unfreeze()


def test_http_routes_need_the_api_key(engine):
    with ServerThread(create_app(engine, api_key="s3cret", served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        for path in ("/start_profile", "/stop_profile", "/freeze_gc"):
            assert http.post(path, json={}).status_code == 401
        assert not engine.stop_profile().success


@pytest.mark.parametrize(("body", "named"), [
    ({"output_dir": "/tmp/a\x00b"}, "output_dir"),
    ({"activities": ["A" * 100_000]}, "activities"),
    ({"num_steps": -(10**4000)}, "num_steps"),
    ({"profile_prefix": "\x00" * 10}, "profile_prefix"),
])
def test_hostile_http_bodies_are_refused_short_and_by_name(engine, tmp_path, body, named):
    policy = AccessPolicy(save_roots=(str(tmp_path),))
    with ServerThread(create_app(engine, served_model_name="tiny", policy=policy)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/start_profile", json={"output_dir": str(tmp_path / "t"), **body})
        assert r.status_code == 400 and named in r.text and len(r.content) < 2048, r.text[:300]
    assert not engine.stop_profile().success


def test_a_save_path_that_names_no_file_is_refused_by_name(engine, tmp_path):
    """The save confinement resolved the path before checking it: a NUL byte made that a 500."""
    policy = AccessPolicy(save_roots=(str(tmp_path),))
    with ServerThread(create_app(engine, served_model_name="tiny", policy=policy)) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/save_sharded_model", json={"path": str(tmp_path) + "/a\x00b"})
        assert r.status_code == 400 and r.json()["success"] is False and "path" in r.json()["message"] and "usable path" in r.json()["message"]


@pytest.mark.gpu
def test_on_cuda_the_trace_holds_the_kernels_and_mem_writes_a_snapshot(tiny_qwen3, tmp_path):
    with Engine(str(tiny_qwen3), device="cuda", page_size=4) as eng:
        assert eng.start_profile(output_dir=str(tmp_path), activities=["CPU", "GPU", "MEM"], num_steps=3).success
        eng.generate("Alice likes", GREEDY)
        (path,) = _traces(tmp_path)
        assert any(e.get("cat") == "kernel" for e in _trace(path)["traceEvents"])
        assert len(list(tmp_path.glob("*-memory.pickle"))) == 1
