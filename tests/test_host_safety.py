"""The weight surface cannot be turned against the host: saves stay in their folder and never replace files
unasked, remote saves go only to configured stores, shared-memory descriptors name only the engine's own
blocks, and browsers (foreign Origins, rebinding Host names, text/plain bodies) cannot drive the server."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from multiprocessing import shared_memory
from pathlib import Path

import httpx
import pytest
import torch

from hotswap import Engine
from hotswap.server.access import AccessPolicy
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread
from hotswap.weights import saver
from hotswap.wire.ipc import SharedMemoryBucket, shm_block_prefix

SRC = str(Path(__file__).resolve().parents[1] / "src")


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, num_pages=64) as eng:
        yield eng


def digest(engine) -> str:
    return engine.check_weights("checksum").digest


# ---- save_sharded_model ----------------------------------------------------------------------------


@pytest.mark.parametrize("pattern, text", [
    ("../escaped-{part}.safetensors", "plain file names"),
    ("/tmp/hotswap-escaped-{part}.safetensors", "plain file names"),
    ("sub/{part}.safetensors", "plain file names"),
    ("{rank.__class__}-{part}.safetensors", "is not allowed"),
    ("{part.real}.safetensors", "is not allowed"),
    ("{part!r}.safetensors", "plain integer format"),
    ("{part:>{total}}.safetensors", "plain integer format"),
    ("{0}.safetensors", "is not allowed"),
    ("model-{part}.bin", "ending in .safetensors"),
    (".hidden-{part}.safetensors", "no leading dot"),
    ("model.safetensors", "same name"),
])
def test_save_pattern_cannot_leave_its_folder_or_evaluate_fields(engine, tmp_path, pattern, text):
    out = tmp_path / "out"
    res = engine.save_sharded_model(str(out), pattern=pattern, max_size=40_000)
    assert not res.success and text in res.message, res.message
    assert not any(tmp_path.rglob("*.safetensors")) and not Path("/tmp/hotswap-escaped-1.safetensors").exists()


def test_save_pattern_with_plain_fields_round_trips(engine, tmp_path):
    out = tmp_path / "out"
    res = engine.save_sharded_model(str(out), pattern="w-{rank}-{part:03d}-of-{total}.safetensors", max_size=40_000)
    assert res.success, res.message
    assert sorted(p.name for p in out.glob("*.safetensors"))[0] == "w-0-001-of-" + str(len(list(out.glob("*.safetensors")))) + ".safetensors"
    with Engine(str(out), device="cpu", page_size=4, num_pages=16) as again:
        assert digest(again) == digest(engine)


def test_save_refuses_to_replace_files_unless_told(engine, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "config.json").write_text('{"mine": true}')
    (out / "old.safetensors").write_bytes(b"x")
    (out / "model.safetensors.index.json").write_text('{"weight_map": {"x": "old.safetensors"}}')
    res = engine.save_sharded_model(str(out))
    assert not res.success and "overwrite" in res.message
    assert all(name in res.message for name in ("config.json", "old.safetensors", "model.safetensors.index.json")), res.message
    assert (out / "config.json").read_text() == '{"mine": true}' and (out / "old.safetensors").read_bytes() == b"x"
    res = engine.save_sharded_model(str(out), overwrite=True)
    assert res.success, res.message
    assert not (out / "old.safetensors").exists() and not (out / "model.safetensors.index.json").exists()
    assert json.loads((out / "config.json").read_text()).get("mine") is None
    with Engine(str(out), device="cpu", page_size=4, num_pages=16) as again:
        assert digest(again) == digest(engine)


def test_failed_save_leaves_no_partial_shard(engine, tmp_path, monkeypatch):
    out = tmp_path / "out"
    real = saver.save_file
    calls = []

    def failing(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            Path(filename).write_bytes(b"half a shard")
            raise OSError("disk full")
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(saver, "save_file", failing)
    res = engine.save_sharded_model(str(out), max_size=40_000)
    assert not res.success and "disk full" in res.message
    assert all(Path(c).name.endswith(".partial") and Path(c).parent.parent == out for c in calls)  # in a staging folder inside
    assert list(out.iterdir()) == []
    # a save killed outright leaves only its staging folder, which the loader ignores and the next save removes
    killed = out / ".hotswap-save-killed"
    killed.mkdir()
    (killed / "model-00001-of-00009.safetensors.partial").write_bytes(b"killed")
    monkeypatch.setattr(saver, "save_file", real)
    assert engine.save_sharded_model(str(out), max_size=40_000).success
    assert not killed.exists() and [f for f in out.iterdir() if f.name.startswith(".")] == [] and list(out.glob("*.safetensors"))


def test_a_save_never_writes_through_a_link_planted_in_its_folder(engine, tmp_path, monkeypatch):
    """Shards were written as NAME.partial beside their final names: someone else who may write to a shared save
    folder (a save root such as /tmp/ckpts) could plant NAME.partial as a link to any file of the server's user
    while the save ran, and the shard was written through it."""
    out, victim = tmp_path / "shared", tmp_path / "victim.txt"
    out.mkdir()
    victim.write_text("precious")
    real = saver.save_file

    def racing(tensors, filename, metadata=None):  # the other user plants links for every name the save will write
        for name in [f"model-{i:05d}-of-{n:05d}.safetensors.partial" for n in range(1, 12) for i in range(1, n + 1)] + [
                "model.safetensors.index.json.partial", "config.json.partial", "tokenizer.json.partial"]:
            if not (out / name).is_symlink():
                (out / name).symlink_to(victim)
        real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(saver, "save_file", racing)
    assert engine.save_sharded_model(str(out), max_size=40_000).success
    assert victim.read_text() == "precious"
    monkeypatch.setattr(saver, "save_file", real)
    with Engine(str(out), device="cpu", page_size=4, num_pages=16) as again:
        assert digest(again) == digest(engine)


# ---- over HTTP: save roots and remote stores ----------------------------------------------------------


@pytest.fixture()
def confined(engine, tmp_path):
    root, stores = tmp_path / "saves", tmp_path / "stores"
    root.mkdir()
    policy = AccessPolicy(save_roots=(str(root),), remote_model_stores=(f"file://{stores}/ok",))
    with ServerThread(create_app(engine, policy=policy)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        yield c, root, stores


def test_http_saves_stay_under_the_save_roots(confined, tmp_path):
    c, root, _ = confined
    outside = tmp_path / "elsewhere"
    r = c.post("/save_sharded_model", json={"path": str(outside)})
    assert r.status_code == 403 and "outside the folders" in r.json()["message"] and not outside.exists()
    r = c.post("/save_sharded_model", json={"path": str(root / ".." / "elsewhere")})
    assert r.status_code == 403
    (root / "link").symlink_to(outside, target_is_directory=True)
    outside.mkdir()
    r = c.post("/save_sharded_model", json={"path": str(root / "link")})
    assert r.status_code == 403 and not list(outside.iterdir())
    r = c.post("/save_sharded_model", json={"path": str(root / "a"), "max_size": 40_000})
    assert r.status_code == 200 and r.json()["success"], r.text
    r = c.post("/save_sharded_model", json={"path": str(root / "a")})
    assert r.status_code == 400 and "overwrite" in r.json()["message"]
    r = c.post("/save_sharded_model", json={"path": str(root / "a"), "overwrite": True})
    assert r.status_code == 200, r.text


def test_http_saves_are_off_without_configured_destinations(engine, tmp_path):
    with ServerThread(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
        r = c.post("/save_sharded_model", json={"path": str(tmp_path / "x")})
        assert r.status_code == 403 and "--save-root" in r.json()["message"] and not (tmp_path / "x").exists()
        r = c.post("/save_remote_model", json={"url": f"file://{tmp_path}/y"})
        assert r.status_code == 403 and "--remote-model-stores" in r.json()["message"] and not (tmp_path / "y").exists()


def test_remote_saves_go_only_to_configured_stores(confined, engine):
    c, _, stores = confined
    for url in ("ftp://127.0.0.1:9/x", f"file://{stores}/okay-not", f"file://{stores}/ok/../../x", "memory://x"):
        r = c.post("/save_remote_model", json={"url": url})
        assert r.status_code == 403 and r.json()["success"] is False, (url, r.text)
    assert not stores.exists()
    r = c.post("/save_remote_model", json={"url": f"file://{stores}/ok/step1"})
    assert r.status_code == 200 and r.json()["success"], r.text
    r = c.post("/save_remote_model", json={"url": f"file://{stores}/ok/step1"})
    assert r.status_code == 400 and "overwrite" in r.json()["message"]
    r = c.post("/save_remote_model", json={"url": f"file://{stores}/ok/step1", "overwrite": True})
    assert r.status_code == 200, r.text
    with Engine(str(stores / "ok" / "step1"), device="cpu", page_size=4, num_pages=16) as again:
        assert digest(again) == digest(engine)


def test_failed_remote_save_leaves_nothing(engine, tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    calls = []
    real = local.LocalFileSystem.put_file

    def failing(self, lpath, rpath, **kw):
        calls.append(rpath)
        if len(calls) == 2:
            raise OSError("connection reset")
        return real(self, lpath, rpath, **kw)

    monkeypatch.setattr(local.LocalFileSystem, "put_file", failing)
    res = engine.save_remote_model(f"file://{tmp_path}/remote")
    assert not res.success and "connection reset" in res.message
    assert list((tmp_path / "remote").iterdir()) == []


_HANGING_REMOTE_SAVE = """
import sys, time
import fsspec.implementations.local as local
from hotswap import Engine

