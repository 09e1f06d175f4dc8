"""The weight lifecycle on the Engine: atomic updates, checksums, reads, release/resume, saves,
versions and in-flight requests."""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
import torch
from engine_support import fail_disk_read, make_engine
from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import UPDATE_PROMPTS as PROMPTS
from hf_reference import greedy_ids, hf_greedy, prompt_ids, reference_ids
from safetensors.torch import save_file
from trainer_support import checkpoint_tensors
from transformers import AutoModelForCausalLM

from hotswap import HotswapError
from hotswap.wire.checksum import state_dict_manifest


@pytest.fixture
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3) as eng:
        yield eng
        assert eng.check_invariants().success


def test_update_from_disk_matches_new_checkpoint(engine, tiny_qwen3, tiny_qwen3_v2):
    ptrs = {n: p.data_ptr() for n, p in engine.model_runner.model.named_parameters()}
    assert greedy_ids(engine) == [hf_greedy(tiny_qwen3, ids, 8)[0] for ids in PROMPTS]
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2")
    assert res.success, res.message
    assert res.weight_version == "v2" and res.num_tensors > 0
    outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
    assert [o["output_ids"] for o in outs] == [hf_greedy(tiny_qwen3_v2, ids, 8)[0] for ids in PROMPTS]
    assert all(o["meta_info"]["weight_version"] == "v2" for o in outs)
    # copied into the existing storage: CUDA graphs captured before stay valid
    assert {n: p.data_ptr() for n, p in engine.model_runner.model.named_parameters()} == ptrs
    manifest = state_dict_manifest(checkpoint_tensors(tiny_qwen3_v2))
    assert engine.check_weights("checksum", expected=manifest).success
    # SGLang's rule: an update without a version leaves the version as it was
    res = engine.update_weights_from_disk(str(tiny_qwen3))
    assert res.success and res.weight_version == "v2"


def test_prefix_cache_flushed_after_update(engine, tiny_qwen3_v2):
    ids = prompt_ids(5, 40)
    engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert engine.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]["cached_tokens"] > 0
    assert engine.update_weights_from_disk(str(tiny_qwen3_v2)).success
    out = engine.generate(input_ids=ids, sampling_params=GREEDY)
    assert out["meta_info"]["cached_tokens"] == 0
    assert out["output_ids"] == hf_greedy(tiny_qwen3_v2, ids, 8)[0]


def test_no_update_leaves_old_kv_to_match_whatever_flush_cache_says(engine, tiny_qwen3, tiny_qwen3_v2):
    """flush_cache=False (slime sends it on every bucket but the last) keeps no KV of the old weights matchable:
    a prompt cached before an update is computed again, under the new weights it is labelled with."""
    new = sorted(checkpoint_tensors(tiny_qwen3_v2).items())
    ids = prompt_ids(6, 40)
    try:
        engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert engine.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]["cached_tokens"] > 0
        assert engine.update_weights_from_tensor(new, flush_cache=False, weight_version="v2-noflush").success
        out = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert out["meta_info"]["cached_tokens"] == 0
        assert out["output_ids"] == hf_greedy(tiny_qwen3_v2, ids, 8)[0]
    finally:
        assert engine.update_weights_from_disk(str(tiny_qwen3)).success


def _refused_update_keeps_weights(engine, call):
    before = engine.check_weights("checksum").digest
    outputs = greedy_ids(engine)
    version = engine.weight_version
    res = call()
    assert not res.success and res.message
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == outputs
    assert engine.weight_version == version
    return res


def test_refused_updates_leave_weights_bit_exact(engine, tiny_qwen3, tiny_qwen2, tmp_path):
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_disk(str(tmp_path / "missing")))
    assert "not a directory" in res.message
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_disk(str(tiny_qwen2)))
    assert "unknown parameter" in res.message or "shape mismatch" in res.message
    truncated = tmp_path / "truncated"
    shutil.copytree(tiny_qwen3, truncated)
    f = truncated / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_disk(str(truncated)))
    assert "truncated" in res.message
    bad = list(checkpoint_tensors(tiny_qwen3).items())
    bad[0] = (bad[0][0], torch.zeros(3, 3))
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_tensor(bad))
    assert "shape mismatch" in res.message
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_tensor([("model.nope.weight", torch.zeros(2))]))
    assert "unknown parameter" in res.message
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_tensor([(bad[1][0], bad[1][1].to(torch.int32))]))
    assert "dtype" in res.message


