"""A trainer in a second process pushes weights over torch.distributed (gloo on the CPU) into an engine in
this process, through the engine's HTTP routes: the contract SGLang-driving RL frameworks use."""

from __future__ import annotations

import threading
import time

import pytest
from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import UPDATE_PROMPTS as PROMPTS
from hf_reference import greedy_ids
from hf_reference import reference_ids as reference
from trainer_support import TrainerProcess, checkpoint_tensors, serve_engine_http

from hotswap import Engine
from hotswap.trainer import free_port, state_dict_manifest


@pytest.fixture
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        yield eng
        assert eng.check_invariants().success


def spec(base_url, checkpoint, pushes, **kw) -> dict:
    return {"base_url": base_url, "checkpoint": str(checkpoint), "master_port": free_port(), "group_name": kw.pop("group_name", "wg"),
            "buckets": 3, "pushes": pushes, **kw}


@pytest.mark.parametrize("load_format", ["flattened_bucket", None])
def test_trainer_process_pushes_three_buckets(engine, base_url, tiny_qwen3_v2, load_format):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    trainer = TrainerProcess(spec(base_url, tiny_qwen3_v2, [{"version": "v2"}], load_format=load_format))
    manifest = trainer.expect("connected")["manifest"]
    pushed = trainer.expect("pushed")
    assert trainer.expect("closed") == [True]  # the group was destroyed on the engine too
    assert trainer.join() == 0
    assert pushed["buckets"] == 3 and pushed["tensors"] == len(v2) and pushed["version"] == "v2"
    assert pushed["bytes"] == sum(t.numel() * t.element_size() for t in v2.values())
    # the engine holds exactly the trainer's weights, and generates what transformers does with them
    assert manifest == state_dict_manifest(v2)
    check = engine.check_weights("checksum", expected=manifest)
    assert check.success, check.message
    assert check.checksums == manifest
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == reference(tiny_qwen3_v2)
    assert all(o["meta_info"]["weight_version"] == "v2" for o in outs)
    assert engine.weight_version == "v2"
    res = engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], group_name="wg")
    assert not res.success and "no weights update group 'wg'" in res.message


def test_update_without_group_is_refused(engine, tiny_qwen3):
    before = engine.check_weights("checksum").digest
    res = engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], group_name="nope")
    assert not res.success
    assert "no weights update group 'nope'" in res.message and "init_weights_update_group" in res.message
    assert res.extra.received is False
    assert not engine.destroy_weights_update_group("nope").success
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == reference(tiny_qwen3)


def test_init_times_out_when_the_trainer_never_joins(engine, tiny_qwen3):
    expected = reference(tiny_qwen3)
    results = []
    start = time.monotonic()
    t = threading.Thread(target=lambda: results.append(engine.init_weights_update_group(
        "127.0.0.1", free_port(), rank_offset=1, world_size=2, group_name="lonely", backend="gloo", timeout_s=3)))
    t.start()
    time.sleep(0.2)
    # the rendezvous waits in a helper thread: the engine keeps serving meanwhile
    assert greedy_ids(engine) == expected
    served_at = time.monotonic() - start
    again = engine.init_weights_update_group("127.0.0.1", free_port(), 1, 2, group_name="lonely", timeout_s=3)
    assert not again.success and "still being set up" in again.message
    t.join(30)
    elapsed = time.monotonic() - start
    res = results[0]
    assert served_at < 3 <= elapsed < 15
    assert not res.success
    assert "'lonely'" in res.message and "within 3 s" in res.message and "timed out" in res.message
    assert "frame #" not in res.message  # the C++ stack trace is cut off
    assert not engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], group_name="lonely").success
    assert greedy_ids(engine) == expected


def test_init_refuses_bad_arguments(engine):
    port = free_port()
    for kw, text in [({"rank_offset": 0}, "must be in 1..world_size-1"), ({"rank_offset": 2}, "must be in 1..world_size-1"),
                     ({"backend": "mpi"}, "unsupported backend"), ({"backend": "nccl"}, "needs a CUDA engine"),
                     ({"timeout_s": 0}, "timeout_s must be positive")]:
        args = {"master_address": "127.0.0.1", "master_port": port, "rank_offset": 1, "world_size": 2, "group_name": "g", **kw}
        res = engine.init_weights_update_group(**args)
        assert not res.success and text in res.message, (kw, res.message)


def test_bad_buckets_are_received_then_refused(engine, base_url, tiny_qwen3, tiny_qwen3_v2):
    before = engine.check_weights("checksum").digest
    expected = reference(tiny_qwen3)
    trainer = TrainerProcess(spec(base_url, tiny_qwen3_v2, [{"version": "bad1", "fault": (2, "unknown")},
                                                            {"version": "bad2", "fault": (1, "shape")}]))
    trainer.expect("connected")
    unknown = trainer.expect("push_failed")
    shape = trainer.expect("push_failed")
    assert trainer.expect("closed") == [True] and trainer.join() == 0
    # received (the trainer's broadcast completed and the group stayed usable), then refused and rolled back
    for failure, text in [(unknown, "unknown parameter 'model.layerz."), (shape, "shape mismatch")]:
        assert text in failure["reason"]
        assert failure["received"] == [True] and not failure["group_broken"] and failure["rolled_back"]
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == expected
    assert engine.weight_version == "default"