def hang(self, lpath, rpath, **kw):
    print("uploading", flush=True)
    time.sleep(600)

local.LocalFileSystem.put_file = hang
with Engine(sys.argv[1], device="cpu", page_size=4, num_pages=16) as engine:
    engine.save_remote_model(sys.argv[2])
"""


def test_a_killed_remote_save_leaves_no_local_copy_behind(engine, tiny_qwen3, tmp_path, monkeypatch):
    """A process killed mid-upload runs no clean-up: its local copy is found and removed by the next save."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = dict(os.environ, TMPDIR=str(scratch), PYTHONPATH=SRC + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = subprocess.Popen([sys.executable, "-c", _HANGING_REMOTE_SAVE, str(tiny_qwen3), f"file://{tmp_path}/killed"],
                             env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline() == "uploading\n", child.communicate(timeout=60)[1]
    finally:
        child.kill()
        child.wait(timeout=30)
    left = list(scratch.glob("hotswap-save-remote-*"))
    assert len(left) == 1 and (left[0] / "model.safetensors").is_file()  # what a kill leaves

    live = scratch / f"hotswap-save-remote-{os.getpid()}-inuse"  # a live process's copy stays
    live.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    res = engine.save_remote_model(f"file://{tmp_path}/next")
    assert res.success, res.message
    assert list(scratch.iterdir()) == [live]
    assert (tmp_path / "next" / "model.safetensors").is_file()