def test_fault_mid_read_rolls_back(tiny_qwen3, tiny_qwen3_v2, monkeypatch):
    # small windows on one thread: the fault lands after earlier windows were copied into the live weights
    with make_engine(tiny_qwen3, weight_load_threads=1, weight_load_staging_bytes=2 * 16384) as engine:
        fail_disk_read(monkeypatch, at=5)
        res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_disk(str(tiny_qwen3_v2)))
    assert "injected I/O error" in res.message and res.rolled_back


def test_update_from_tensor_and_get_weights_by_name(engine, tiny_qwen3_v2):
    new = checkpoint_tensors(tiny_qwen3_v2)
    res = engine.update_weights_from_tensor(list(new.items()), weight_version="t1")
    assert res.success, res.message
    assert engine.check_weights("checksum", expected=state_dict_manifest(new)).success
    assert greedy_ids(engine) == [hf_greedy(tiny_qwen3_v2, ids, 8)[0] for ids in PROMPTS]
    for name in ("model.layers.0.self_attn.k_proj.weight", "model.layers.1.mlp.up_proj.weight", "model.layers.0.self_attn.q_norm.weight"):
        out = engine.get_weights_by_name(name, truncate_size=3)  # SGLang's reply: the bare nested list
        torch.testing.assert_close(torch.tensor(out), new[name][:3].float(), rtol=0, atol=0)
    with pytest.raises(HotswapError, match="unknown parameter 'model.layers.9.mlp.up_proj.weight'"):
        engine.get_weights_by_name("model.layers.9.mlp.up_proj.weight")


def test_get_weights_by_name_tied_llama(tiny_llama):
    with make_engine(tiny_llama) as eng:
        hf = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
        for name in ("lm_head.weight", "model.embed_tokens.weight", "model.layers.1.self_attn.v_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
            out = eng.get_weights_by_name(name, truncate_size=4)
            torch.testing.assert_close(torch.tensor(out), hf.state_dict()[name][:4], rtol=0, atol=0)
        assert eng.check_weights("checksum", expected=state_dict_manifest(hf.state_dict())).success


def test_check_weights_snapshot_compare_reset(engine, tiny_qwen3):
    assert not engine.check_weights("compare").success
    assert engine.check_weights("snapshot").success
    assert engine.check_weights("compare").success
    assert engine.check_weights("reset_tensors").success
    res = engine.check_weights("compare")
    assert not res.success and res.mismatches
    assert engine.update_weights_from_disk(str(tiny_qwen3)).success
    assert engine.check_weights("compare").success  # the update rewrote every tensor
    assert not engine.check_weights("bogus").success


def test_release_resume_on_cpu(engine):
    before = engine.check_weights("checksum").digest
    outputs = greedy_ids(engine)
    assert engine.release_memory_occupation().success
    runner = engine.model_runner
    assert not runner.kv_cache.has_storage
    assert all(p.untyped_storage().nbytes() <= p.element_size() for p in runner.model.parameters())
    assert not engine.release_memory_occupation(["weights"]).success  # already released
    assert not engine.check_weights("checksum").success
    assert not engine.update_weights_from_tensor([]).success
    assert engine.resume_memory_occupation().success
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == outputs
    assert not engine.resume_memory_occupation(["kv_cache"]).success  # nothing released
    assert not engine.release_memory_occupation(["gpu"]).success  # unknown tag
    assert engine.release_memory_occupation(["kv_cache"]).success
    assert engine.resume_memory_occupation(["kv_cache"]).success
    assert greedy_ids(engine) == outputs



def test_empty_tags_release_and_resume_everything_as_sglang(engine):
    """SGLang's scheduler reads `tags: []` as every tag (release_memory_occupation / resume_memory_occupation:
    `if tags is None or len(tags) == 0: tags = GPU_MEMORY_ALL_TYPES`); an empty list released nothing here and
    answered success, and its resume was refused."""
    outputs = greedy_ids(engine)
    out = engine.release_memory_occupation([])
    assert out.success and engine.get_load().memory_released == ["cuda_graph", "kv_cache", "weights"], out.message
    assert engine.resume_memory_occupation([]).success
    assert engine.get_load().memory_released == []
    assert greedy_ids(engine) == outputs

def test_release_refused_while_busy(engine):
    results = []
    sp = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}
    t = threading.Thread(target=lambda: results.append(engine.generate(input_ids=prompt_ids(3, 8), sampling_params=sp)))
    t.start()
    while engine.get_load().num_running == 0:
        time.sleep(0.005)
    res = engine.release_memory_occupation()
    flush = engine.flush_cache()
    t.join()
    assert not res.success and "running" in res.message
    assert not flush.success
    assert results[0]["meta_info"]["completion_tokens"] == 400


