"""SGLang's state rules for weight updates, and the adversarial cases around them: updates need the weights
resident (not the KV cache), memory moves while paused, repeated pause/continue are no-ops, a half-pushed
session is never committed by continue, content changes without a version are visible, and a checkpoint
or a rendezvous that never answers cannot hold the engine."""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time

import pytest
from engine_support import make_engine
from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import UPDATE_PROMPTS as PROMPTS
from hf_reference import greedy_ids, hf_greedy
from trainer_support import checkpoint_tensors

from hotswap import Engine
from hotswap.wire.checksum import state_dict_manifest


@pytest.fixture
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3) as eng:
        yield eng


def test_update_needs_weights_resident_not_kv_cache(engine, tiny_qwen3_v2):
    """verl / slime colocated: release all, resume weights, update, resume the KV cache, generate."""
    assert engine.release_memory_occupation().success
    refused = engine.update_weights_from_disk(str(tiny_qwen3_v2))
    assert not refused.success and "weights are released" in refused.message
    assert engine.resume_memory_occupation(["weights"]).success
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2")
    assert res.success, res.message
    assert engine.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3_v2))).success
    assert engine.resume_memory_occupation(["kv_cache", "cuda_graph"]).success
    assert greedy_ids(engine) == [hf_greedy(tiny_qwen3_v2, ids, 8)[0] for ids in PROMPTS]
    assert engine.weight_version == "v2"


def test_memory_moves_while_paused(engine, tiny_qwen3):
    """AReaL: pause -> release -> resume -> continue; repeated pause/continue answer success."""
    expected = greedy_ids(engine)
    assert engine.pause_generation().success
    assert engine.pause_generation().success  # a retry: no-op
    assert engine.release_memory_occupation().success
    assert engine.resume_memory_occupation().success
    assert engine.continue_generation().success
    assert engine.continue_generation().success  # a retry: no-op
    assert greedy_ids(engine) == expected


def test_version_given_inside_a_pause_is_readable_at_once(engine, tiny_qwen3_v2):
    """slime checks the version between its update and continue_generation."""
    assert engine.pause_generation().success
    assert engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="step-4").success
    assert engine.weight_version == "step-4" and engine.get_load().weight_version == "step-4"  # what /model_info reads
    assert engine.continue_generation().success
    out = engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    assert out["meta_info"]["weight_version"] == "step-4" and out["output_ids"] == hf_greedy(tiny_qwen3_v2, PROMPTS[0], 8)[0]


def test_continue_refuses_a_half_pushed_session(engine, tiny_qwen3_v2):
    before = engine.check_weights("checksum").digest
    new = list(checkpoint_tensors(tiny_qwen3_v2).items())
    assert engine.pause_generation().success
    assert engine.begin_weight_update().success
    assert engine.update_weights_from_tensor(new[:1]).success  # one tensor of many
    res = engine.continue_generation()
    assert not res.success and "end_weight_update" in res.message
    assert engine.get_load().paused  # still held: nothing ran on the mixture
    assert engine.end_weight_update(abort=True).success
    assert engine.check_weights("checksum").digest == before
    assert engine.continue_generation().success and not engine.get_load().paused
    # the same without a pause: the session holds generation, continue is refused, end commits
    assert engine.begin_weight_update().success
    assert engine.update_weights_from_tensor(new[:1]).success
    assert not engine.continue_generation().success
    assert engine.update_weights_from_tensor(new[1:]).success
    assert engine.end_weight_update(weight_version="whole").success
    assert greedy_ids(engine) == [hf_greedy(tiny_qwen3_v2, ids, 8)[0] for ids in PROMPTS]


def test_sglang_newer_disk_update_fields(engine, tiny_qwen3_v2):
    """SGLang's newer UpdateWeightFromDiskReqInput fields: keep_pause holds generation after the update (a request sent
    then waits) until continue_generation; is_async and a manifest, which nothing here would honour, are refused by
    name with the weights unchanged; torch_empty_cache, recapture_cuda_graph and token_step are taken."""
    before = engine.check_weights("checksum").digest
    for field, value in (("is_async", True), ("manifest", {"model.norm.weight": {"shape": [64]}})):
        res = engine.update_weights_from_disk(str(tiny_qwen3_v2), keep_pause=True, **{field: value})
        assert not res.success and field in res.message and "weights unchanged" in res.message, res.message
    assert engine.check_weights("checksum").digest == before and engine.weight_version == "default"
    assert not engine.get_load().paused  # a refused update holds nothing, keep_pause or not
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="step-5", keep_pause=True, torch_empty_cache=True,
                                          recapture_cuda_graph=True, token_step=5)
    assert res.success and "keep_pause" in res.message, res.message
    assert engine.get_load().paused
    done: list = []
    waiter = threading.Thread(target=lambda: done.append(engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)))
    waiter.start()
    time.sleep(0.5)
    assert not done  # held, not refused
    assert engine.continue_generation().success
    waiter.join(timeout=60)
    assert done and done[0]["output_ids"] == hf_greedy(tiny_qwen3_v2, PROMPTS[0], 8)[0]
    assert done[0]["meta_info"]["weight_version"] == "step-5"