def test_group_survives_a_refused_bucket(engine, base_url, tiny_qwen3_v2):
    """Lockstep held: after a refused push, the same group carries a good one."""
    trainer = TrainerProcess(spec(base_url, tiny_qwen3_v2, [{"version": "bad", "fault": (2, "shape")}, {"version": "v2"}],
                                  load_format=None))
    trainer.expect("connected")
    assert "shape mismatch" in trainer.expect("push_failed")["reason"]
    assert trainer.expect("pushed")["version"] == "v2"
    assert trainer.expect("closed") == [True] and trainer.join() == 0
    assert engine.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3_v2))).success


def test_two_engine_replicas_one_group(engine, base_url, tiny_qwen3, tiny_qwen3_v2):
    """Two replicas (this process and another) join one group at rank offsets 1 and 2; one broadcast feeds both."""
    from trainer_support import CTX, engine_main

    stop = CTX.Event()
    other = TrainerProcess({"checkpoint": str(tiny_qwen3), "stop": stop}, target=engine_main)
    other_url = other.expect("ready", timeout=60)
    trainer = TrainerProcess(spec(None, tiny_qwen3_v2, [{"version": "v2"}], base_urls=[base_url, other_url]))
    manifest = trainer.expect("connected")["manifest"]
    assert trainer.expect("pushed")["buckets"] == 3
    assert trainer.expect("closed") == [True, True] and trainer.join() == 0
    stop.set()
    assert other.expect("checksums") == manifest
    assert other.join() == 0
    assert engine.check_weights("checksum", expected=manifest).success
    assert greedy_ids(engine) == reference(tiny_qwen3_v2)


def test_through_the_real_http_server(engine, tiny_qwen3, tiny_qwen3_v2):
    """The same trainer against hotswap.server's routes (not the test shim): distributed, then IPC back."""
    pytest.importorskip("fastapi")
    from trainer_support import ipc_trainer_main

    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    srv = ServerThread(create_app(engine)).start()
    try:
        trainer = TrainerProcess(spec(srv.url, tiny_qwen3_v2, [{"version": "v2"}, {"version": "bad", "fault": (2, "shape")}]))
        manifest = trainer.expect("connected")["manifest"]
        assert trainer.expect("pushed")["buckets"] == 3
        failed = trainer.expect("push_failed")
        assert "shape mismatch" in failed["reason"] and failed["received"] == [True] and failed["rolled_back"]
        assert trainer.expect("closed") == [True] and trainer.join() == 0
        assert engine.check_weights("checksum", expected=manifest).success and engine.weight_version == "v2"
        back = TrainerProcess({"base_url": srv.url, "checkpoint": str(tiny_qwen3), "pushes": [{"version": "v1-again"}]},
                              target=ipc_trainer_main)
        assert back.expect("pushed")["leftover_blocks"] == []
        back.expect("done")
        assert back.join() == 0
        assert engine.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3))).success
        assert greedy_ids(engine) == reference(tiny_qwen3)
    finally:
        srv.stop()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["nccl", "gloo"])
def test_gpu_engine_receives_from_a_trainer_process(tiny_qwen3, tiny_qwen3_v2, backend):
    """NCCL needs the two ranks on different GPUs (trainer on cuda:0, engine on cuda:1); gloo stages CUDA
    tensors through the host and runs on one GPU."""
    import torch

    if backend == "nccl" and torch.cuda.device_count() < 2:
        pytest.skip("NCCL between two processes needs two GPUs")
    engine_device = "cuda:1" if backend == "nccl" else "cuda:0"
    with Engine(str(tiny_qwen3), device=engine_device, dtype="float32") as eng:
        url, server = serve_engine_http(eng)
        trainer = TrainerProcess(spec(url, tiny_qwen3_v2, [{"version": "v2"}, {"version": "bad", "fault": (2, "shape")}],
                                      backend=backend, device="cuda:0" if backend == "nccl" else "cpu", timeout_s=120))
        manifest = trainer.expect("connected", timeout=120)["manifest"]
        assert trainer.expect("pushed", timeout=120)["buckets"] == 3
        assert trainer.expect("push_failed")["received"] == [True]
        assert trainer.expect("closed") == [True] and trainer.join() == 0
        assert eng.check_weights("checksum", expected=manifest).success
        server.shutdown()


def test_bucket_limit_takes_one_oversized_tensor_but_not_many():
    """A tensor larger than weight_update_bucket_bytes alone in its bucket is received (a trainer cannot
    split it) up to the size of the model's largest parameter; several tensors over the limit, or one larger
    than any parameter, are refused before anything is received."""
    from hotswap.errors import HotswapError
    from hotswap.weights.distributed_receiver import plan_receive

    metas = plan_receive(["model.embed_tokens.weight"], ["bfloat16"], [[1000, 64]], "flattened_bucket", max_bytes=1024, max_numel=64000)
    assert [m.name for m in metas] == ["model.embed_tokens.weight"]
    with pytest.raises(HotswapError, match="2 tensors.*exceeds the configured limit"):
        plan_receive(["a", "b"], ["bfloat16", "bfloat16"], [[600], [600]], "flattened_bucket", max_bytes=1024, max_numel=64000)
    with pytest.raises(HotswapError, match="larger than the configured limit of 1024 bytes .* and than any parameter"):
        plan_receive(["w"], ["float32"], [[10**6, 10**6]], None, max_bytes=1024, max_numel=64000)
    # a hostile name (over HTTP) is quoted shortened, never echoed whole
    with pytest.raises(HotswapError, match="and than any parameter") as refused:
        plan_receive(["w" * (1 << 20)], ["float32"], [[10**6, 10**6]], None, max_bytes=1024, max_numel=64000)
    assert len(str(refused.value)) < 1024