def test_save_sharded_model_round_trips(engine, tiny_qwen3_v2, tmp_path):
    assert engine.update_weights_from_disk(str(tiny_qwen3_v2)).success
    out = tmp_path / "saved"
    res = engine.save_sharded_model(str(out), max_size=30_000)
    assert res.success, res.message
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    assert state_dict_manifest(checkpoint_tensors(out)) == state_dict_manifest(checkpoint_tensors(tiny_qwen3_v2))
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    assert engine.check_weights("checksum", expected=state_dict_manifest(hf.state_dict())).success
    with make_engine(out) as again:
        assert again.check_weights("checksum").digest == engine.check_weights("checksum").digest
    assert not engine.save_sharded_model(str(out)).success  # refuses to mix with existing shards



def test_a_save_after_the_launch_folder_is_gone_still_loads(tiny_qwen3, tiny_qwen3_v2, tmp_path):
    """A trainer's checkpoint retention deletes old step folders, the one the engine was launched from among them: a
    save took config.json and the tokenizer from that folder only, answered success and wrote weights HF cannot load.
    They come from the folder the served weights were last read from."""
    launch, step = tmp_path / "step_0", tmp_path / "step_1"
    shutil.copytree(tiny_qwen3, launch)
    shutil.copytree(tiny_qwen3_v2, step)
    with make_engine(launch) as eng:
        assert eng.update_weights_from_disk(str(step)).success
        shutil.rmtree(launch)
        out = tmp_path / "saved"
        res = eng.save_sharded_model(str(out))
        assert res.success, res.message
        assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
        hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
        assert eng.check_weights("checksum", expected=state_dict_manifest(hf.state_dict())).success

def test_save_remote_model(engine, tmp_path):
    res = engine.save_remote_model(f"file://{tmp_path}/remote")
    assert res.success, res.message
    assert state_dict_manifest(checkpoint_tensors(tmp_path / "remote")) == engine.check_weights("checksum").checksums
    assert not engine.save_remote_model("nosuchproto://x").success


def _slow_request(engine, results, tokens=200, seed=11):
    ids = prompt_ids(seed, 6)
    sp = {"max_new_tokens": tokens, "temperature": 0, "ignore_eos": True}
    t = threading.Thread(target=lambda: results.append(engine.generate(input_ids=ids, sampling_params=sp)))
    t.start()
    while engine.get_load().num_running == 0 and not results:
        time.sleep(0.002)
    return t, ids


def test_update_waits_for_running_requests(engine, tiny_qwen3, tiny_qwen3_v2):
    results = []
    t, ids = _slow_request(engine, results)
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2")
    t.join()
    assert res.success
    out = results[0]
    assert out["meta_info"]["weight_version"] == "default" and "weight_versions" not in out["meta_info"]
    assert out["output_ids"] == hf_greedy(tiny_qwen3, ids, 200)[0]


def test_update_aborts_running_requests_when_asked(engine, tiny_qwen3_v2):
    results = []
    t, _ = _slow_request(engine, results, tokens=400)
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), abort_all_requests=True)
    t.join()
    assert res.success
    assert results[0]["meta_info"]["finish_reason"]["type"] == "abort"


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs procfs")
@pytest.mark.parametrize("which", ["index", "shard"])
def test_a_checkpoint_file_that_is_a_proc_file_is_refused_without_reading_it(engine, tmp_path, tiny_qwen3, which):
    """procfs files read as regular files of size 0, and some never end (/proc/kmsg): an index or shard symlinked to
    one held the scheduler in a read for weight_read_timeout_s (a security review). Now the opened file must be a
    regular one with data: refused at once, weights unchanged."""
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_qwen3, folder)
    shard = next(folder.glob("*.safetensors"))
    if which == "index":
        (folder / "model.safetensors.index.json").symlink_to("/proc/self/status")
    else:
        shard.unlink()
        shard.symlink_to("/proc/self/status")
    before = engine.check_weights("checksum").digest
    start = time.monotonic()
    res = engine.update_weights_from_disk(str(folder))
    assert not res.success and "is empty or not a regular file" in res.message, res.message
    assert time.monotonic() - start < 30 and engine.check_weights("checksum").digest == before