def test_content_changes_without_a_version_are_visible(engine):
    assert engine.update_weight_version("v1").success
    res = engine.update_weights_from_tensor([])
    assert res.success and engine.weight_version == "v1"  # nothing changed: nothing to name
    assert engine.check_weights("reset_tensors").success
    assert engine.weight_version == "v1+reset"
    assert engine.update_weight_version("v2").success
    assert engine.release_memory_occupation(keep_weights_on_host=False).success
    assert engine.resume_memory_occupation().success
    assert engine.weight_version == "v2+discarded"
    assert engine.release_memory_occupation().success  # kept on host: the same weights come back
    assert engine.resume_memory_occupation().success
    assert engine.weight_version == "v2+discarded"


def test_an_oversized_checkpoint_index_is_refused_unread(engine, tiny_qwen3_v2, tmp_path, monkeypatch):
    """An index past MAX_INDEX_BYTES is refused by its size, not read whole into memory; weights unchanged."""
    from hotswap.weights import safetensors_io
    folder = tmp_path / "indexed"
    shutil.copytree(tiny_qwen3_v2, folder)
    (folder / "model.safetensors.index.json").write_text('{"weight_map": {"w": "model.safetensors"}}' + " " * 200)
    monkeypatch.setattr(safetensors_io, "MAX_INDEX_BYTES", 100)
    before = engine.check_weights("checksum").digest
    res = engine.update_weights_from_disk(str(folder))
    assert not res.success and "a checkpoint index has at most 100" in res.message, res.message
    assert engine.check_weights("checksum").digest == before and engine.weight_version == "default"


def test_checkpoint_that_is_a_fifo_is_refused(engine, tiny_qwen3_v2, tmp_path):
    folder = tmp_path / "fifo"
    shutil.copytree(tiny_qwen3_v2, folder)
    (folder / "model.safetensors").unlink()
    os.mkfifo(folder / "model.safetensors")
    before = engine.check_weights("checksum").digest
    start = time.monotonic()
    res = engine.update_weights_from_disk(str(folder))
    assert not res.success and "not regular files" in res.message
    assert time.monotonic() - start < 5
    assert engine.check_weights("checksum").digest == before and engine.weight_version == "default"


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_read_that_never_finishes_fails_at_its_deadline(tiny_qwen3, tiny_qwen3_v2, monkeypatch, device):
    """A hung mount: the reader's pread never returns. The update fails at weight_read_timeout_s and the
    weights stay as they were, also after the hung read comes back (on CUDA: the pinned staging path)."""
    from hotswap.weights import fast_reader

    release = threading.Event()
    real = fast_reader._read_into

    def hung(fd, view, offset):
        release.wait(30)
        real(fd, view, offset)

    with Engine(str(tiny_qwen3), device=device, page_size=4, weight_read_timeout_s=1.0) as engine:
        before = engine.check_weights("checksum").digest
        monkeypatch.setattr(fast_reader, "_read_into", hung)
        start = time.monotonic()
        res = engine.update_weights_from_disk(str(tiny_qwen3_v2))
        assert not res.success and "did not finish within 1 s" in res.message
        assert time.monotonic() - start < 10
        release.set()  # the hung read returns now: it must write nothing live
        time.sleep(0.3)
        monkeypatch.setattr(fast_reader, "_read_into", real)
        assert engine.check_weights("checksum").digest == before and engine.weight_version == "default"
        assert engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2").success
        assert engine.check_weights("checksum", expected=state_dict_manifest(checkpoint_tensors(tiny_qwen3_v2))).success


def test_rendezvous_that_never_answers_fails_within_its_timeout(engine):
    """A master that accepts TCP and never answers: the reply comes within timeout_s (plus a short grace),
    the name is not left "being set up", and a retry under the same name is answered too."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])  # accepted, never answered
            except OSError:
                pass

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        for _ in range(2):
            start = time.monotonic()
            res = engine.init_weights_update_group("127.0.0.1", port, 1, 2, group_name="silent", backend="gloo", timeout_s=1.0)
            assert not res.success and "silent" in res.message
            assert time.monotonic() - start < 8
            res = engine.destroy_weights_update_group("silent")
            assert not res.success and "being set up" not in res.message
        assert engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["output_ids"]  # the engine serves on
    finally:
        stop.set()
        t.join()
        for s in held:
            s.close()
        server.close()
