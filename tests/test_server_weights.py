"""Weight routes over HTTP — updates that change outputs, refusals that change nothing, bad bodies,
the rest of the weight lifecycle, and concurrent clients while the weights change."""

from __future__ import annotations

import json
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from hotswap import Engine
from hotswap.server.access import AccessPolicy
from hotswap.server.app import create_app
from hotswap.server.frontend_process import FrontendOptions, FrontendProcess
from hotswap.server.launch import ServerThread, bind_socket
from hotswap.testing.tiny_models import build_tiny_checkpoint
from hotswap.wire.ipc import SharedMemoryBucket

openai = pytest.importorskip("openai")  # the OpenAI routes are driven by the official client

GREEDY = {"max_new_tokens": 12, "temperature": 0, "ignore_eos": True}
PROMPTS = ["Alice likes 12 apples", "Bob sees the river", "what is the sum of 4 plus 5", "Grace gives 3 cards"]


def make_engine(path) -> Engine:
    return Engine(str(path), device="cpu", page_size=4)


@pytest.fixture(scope="module")
def refs(tiny_qwen3, tiny_qwen3_v2):
    """Greedy outputs and checksums of both weight versions, from engines of their own."""
    out = {}
    for key, path in (("v1", tiny_qwen3), ("v2", tiny_qwen3_v2)):
        with make_engine(path) as eng:
            out[key] = {"ids": [eng.generate(p, GREEDY)["output_ids"] for p in PROMPTS], "digest": eng.check_weights("checksum").digest}
    assert out["v1"]["ids"] != out["v2"]["ids"]
    return out


@pytest.fixture()
def served(tiny_qwen3, tmp_path, request):
    """A fresh engine (weights change in these tests) behind a loopback server that may save under tmp_path: a
    thread of this process, or (parametrized "process") the HTTP front end in a process of its own."""
    eng = make_engine(tiny_qwen3)
    policy = AccessPolicy(save_roots=(str(tmp_path),))
    if getattr(request, "param", "thread") == "process":
        sock = bind_socket("127.0.0.1", 0)
        srv = FrontendProcess(eng, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1], policy=policy)).start()
    else:
        srv = ServerThread(create_app(eng, policy=policy)).start()
    client = httpx.Client(base_url=srv.url, timeout=60)
    yield eng, srv, client
    client.close()
    srv.stop()
    eng.shutdown()


def gen_ids(client: httpx.Client) -> list[list[int]]:
    r = client.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    return [o["output_ids"] for o in r.json()]


def digest(client: httpx.Client) -> str:
    r = client.post("/weights_checker", json={"action": "checksum"})
    assert r.status_code == 200 and r.json()["success"], r.text
    return r.json()["digest"]


def test_update_from_disk_changes_outputs(served, refs, tiny_qwen3, tiny_qwen3_v2):
    eng, srv, c = served
    assert gen_ids(c) == refs["v1"]["ids"]
    assert digest(c) == refs["v1"]["digest"]
    r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3_v2), "weight_version": "v2", "is_async": False})
    body = r.json()
    assert r.status_code == 200 and body["success"] is True, body
    assert body["weight_version"] == "v2" and body["num_tensors"] > 0 and "message" in body
    assert gen_ids(c) == refs["v2"]["ids"]
    assert digest(c) == refs["v2"]["digest"]
    out = c.post("/generate", json={"text": PROMPTS[0], "sampling_params": GREEDY}).json()
    assert out["meta_info"]["weight_version"] == "v2"
    assert c.get("/get_model_info").json()["weight_version"] == "v2"
    metrics = c.get("/metrics").text
    assert 'hotswap_weight_version_info{version="v2"' in metrics
    assert 'hotswap_weight_updates_total{route="/update_weights_from_disk",result="success"} 1' in metrics
    assert 'hotswap_weight_update_duration_seconds_count{route="/update_weights_from_disk"} 1' in metrics
    # and back: the checksum manifest of v1 matches again
    r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3)})
    assert r.status_code == 200 and r.json()["weight_version"] == "v2"  # no version given: unchanged (SGLang)
    assert gen_ids(c) == refs["v1"]["ids"]
    r = c.post("/weights_checker", json={"action": "checksum", "expected": c.post("/weights_checker", json={"action": "checksum"}).json()["checksums"]})
    assert r.status_code == 200 and r.json()["mismatches"] == []
    # SGLang's newer fields: keep_pause leaves generation held until /continue_generation; the others are taken
    r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3_v2), "weight_version": "v3", "keep_pause": True,
                                                  "torch_empty_cache": True, "recapture_cuda_graph": True, "token_step": 7})
    assert r.status_code == 200 and r.json()["success"] is True and "keep_pause" in r.json()["message"], r.json()
    assert eng.get_load().paused
    assert c.post("/continue_generation", json={}).json()["success"] is True
    assert not eng.get_load().paused and gen_ids(c) == refs["v2"]["ids"]