def test_an_update_refused_for_its_input_aborts_nothing(engine, tmp_path, tiny_qwen3):
    """abort_all_requests aborts once the update's input passed its checks: a folder without weights, a payload
    that names no parameter or a bad version is refused with the requests running on (a refusal changes
    nothing). The black-box sweep found the disk refusal aborting and the same refusal at the HTTP layer not."""
    results = []
    t, ids = _slow_request(engine, results, tokens=400)
    before = engine.check_weights("checksum").digest
    for refused in (lambda: engine.update_weights_from_disk(str(tmp_path), abort_all_requests=True),
                    lambda: engine.update_weights_from_tensor([("model.no_such.weight", torch.zeros(2))], abort_all_requests=True),
                    lambda: engine.update_weights_from_disk(str(tiny_qwen3), weight_version="x" * 10_000, abort_all_requests=True)):
        res = refused()
        assert not res.success and "weights unchanged" in res.message, res.message
    assert engine.get_load().num_running == 1  # still generating: the refusals ran beside it
    t.join()
    meta = results[0]["meta_info"]
    assert meta["finish_reason"]["type"] == "length", meta["finish_reason"]
    assert results[0]["output_ids"] == hf_greedy(tiny_qwen3, ids, 400)[0]
    assert engine.check_weights("checksum").digest == before


@pytest.mark.parametrize("mode", ["in_place", "retract"])
def test_pause_update_continue_reports_per_token_versions(engine, tiny_qwen3_v2, mode):
    results = []
    t, _ = _slow_request(engine, results, tokens=300)
    assert engine.pause_generation(mode).success
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2", flush_cache=True)
    assert res.success, res.message
    assert engine.continue_generation().success
    t.join()
    meta = results[0]["meta_info"]
    assert meta["finish_reason"]["type"] == "length"
    assert meta["weight_version"] == "v2"
    versions = meta["weight_versions"]
    assert versions[0] == "default" and versions[-1] == "v2" and len(versions) == 300
    assert versions == sorted(versions, key=lambda v: v == "v2")  # old tokens first, then new


def test_pause_abort_and_refusals(engine):
    results = []
    t, _ = _slow_request(engine, results, tokens=400)
    assert engine.pause_generation("abort").success
    t.join()
    assert results[0]["meta_info"]["finish_reason"]["type"] == "abort"
    assert engine.pause_generation("abort").success  # already paused: a no-op (SGLang's rule; frameworks retry)
    assert not engine.pause_generation("sideways").success
    assert engine.continue_generation().success
    assert engine.continue_generation().success  # not paused: a no-op
    assert not engine.update_weights_from_distributed(["x"], ["float32"], [[1]], group_name="nope").success
    assert engine.update_weight_version("rl-7").success
    assert engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)["meta_info"]["weight_version"] == "rl-7"


def test_checkpoint_engine_ipc_needs_cuda(engine):
    """checkpoint-engine hands over CUDA IPC buffers; the exchange itself is in test_checkpoint_engine_ipc.py."""
    res = _refused_update_keeps_weights(engine, lambda: engine.update_weights_from_ipc({"GPU-0": "ipc:///tmp/x.sock"}))
    assert "needs a CUDA engine" in res.message


def test_an_update_inside_a_pause_in_place_leaves_no_old_kv_to_match(engine, tiny_qwen3_v2):
    """The pause's update commits while a frozen request still holds pages: every prefix cached under the old
    weights goes anyway, and the frozen request's KV never enters the cache, so later requests see only B."""
    warm = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)  # both prompts cached under A
    assert [o["output_ids"] for o in warm] != reference_ids(tiny_qwen3_v2)
    results = []
    t, ids = _slow_request(engine, results, tokens=300)
    assert engine.pause_generation("in_place").success
    assert engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2").success
    assert engine.continue_generation().success
    assert greedy_ids(engine) == reference_ids(tiny_qwen3_v2)
    t.join()
    assert engine.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"] == hf_greedy(tiny_qwen3_v2, ids, GREEDY["max_new_tokens"])[0]