# ---- shared-memory descriptors --------------------------------------------------------------------


def test_shm_descriptors_name_only_the_engines_blocks(engine):
    before = digest(engine)
    norm = engine.get_weights_by_name("model.norm.weight", truncate_size=4)
    secret = shared_memory.SharedMemory(create=True, size=256)  # some other process's block on the host
    try:
        torch.frombuffer(secret.buf, dtype=torch.float32, count=64).fill_(7.0)
        desc = {"name": "model.norm.weight", "dtype": "float32", "shape": [64], "kind": "shm", "shm_name": secret.name, "offset": 0}
        with ServerThread(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/update_weights_from_tensor", json={"named_tensors": [desc]})
            assert r.status_code == 400 and "was not made for this engine" in r.json()["message"]
            assert c.get("/get_ipc_token").json() == {"ipc_token": engine.get_ipc_token(),
                                                      "shm_prefix": shm_block_prefix(engine.get_ipc_token())}
            with SharedMemoryBucket([("model.norm.weight", torch.full((64,), 7.0))], token="someotherengine1") as other:
                r = c.post("/update_weights_from_tensor", json={"named_tensors": other.descriptors})
                assert r.status_code == 400 and "was not made for this engine" in r.json()["message"]
        assert digest(engine) == before and engine.get_weights_by_name("model.norm.weight", truncate_size=4) == norm
    finally:
        secret.close()
        secret.unlink()


# ---- browsers ---------------------------------------------------------------------------------------


@pytest.fixture()
def http(engine):
    with ServerThread(create_app(engine, policy=AccessPolicy(allowed_origins=("https://trainer.example",), allowed_hosts=("engine.internal",)))) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            yield srv, c


def test_cross_site_requests_cannot_change_weights(engine, http):
    srv, c = http
    before = digest(engine)
    body = json.dumps({"action": "reset_tensors"})
    r = c.post("/weights_checker", content=body, headers={"Content-Type": "text/plain"})
    assert r.status_code == 415 and "application/json" in r.json()["error"]["message"]
    r = c.post("/weights_checker", content=body, headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert r.status_code == 415
    r = c.post("/weights_checker", content=body, headers={"Content-Type": "application/json", "Origin": "https://evil.example"})
    assert r.status_code == 403 and "cross-origin" in r.json()["error"]["message"]
    r = c.post("/weights_checker", content=body, headers={"Content-Type": "application/json", "Origin": "null"})
    assert r.status_code == 403
    r = c.post("/flush_cache", headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    # a link or an <img> on another site cannot flush: browsers mark such GETs, and a marked GET is refused
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"}, {"Origin": "https://evil.example"},
                    {"Origin": srv.url, "Sec-Fetch-Site": "same-origin"}):
        assert c.get("/flush_cache", headers=headers).status_code == 403, headers
    r = c.get("/get_weights_by_name", params={"name": "model.norm.weight"}, headers={"Sec-Fetch-Site": "cross-site"})
    assert r.status_code == 403
    assert digest(engine) == before
    # frameworks (JSON, no Origin), the server's own origin and configured origins keep working
    assert c.post("/flush_cache").status_code == 200
    assert c.post("/flush_cache", json={}).status_code == 200
    assert c.get("/flush_cache").status_code == 200  # slime's and verl's GET (requests/aiohttp send no Origin)
    assert c.post("/flush_cache", headers={"Origin": srv.url}).status_code == 200
    r = c.post("/weights_checker", json={"action": "checksum"}, headers={"Origin": "https://trainer.example"})
    assert r.status_code == 200 and r.json()["digest"] == before


def test_host_header_must_name_this_server(http):
    srv, c = http
    r = c.get("/get_weight_version", headers={"Host": "attacker.example"})  # DNS rebinding: a name that now points here
    assert r.status_code == 403 and "--allowed-hosts" in r.json()["error"]["message"]
    for host in (f"127.0.0.1:{srv.port}", f"localhost:{srv.port}", "engine.internal", "[::1]:80", "10.1.2.3:30000"):
        assert c.get("/get_weight_version", headers={"Host": host}).status_code == 200, host
    assert c.get("/health", headers={"Host": "lb.example"}).status_code == 200  # probes


def test_empty_api_key_is_an_error(engine, tiny_qwen3, capsys):
    with pytest.raises(ValueError, match="api_key is empty"):
        create_app(engine, api_key="")
    from hotswap.cli import main

    assert main(["serve", "--model-path", str(tiny_qwen3), "--api-key", "", "--port", "0"]) == 2
    assert "--api-key" in capsys.readouterr().err


# ---- smaller ----------------------------------------------------------------------------------------


def test_made_up_http_methods_share_one_metrics_series(http):
    srv, c = http
    for i in range(20):
        c.request(f"FOO{i}", "/generate")
        c.request("GET", f"/no/such/path/{i}")
    text = c.get("/metrics").text
    lines = [line for line in text.splitlines() if line.startswith("hotswap_http_requests_total{")]
    assert not any("FOO" in line or "/no/such" in line for line in lines)
    assert len(lines) < 12, lines


def test_damaged_safetensors_header_is_named(engine, tiny_qwen3, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((Path(tiny_qwen3) / "config.json").read_text())
    header = json.dumps({"model.norm.weight": {"dtype": "F32", "shape": [64]}}).encode()
    (bad / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header + b"\0" * 256)
    before = digest(engine)
    res = engine.update_weights_from_disk(str(bad))
    assert not res.success and "model.safetensors" in res.message and "lacks data_offsets" in res.message, res.message
    assert "KeyError" not in res.message and digest(engine) == before


def test_a_shm_refusal_does_not_echo_a_huge_tensor_name(engine):
    """A descriptor reading past its block's end was refused with the tensor's name quoted whole (repr): a
    1 MB name over HTTP came back as a 1 MB error."""
    big = "x" * (1 << 20)
    with SharedMemoryBucket([("model.norm.weight", torch.zeros(64))], token=engine.get_ipc_token()) as bucket:
        desc = dict(bucket.descriptors[0], name=big, offset=4096)  # past the end of the block
        with ServerThread(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/update_weights_from_tensor", json={"named_tensors": [desc]})
    assert r.status_code == 400 and "runs past the end" in r.json()["message"], r.text[:300]
    assert len(r.content) < 4096, f"{len(r.content)}-byte refusal"


def test_an_overlap_refusal_does_not_echo_huge_tensor_names(engine):
    """Two shm descriptors sharing bytes were refused with both names quoted whole (a 2 MB error)."""
    with SharedMemoryBucket([("model.norm.weight", torch.zeros(64))], token=engine.get_ipc_token()) as bucket:
        descs = [dict(bucket.descriptors[0], name=c * (1 << 20)) for c in "ab"]  # the same bytes, twice
        with ServerThread(create_app(engine)) as srv, httpx.Client(base_url=srv.url, timeout=30) as c:
            r = c.post("/update_weights_from_tensor", json={"named_tensors": descs})
    assert r.status_code == 400 and "each tensor must have bytes of its own" in r.json()["message"], r.text[:300]
    assert len(r.content) < 4096, f"{len(r.content)}-byte refusal"
