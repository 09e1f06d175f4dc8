"""Weights handed over by handle from a trainer process on the same host: shared-memory blocks for CPU
tensors (CUDA IPC handles on GPUs), described by plain JSON data and bucketed by IPCWeightPusher."""

from __future__ import annotations

import pytest
import torch
from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import UPDATE_PROMPTS as PROMPTS
from hf_reference import reference_ids as reference
from trainer_support import TrainerProcess, checkpoint_tensors, ipc_trainer_main, serve_engine_http

from hotswap import Engine
from hotswap.trainer import EngineResult, HttpEngineClient, IPCWeightPusher, state_dict_manifest, verify_engine_weights
from hotswap.wire.ipc import SharedMemoryBucket


def greedy_ids(engine) -> list[list[int]]:
    assert engine.flush_cache().success
    return [o["output_ids"] for o in engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)]


@pytest.fixture
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, check_weights_finite=True) as eng:
        yield eng
        assert eng.check_invariants().success


def test_shm_push_from_a_trainer_process(engine, base_url, tiny_qwen3, tiny_qwen3_v2):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    trainer = TrainerProcess({"base_url": base_url, "checkpoint": str(tiny_qwen3_v2),
                              "pushes": [{"version": "bad", "fault": (2, "nan")}, {"version": "v2"}]}, target=ipc_trainer_main)
    failed = trainer.expect("push_failed")
    pushed = trainer.expect("pushed")
    trainer.expect("done")
    assert trainer.join() == 0
    assert "NaN or Inf" in failed["reason"] and failed["rolled_back"]
    assert pushed["buckets"] == 3 and pushed["tensors"] == len(v2) and pushed["version"] == "v2"
    # one block per bucket, each unlinked once its call returned
    assert len(failed["blocks"]) == 3 and len(pushed["blocks"]) == 3
    assert failed["leftover_blocks"] == [] and pushed["leftover_blocks"] == []
    assert verify_engine_weights(engine, v2).success
    assert verify_engine_weights(HttpEngineClient(base_url), v2, dtype="auto").success
    assert greedy_ids(engine) == reference(tiny_qwen3_v2)


def test_in_process_ipc_pusher_and_verify(engine, tiny_qwen3, tiny_qwen3_v2):
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    assert not verify_engine_weights(engine, v2).success
    with IPCWeightPusher(engine, bucket_bytes=200_000) as pusher:
        res = pusher.push(v2, weight_version="v2")
    assert res.num_buckets == 3 and res.weight_version == "v2" and res.num_bytes == sum(t.numel() * 4 for t in v2.values())
    check = verify_engine_weights(engine, v2)
    assert isinstance(check, EngineResult) and check.success and check.get("mismatches") == []
    bad = verify_engine_weights(engine, v1)
    assert not bad.success and len(bad.get("mismatches")) == len(v1)
    # a bf16 trainer copy proves nothing about fp32 weights, and says which differ
    assert not verify_engine_weights(engine, v2, dtype=torch.bfloat16).success


def malformed(block_name: str, size: int) -> list[tuple[object, str]]:
    ok = {"name": "model.norm.weight", "dtype": "float32", "shape": [64], "kind": "shm", "shm_name": block_name, "offset": 0}
    return [
        ({k: v for k, v in ok.items() if k != "dtype"}, "lacks field(s) ['dtype']"),
        ({**ok, "dtype": "int4"}, "unknown dtype 'int4'"),
        ({**ok, "kind": "pickle"}, "unknown handle kind 'pickle'"),
        ({**ok, "shm_name": block_name + "0"}, "does not exist"),
        ({**ok, "shm_name": "hotswap-no-such-block"}, "was not made for this engine"),
        ({**ok, "shm_name": "../etc/passwd"}, "invalid shared-memory block name"),
        ({**ok, "offset": size}, "runs past the end"),
        ({**ok, "offset": -4}, "negative offset"),
        ({**ok, "offset": "0"}, "must be an integer"),
        ({**ok, "shape": [-1]}, "non-negative integers"),
        ({**ok, "shape": "64"}, "non-negative integers"),
        ({**ok, "name": 7}, "name must be a non-empty string"),
        ({**ok, "shape": [65]}, "runs past the end"),
        ({**ok, "shape": [32]}, "shape mismatch"),
        ({**ok, "name": "model.nope.weight"}, "unknown parameter 'model.nope.weight'"),
        ({**ok, "kind": "cuda_ipc"}, "lacks field(s)"),
        ("model.norm.weight", "neither a (name, tensor) pair nor a handle descriptor"),
    ]


def test_malformed_descriptors_are_refused(engine, base_url, tiny_qwen3):
    before = engine.check_weights("checksum").digest
    expected = reference(tiny_qwen3)
    client = HttpEngineClient(base_url)
    with SharedMemoryBucket([("model.norm.weight", torch.ones(64))], token=engine.get_ipc_token()) as block:
        for desc, text in malformed(block.name, block.block.size):
            for via in (engine, client):
                res = EngineResult.of(via.update_weights_from_tensor([desc]))
                assert not res.success and text in res.message, (via, desc, res.message)
        # inside a session a refused bucket fails the session: nothing of it is ever committed
        good = block.descriptors
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(good).success
        assert not engine.update_weights_from_tensor([malformed(block.name, block.block.size)[3][0]]).success
        end = engine.end_weight_update()
        assert not end.success and end.rolled_back
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == expected
    assert engine.weight_version == "default"