def test_a_frozen_request_aborted_after_an_update_reports_its_tokens_version(engine, tiny_qwen3_v2):
    results = []
    t, _ = _slow_request(engine, results, tokens=400)
    assert engine.pause_generation("in_place").success
    assert engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2").success
    assert engine.abort_request(abort_all=True).success
    t.join()
    meta = results[0]["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and results[0]["output_ids"]
    assert meta["weight_version"] == "default" and "weight_versions" not in meta  # every token came from the old weights
    assert engine.continue_generation().success


def test_memory_moves_after_a_pause_while_requests_queue(engine):
    """AReaL offloads right after its pause while rollouts keep arriving: requests queued in the pause hold no
    pages, so release goes ahead and they run after resume and continue; left queued past a continue while
    memory stays released, they get the refusal a new request gets."""
    expected = greedy_ids(engine)[0]
    assert engine.pause_generation("abort").success
    results = []
    t = threading.Thread(target=lambda: results.append(engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)))
    t.start()
    while engine.get_load().num_waiting == 0:
        time.sleep(0.002)
    out = engine.release_memory_occupation(["weights", "kv_cache"])
    assert out.success, out.message
    assert engine.resume_memory_occupation(["weights", "kv_cache"]).success
    assert engine.continue_generation().success
    t.join(30)
    assert results[0]["output_ids"] == expected

    assert engine.pause_generation("abort").success
    errors = []
    t = threading.Thread(target=lambda: _generate_or_error(engine, errors))
    t.start()
    while engine.get_load().num_waiting == 0:
        time.sleep(0.002)
    assert engine.release_memory_occupation(["kv_cache"]).success
    assert engine.continue_generation().success
    t.join(30)
    assert not t.is_alive() and "memory is released" in errors[0]
    assert engine.resume_memory_occupation(["kv_cache"]).success
    assert greedy_ids(engine)[0] == expected


def _generate_or_error(engine, errors: list) -> None:
    try:
        engine.generate(input_ids=PROMPTS[0], sampling_params=GREEDY)
    except HotswapError as exc:
        errors.append(str(exc))


def test_a_tied_lm_head_beside_its_embedding_is_skipped_in_any_order(tiny_llama, tmp_path):
    """A tied model's state holding lm_head.weight with other values than the embedding: SGLang's load_weights skips
    lm_head when tied, so the embedding serves. The first given used to win: lm_head from disk (files sorted by name),
    the embedding from a trainer's list."""
    tensors = checkpoint_tensors(tiny_llama)
    embed = tensors["model.embed_tokens.weight"]
    other = torch.randn_like(embed)
    folder = tmp_path / "both"
    shutil.copytree(tiny_llama, folder)
    for f in folder.glob("*.safetensors"):
        f.unlink()
    save_file({**tensors, "lm_head.weight": other}, str(folder / "model.safetensors"))
    with make_engine(tiny_llama) as eng:
        assert eng.update_weights_from_disk(str(folder)).success
        torch.testing.assert_close(torch.tensor(eng.get_weights_by_name("lm_head.weight", truncate_size=4)), embed[:4], rtol=0, atol=0)
        for order in ([("lm_head.weight", other), ("model.embed_tokens.weight", embed)],
                      [("model.embed_tokens.weight", embed), ("lm_head.weight", other)]):
            assert eng.update_weights_from_tensor(order).success
            torch.testing.assert_close(torch.tensor(eng.get_weights_by_name("model.embed_tokens.weight", truncate_size=4)), embed[:4],
                                       rtol=0, atol=0)
        assert eng.update_weights_from_tensor([("lm_head.weight", other)]).success  # alone, it still loads (into the embedding)
        torch.testing.assert_close(torch.tensor(eng.get_weights_by_name("model.embed_tokens.weight", truncate_size=4)), other[:4],
                                   rtol=0, atol=0)