def test_refused_updates_change_nothing(served, refs, tiny_qwen3, tmp_path):
    eng, srv, c = served
    other_shape = build_tiny_checkpoint(tmp_path / "wide", "qwen3", hidden_size=96)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    bad_bodies = [
        ({"model_path": str(tmp_path / "missing")}, "does not exist"),
        ({"model_path": str(a_file)}, "not a directory"),
        ({"model_path": str(tmp_path)}, ""),  # a directory that is not a checkpoint
        ({"model_path": str(other_shape)}, ""),  # a checkpoint of another shape
        ({"model_path": str(tiny_qwen3), "load_format": "pickle"}, "load_format"),
        ({"model_path": 42}, "model_path"),
        ({}, "model_path"),
        ({"model_path": str(tiny_qwen3), "flush_cache": "maybe"}, "flush_cache"),
        ({"model_path": str(tiny_qwen3), "is_async": True}, "is_async"),  # SGLang's newer fields nothing here would honour
        ({"model_path": str(tiny_qwen3), "manifest": {"model.norm.weight": {}}}, "manifest"),
        ({"model_path": str(tiny_qwen3), "token_step": "five"}, "token_step"),
    ]
    before = digest(c)
    for body, needle in bad_bodies:
        r = c.post("/update_weights_from_disk", json=body)
        reply = r.json()
        assert r.status_code == 400, (body, reply)
        assert reply["success"] is False and needle in reply["message"], (body, reply)
    for raw in (b"{not json", b"[]", b"null"):
        r = c.post("/update_weights_from_disk", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["success"] is False
    assert digest(c) == before == refs["v1"]["digest"]
    assert gen_ids(c) == refs["v1"]["ids"]
    assert eng.get_load().weight_version == "default"
    assert 'result="failure"' in c.get("/metrics").text


def test_update_from_tensor_descriptors(served, refs, tiny_qwen3_v2):
    eng, srv, c = served
    r = c.post("/update_weights_from_tensor", json={"serialized_named_tensors": ["gASV..."], "flush_cache": True})
    assert r.status_code == 400 and "not valid base64" in r.json()["message"]
    r = c.post("/update_weights_from_tensor", json={"named_tensors": [{"name": "nope", "dtype": "float32", "shape": [1], "kind": "shm",
                                                                      "shm_name": "hotswap-missing", "offset": 0}]})
    assert r.status_code == 400 and r.json()["success"] is False
    r = c.post("/update_weights_from_tensor", json={"named_tensors": "all of them"})
    assert r.status_code == 400
    assert digest(c) == refs["v1"]["digest"]

    tensors = {}
    for shard in sorted(Path(tiny_qwen3_v2).glob("*.safetensors")):
        tensors.update(load_file(shard))
    with SharedMemoryBucket(list(tensors.items()), token=eng.get_ipc_token()) as bucket:
        r = c.post("/update_weights_from_tensor", json={"named_tensors": bucket.descriptors, "weight_version": "from-shm"})
        assert r.status_code == 200 and r.json()["success"], r.text
    assert digest(c) == refs["v2"]["digest"]
    assert gen_ids(c) == refs["v2"]["ids"]
    assert eng.get_load().weight_version == "from-shm"


def test_weight_lifecycle_routes(served, refs, tiny_qwen3_v2, tmp_path):
    eng, srv, c = served
    # reads
    r = c.post("/get_weights_by_name", json={"name": "model.layers.0.self_attn.q_proj.weight", "truncate_size": 2})
    assert r.status_code == 200 and len(r.json()) == 2 and isinstance(r.json()[0], list)  # the bare nested list
    r = c.get("/get_weights_by_name", params={"name": "model.norm.weight", "truncate_size": "3"})
    assert r.status_code == 200 and len(r.json()) == 3
    r = c.post("/get_weights_by_name", json={"name": "model.nope"})
    assert r.status_code == 400 and r.json()["success"] is False
    assert c.post("/weights_checker", json={"action": "snapshot"}).status_code == 200
    assert c.post("/weights_checker", json={"action": "compare"}).json()["success"] is True
    assert c.post("/weights_checker", json={"action": "frobnicate"}).status_code == 400
    assert c.post("/weights_checker", json={}).status_code == 400

    # version label
    r = c.post("/update_weight_version", json={"new_version": "step-7"})
    assert r.status_code == 200 and r.json()["new_version"] == "step-7"
    assert c.get("/get_weight_version").json()["weight_version"] == "step-7"

    # pause / continue, and a session of two buckets committed once
    assert c.post("/pause_generation", json={"mode": "bogus"}).status_code == 400
    assert c.post("/pause_generation", json={"mode": "abort"}).status_code == 200
    r = c.post("/pause_generation")  # already paused: a no-op answering success (frameworks retry it)
    assert r.status_code == 200 and "no-op" in r.json()["message"]
    assert c.post("/continue_generation").status_code == 200
    r = c.post("/continue_generation")  # not paused: a no-op answering success
    assert r.status_code == 200 and "no-op" in r.json()["message"]
    assert c.post("/end_weight_update").status_code == 400  # no session
    assert c.post("/begin_weight_update").status_code == 200
    tensors = {}
    for shard in sorted(Path(tiny_qwen3_v2).glob("*.safetensors")):
        tensors.update(load_file(shard))
    items = list(tensors.items())
    with ExitStack() as buckets:  # every block stays alive until the session ends
        for half in (items[: len(items) // 2], items[len(items) // 2:]):
            bucket = buckets.enter_context(SharedMemoryBucket(half, token=eng.get_ipc_token()))
            r = c.post("/update_weights_from_tensor", json={"named_tensors": bucket.descriptors})
            assert r.status_code == 200, r.text
        r = c.post("/end_weight_update", json={"weight_version": "sess"})
        assert r.status_code == 200 and r.json()["weight_version"] == "sess"
    assert digest(c) == refs["v2"]["digest"]

    # save, then load back what was saved
    out_dir = tmp_path / "saved"
    r = c.post("/save_sharded_model", json={"path": str(out_dir), "max_size": 40_000})
    assert r.status_code == 200 and r.json()["success"], r.text
    (tmp_path / "f.txt").write_text("")
    r = c.post("/save_sharded_model", json={"path": str(tmp_path / "f.txt" / "sub")})
    assert r.status_code == 400 and r.json()["success"] is False
    r = c.post("/update_weights_from_disk", json={"model_path": str(out_dir)})
    assert r.status_code == 200, r.text
    assert digest(c) == refs["v2"]["digest"]
    r = c.post("/save_remote_model", json={"url": "nosuchscheme://bucket/x"})
    assert r.status_code == 403 and r.json()["success"] is False and "--remote-model-stores" in r.json()["message"]

    # memory release / resume (idle only)
    r = c.post("/release_memory_occupation", json={"tags": ["kv_cache"]})
    assert r.status_code == 200, r.text
    assert c.post("/release_memory_occupation", json={"tags": [1, 2]}).status_code == 400
    assert c.post("/resume_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
    assert gen_ids(c) == refs["v2"]["ids"]

    # distributed group routes refuse cleanly without a trainer
    r = c.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0, "world_size": 2,
                                                  "group_name": "g", "backend": "gloo"})
    assert r.status_code == 400 and "rank" in r.json()["message"]
    r = c.post("/init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": "not-a-port", "rank_offset": 1,
                                                  "world_size": 2})
    assert r.status_code == 400
    r = c.post("/update_weights_from_distributed", json={"names": ["model.norm.weight"], "dtypes": ["torch.float32"], "shapes": [[64]],
                                                        "group_name": "g"})
    assert r.status_code == 400 and "group" in r.json()["message"]
    r = c.post("/update_weights_from_distributed", json={"names": ["a", "b"], "dtypes": ["float32"], "shapes": [[1]]})
    assert r.status_code == 400
    assert c.post("/destroy_weights_update_group", json={"group_name": "g"}).status_code == 400
    assert c.get("/health").status_code == 200


@pytest.mark.parametrize("served", ["thread", "process"], indirect=True)
def test_concurrent_clients_during_updates(served, refs, tiny_qwen3, tiny_qwen3_v2):
    """Clients keep generating (OpenAI and native, streamed and not) while the weights flip between versions;
    every request succeeds and is computed wholly by one version, the one its output names."""
    eng, srv, c = served
    version_ids = {"default": refs["v1"]["ids"], "v1": refs["v1"]["ids"], "v2": refs["v2"]["ids"]}
    stop = threading.Event()
    errors: list[str] = []
    seen: list[tuple[str, int, list[int]]] = []

    def native_worker(k: int) -> None:
        with httpx.Client(base_url=srv.url, timeout=60) as cl:
            i = k
            while not stop.is_set():
                j = i % len(PROMPTS)
                body = {"text": PROMPTS[j], "sampling_params": GREEDY}
                if i % 2:
                    with cl.stream("POST", "/generate", json={**body, "stream": True}) as r:
                        lines = [x for x in r.iter_lines() if x]
                    if lines[-1] != "data: [DONE]":
                        errors.append(f"stream ended badly: {lines[-1]}")
                        return
                    out = json.loads(lines[-2][len("data: "):])
                else:
                    r = cl.post("/generate", json=body)
                    if r.status_code != 200:
                        errors.append(r.text)
                        return
                    out = r.json()
                meta = out["meta_info"]
                if "weight_versions" in meta or meta["finish_reason"]["type"] != "length":
                    errors.append(f"mixed or cut request: {meta}")
                seen.append((meta["weight_version"], j, out["output_ids"]))
                i += 1

    def openai_worker() -> None:
        cl = openai.OpenAI(base_url=srv.url + "/v1", api_key="x", max_retries=0, timeout=60)
        while not stop.is_set():
            try:
                res = cl.completions.create(model="default", prompt=PROMPTS[0], max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
                if res.choices[0].finish_reason != "length":
                    errors.append(f"openai: {res}")
            except Exception as exc:  # noqa: BLE001
                errors.append(f"openai: {exc!r}")
                return

    threads = [threading.Thread(target=native_worker, args=(k,)) for k in range(4)] + [threading.Thread(target=openai_worker)]
    for t in threads:
        t.start()
    try:
        for step in range(6):
            path, version = (tiny_qwen3_v2, "v2") if step % 2 == 0 else (tiny_qwen3, "v1")
            done_before = len(seen)
            r = c.post("/update_weights_from_disk", json={"model_path": str(path), "weight_version": version})
            assert r.status_code == 200 and r.json()["success"], r.text
            r = c.post("/update_weights_from_disk", json={"model_path": "/definitely/missing"})
            assert r.status_code == 400
            # Let clients be served by this version before the next flip (on a slow machine back-to-back
            # updates can otherwise all land between two completions); bounded.
            deadline = time.monotonic() + 60
            while not any(v == version for v, _, _ in seen[done_before:]) and not errors and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[:3]
    assert {v for v, _, _ in seen} >= {"v1", "v2"}
    for version, j, ids in seen:
        assert ids == version_ids[version][j], (version, j)
    load = eng.get_load()
    assert load.num_running == 0 and load.num_waiting == 0
    assert eng.check_invariants().success


def test_cancelled_engine_call_leaves_scheduler_alive(tiny_qwen3):
    """A weight request whose HTTP task is cancelled (shutdown, timeout) while the scheduler defers it must
    not end the scheduler thread: Engine.asubmit shields the scheduler's Future."""
    import asyncio

    from hotswap import protocol as p

    with make_engine(tiny_qwen3) as eng:

        async def main() -> dict:
            gen = asyncio.ensure_future(eng.async_generate("Alice", {"max_new_tokens": 300, "ignore_eos": True}))
            await asyncio.sleep(0.02)
            call = asyncio.ensure_future(eng.asubmit(p.UpdateWeightsFromDiskRequest(model_path=str(tiny_qwen3))))
            await asyncio.sleep(0.01)
            call.cancel()
            return await gen

        out = asyncio.run(main())
        assert out["meta_info"]["finish_reason"]["type"] == "length"
        assert eng.generate("Bob", {"max_new_tokens": 3})["meta_info"]["completion_tokens"] == 3
        assert eng.scheduler.thread.is_alive()