def test_freed_block_is_refused(engine):
    before = engine.check_weights("checksum").digest
    block = SharedMemoryBucket([("model.norm.weight", torch.ones(64))], token=engine.get_ipc_token())
    descs = block.descriptors
    block.close()
    res = engine.update_weights_from_tensor(descs)
    assert not res.success and "does not exist (freed too early?)" in res.message
    assert engine.check_weights("checksum").digest == before


def test_http_client_rejects_tensors_and_reports_unreachable_engines():
    from hotswap.trainer import EngineConnectionError
    from hotswap.trainer.distributed import free_port

    client = HttpEngineClient(f"http://127.0.0.1:{free_port()}", timeout_s=2)
    with pytest.raises(TypeError, match="descriptors"):
        client.update_weights_from_tensor([("model.norm.weight", torch.ones(64))])
    with pytest.raises(EngineConnectionError, match="cannot reach the engine"):
        client.begin_weight_update()
    with pytest.raises(Exception) as info:
        IPCWeightPusher(client).push({"model.norm.weight": torch.ones(64)})
    assert "begin_weight_update" in str(info.value) and "cannot reach" in str(info.value)


def recording_server(redirect_to: str | None = None):
    """A server that records (method, path, Authorization) and answers success; with `redirect_to`, it
    redirects /get_model_info and /weights_checker there instead."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    seen = []

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _answer(self):
            seen.append((self.command, self.path, self.headers.get("Authorization")))
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if redirect_to and self.path in ("/get_model_info", "/weights_checker"):
                self.send_response(302 if self.command == "GET" else 307)
                self.send_header("Location", redirect_to + self.path)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = json.dumps({"ipc_token": "abc123"} if self.path == "/get_ipc_token" else {"success": True, "weight_version": "w"}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = _answer

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return f"http://127.0.0.1:{server.server_address[1]}", server, seen


def test_http_client_sends_the_key_on_every_call_and_never_elsewhere():
    other_url, other, other_seen = recording_server()
    url, server, seen = recording_server(redirect_to=other_url)
    try:
        client = HttpEngineClient(url + "/", api_key="s3cret-key", timeout_s=5)
        assert "s3cret" not in repr(client)
        calls = [("init_weights_update_group", ("127.0.0.1", 1234, 1, 2)), ("update_weights_from_distributed", (["a"], ["float32"], [[2]])),
                 ("destroy_weights_update_group", ()), ("update_weights_from_tensor", ([],)), ("update_weights_from_disk", ("/m",)),
                 ("begin_weight_update", ()), ("end_weight_update", ()), ("check_weights", ("checksum",)),
                 ("get_weights_by_name", ("w",)), ("get_model_info", ()), ("get_ipc_token", ())]
        replies = {name: getattr(client, name)(*args) for name, args in calls}
        assert {path for _, path, _ in seen} == set(HttpEngineClient.ROUTES.values()) | {"/get_model_info", "/get_ipc_token"}
        assert all(auth == "Bearer s3cret-key" for _, _, auth in seen), seen
        # a redirect is an error naming it, never followed with the key to another host
        assert not replies["get_model_info"] and "redirects are not followed" in replies["get_model_info"].message
        assert not replies["check_weights"] and other_seen == []
    finally:
        server.shutdown()
        other.shutdown()


@pytest.mark.parametrize("url, problem", [("http://user:s3cret@127.0.0.1:30000", "credentials"), ("ftp://127.0.0.1:30000", "http://"),
                                          ("127.0.0.1:30000", "http://"), ("http://:30000", "no host"),
                                          ("http://127.0.0.1:30000/?key=s3cret", "query"), ("http://127.0.0.1:port", "port")])
def test_http_client_refuses_bad_base_urls_without_echoing_credentials(url, problem):
    with pytest.raises(ValueError, match=problem) as info:
        HttpEngineClient(url)
    assert "s3cret" not in str(info.value)


def test_http_client_bounds_a_silent_engine():
    """A port that accepts connections and never answers: the call fails after timeout_s, naming the URL
    and that the engine may still act on it."""
    import socket

    from hotswap.trainer import EngineConnectionError

    with socket.create_server(("127.0.0.1", 0)) as silent:
        url = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(EngineConnectionError, match=f"no reply from the engine at {url}/begin_weight_update within 0.3 s") as info:
            HttpEngineClient(url, timeout_s=0.3).begin_weight_update()
        assert info.value.outcome_unknown


@pytest.mark.gpu
def test_cuda_ipc_push_from_a_trainer_process(tiny_qwen3, tiny_qwen3_v2):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    with Engine(str(tiny_qwen3), device="cuda", dtype="float32") as engine:
        url, server = serve_engine_http(engine)
        trainer = TrainerProcess({"base_url": url, "checkpoint": str(tiny_qwen3_v2), "device": "cuda",
                                  "pushes": [{"version": "v2"}]}, target=ipc_trainer_main)
        pushed = trainer.expect("pushed", timeout=120)
        trainer.expect("done")
        assert trainer.join() == 0
        assert pushed["buckets"] == 3 and pushed["blocks"] == []
        assert engine.check_weights("checksum", expected=state_dict_manifest(v2)).success
        server.shutdown()
