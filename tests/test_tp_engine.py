"""A tensor-parallel Engine (TP=2 over gloo: this process is rank 0 and schedules, one spawned
worker is rank 1) generates what TP=1 and transformers generate, and takes every weight update atomically
across its ranks; reads and checksums see whole HF tensors, as at TP=1."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import assert_greedy_matches_hf, greedy_ids, hf_greedy, hf_model, prompt_ids
from hf_reference import reference_ids as reference
from safetensors.torch import save_file
from serve_support import serve_env, wait_healthy
from test_sglang_payloads import file_system_sharing, flattened_bucket, serialize, sglang_names  # noqa: F401
from trainer_support import TrainerProcess, checkpoint_tensors, serve_engine_http

from hotswap import Engine, HotswapError
from hotswap.config import EngineConfig, engine_args_from_sglang
from hotswap.runner import tp_protocol
from hotswap.runner.tp_protocol import Op
from hotswap.runner.tp_step_codec import StepMode
from hotswap.testing.tiny_models import build_tiny_checkpoint, perturb_checkpoint
from hotswap.trainer import free_port, state_dict_manifest

# chunked_prefill_size 8: the longer prompts below are prefilled in chunks
ARGS = dict(device="cpu", page_size=4, chunked_prefill_size=8, check_weights_finite=True)
# rank 1 holds rows 64..127 of gate_proj (intermediate 128): a NaN there is invisible to rank 0
RANK1_ONLY = ("model.layers.1.mlp.gate_proj.weight", (127, 3))


@pytest.fixture(scope="module")
def tp2(tiny_qwen3):
    with Engine(str(tiny_qwen3), tensor_parallel_size=2, **ARGS) as eng:
        yield eng


@pytest.fixture
def engine(tp2, tiny_qwen3):
    """The shared TP=2 engine, holding tiny_qwen3's weights again after each test."""
    yield tp2
    assert tp2.check_invariants().success
    if tp2.check_weights("checksum").checksums != state_dict_manifest(checkpoint_tensors(tiny_qwen3)):
        assert tp2.update_weights_from_disk(str(tiny_qwen3)).success


def manifest_of(path) -> dict[str, str]:
    return state_dict_manifest(checkpoint_tensors(path))


def test_greedy_matches_tp1_and_transformers(engine, tiny_qwen3):
    prompts = [prompt_ids(1, 9), prompt_ids(2, 21), prompt_ids(3, 30)]  # ragged; 21 and 30 tokens prefill in chunks of 8
    again = prompts[2][:24] + prompt_ids(4, 5)  # shares 24 tokens (6 pages) with the last prompt: a prefix-cache hit
    # 120 prompts at once: a step's metadata outgrows one control message and travels in two broadcasts
    many = [prompt_ids(100 + i, 7 + i % 6) for i in range(120)]
    short = dict(GREEDY, max_new_tokens=3)
    with Engine(str(tiny_qwen3), **ARGS) as tp1:
        expected = greedy_ids(tp1, prompts)
        expected_again = tp1.generate(input_ids=again, sampling_params=GREEDY)["output_ids"]
        expected_many = [o["output_ids"] for o in tp1.generate(input_ids=many, sampling_params=short)]
        tp1.flush_cache()
    assert expected == [hf_greedy(tiny_qwen3, ids, GREEDY["max_new_tokens"])[0] for ids in prompts]
    assert expected_again == hf_greedy(tiny_qwen3, again, GREEDY["max_new_tokens"])[0]
    assert greedy_ids(engine, prompts) == expected
    out = engine.generate(input_ids=again, sampling_params=GREEDY)
    assert out["output_ids"] == expected_again
    assert out["meta_info"]["cached_tokens"] >= 24
    assert [o["output_ids"] for o in engine.generate(input_ids=many, sampling_params=short)] == expected_many
    engine.flush_cache()
    # sampled (not greedy) requests: rank 0 samples, the worker follows through the broadcast ids
    sp = {"max_new_tokens": 6, "temperature": 0.8, "seed": 7, "ignore_eos": True}
    with Engine(str(tiny_qwen3), **ARGS) as tp1:
        assert [o["output_ids"] for o in engine.generate(input_ids=prompts, sampling_params=sp)] == [
            o["output_ids"] for o in tp1.generate(input_ids=prompts, sampling_params=sp)]


def test_prompt_logprobs_and_penalties_match_tp1(engine, tiny_qwen3):
    """Scored prompt rows travel to the worker with the step (the LM head is split by vocabulary), chunk by
    chunk; a chunk that scores rows but samples nothing sends no sampled ids."""
    prompts = [prompt_ids(5, 21), prompt_ids(6, 6)]
    sp = dict(GREEDY, repetition_penalty=1.5, frequency_penalty=0.4)
    kw = dict(input_ids=prompts, sampling_params=sp, return_logprob=True, logprob_start_len=1, top_logprobs_num=2)
    with Engine(str(tiny_qwen3), **ARGS) as tp1:
        ref = tp1.generate(**kw)
    got = engine.generate(**kw)
    for g, r in zip(got, ref):
        assert g["output_ids"] == r["output_ids"]
        torch.testing.assert_close(torch.tensor([x[0] for x in g["meta_info"]["input_token_logprobs"][1:]]),
                                   torch.tensor([x[0] for x in r["meta_info"]["input_token_logprobs"][1:]]), atol=1e-5, rtol=1e-5)


def test_decode_steps_reach_the_worker_as_small_deltas(engine, tiny_qwen3, monkeypatch):
    """Rank 0 sends a decode step as an ADVANCE against the batch the worker already holds (whole steps
    only for prefill); the worker's rebuilt batches still give TP=1's tokens."""
    sent: list[tuple[Op, int]] = []
    encode = tp_protocol.encode_step

    def counting(*args):
        op, header, payload = encode(*args)
        sent.append((op, len(payload)))
        return op, header, payload

    monkeypatch.setattr(tp_protocol, "encode_step", counting)
    assert greedy_ids(engine) == reference(tiny_qwen3)
    advances = [words for op, words in sent if op is Op.ADVANCE]
    assert len(advances) >= GREEDY["max_new_tokens"] - 2
    assert max(advances) < min(words for op, words in sent if op is Op.STEP)


def test_preemption_and_joins_under_kv_pressure_match_tp1(tiny_qwen3):
    """48 pages of 4 tokens for 8 requests that need 9-14 pages each: sequences are preempted, rejoin and
    finish while others decode, so the worker's replica follows rows leaving, joining and moving."""
    prompts = [prompt_ids(300 + i, 10 + 3 * i) for i in range(8)]
    sp = dict(GREEDY, max_new_tokens=24)
    args = dict(ARGS, num_pages=48)
    with Engine(str(tiny_qwen3), **args) as tp1:
        expected = [o["output_ids"] for o in tp1.generate(input_ids=prompts, sampling_params=sp)]
    with Engine(str(tiny_qwen3), tensor_parallel_size=2, **args) as eng:
        assert [o["output_ids"] for o in eng.generate(input_ids=prompts, sampling_params=sp)] == expected
        assert eng.scheduler.batcher.num_preemptions > 0


def test_checksums_and_reads_see_whole_tensors(engine, tiny_qwen3, tmp_path):
    ckpt = checkpoint_tensors(tiny_qwen3)
    check = engine.check_weights("checksum", expected=state_dict_manifest(ckpt))
    assert check.success, check.message
    # column-, row- and vocab-parallel, and replicated tensors come back whole, as TP=1 returns them
    for name in ["model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight", "model.embed_tokens.weight",
                 "lm_head.weight", "model.layers.0.self_attn.q_norm.weight"]:
        out = torch.tensor(engine.get_weights_by_name(name, truncate_size=10_000))
        assert out.shape == ckpt[name].shape and torch.equal(out, ckpt[name]), name
    assert engine.save_sharded_model(str(tmp_path / "saved"), max_size=40_000).success
    saved = checkpoint_tensors(tmp_path / "saved")
    assert saved.keys() == ckpt.keys() and all(torch.equal(saved[n], ckpt[n]) for n in ckpt)
    assert engine.check_weights("snapshot").success
    assert engine.check_weights("compare").success


def test_disk_and_tensor_updates(engine, tiny_qwen3, tiny_qwen3_v2):
    res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2")
    assert res.success, res.message
    assert engine.check_weights("checksum", expected=manifest_of(tiny_qwen3_v2)).success
    assert greedy_ids(engine) == reference(tiny_qwen3_v2)
    res = engine.update_weights_from_tensor(checkpoint_tensors(tiny_qwen3), weight_version="v1")
    assert res.success, res.message
    assert engine.check_weights("checksum", expected=manifest_of(tiny_qwen3)).success
    assert greedy_ids(engine) == reference(tiny_qwen3)
    assert engine.weight_version == "v1"


def test_a_fault_on_rank1_only_rolls_every_rank_back(engine, tiny_qwen3, tiny_qwen3_v2, tmp_path):
    before, version = engine.check_weights("checksum").digest, engine.weight_version
    bad = checkpoint_tensors(tiny_qwen3_v2)
    name, where = RANK1_ONLY
    bad[name][where] = float("nan")
    res = engine.update_weights_from_tensor(bad)
    assert not res.success and res.rolled_back
    assert "tensor-parallel rank 1" in res.message and "NaN" in res.message and name in res.message
    # the same checkpoint on disk: rank 1 finds the NaN in the slice it read
    folder = tmp_path / "bad"
    shutil.copytree(tiny_qwen3_v2, folder)
    save_file(bad, str(folder / "model.safetensors"), metadata={"format": "pt"})
    res = engine.update_weights_from_disk(str(folder))
    assert not res.success and "tensor-parallel rank 1" in res.message, res.message
    # inside a session: a good bucket, then the bad one; ending the session rolls both back on both ranks
    names = sorted(bad)
    good = {n: t for n, t in checkpoint_tensors(tiny_qwen3_v2).items() if n != name}
    assert engine.begin_weight_update().success
    assert engine.update_weights_from_tensor({n: good[n] for n in names[:10] if n in good}).success
    assert not engine.update_weights_from_tensor({name: bad[name]}).success
    assert not engine.end_weight_update().success
    assert engine.check_weights("checksum").digest == before
    assert greedy_ids(engine) == reference(tiny_qwen3)
    assert engine.weight_version == version


def test_a_late_bucket_of_an_aborted_session_reaches_no_rank(engine, tiny_qwen3, tiny_qwen3_v2):
    """Rank 0 keeps the sessions: a late bucket of an aborted session is refused before any rank copies a
    byte, and the session open on every rank commits only its own bucket."""
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    name, other = RANK1_ONLY[0], "model.layers.0.self_attn.q_proj.weight"  # rank 1 holds half of each
    s1 = engine.begin_weight_update().session_id
    assert engine.update_weights_from_tensor({name: v2[name]}, session_id=s1).success
    assert engine.end_weight_update(abort=True, session_id=s1).success
    s2 = engine.begin_weight_update().session_id
    assert engine.update_weights_from_tensor({other: v2[other]}, session_id=s2).success
    for late in (engine.update_weights_from_tensor({name: v2[name]}, session_id=s1),
                 engine.update_weights_from_disk(str(tiny_qwen3_v2), session_id=s1)):
        assert not late.success and f"session '{s1}' is not open: it was aborted" in late.message, late.message
    assert engine.end_weight_update(weight_version="s2", session_id=s2).success
    check = engine.check_weights("checksum", expected=state_dict_manifest({**v1, other: v2[other]}))
    assert check.success, check.message


def test_trainer_pushes_to_both_ranks_over_a_group(engine, tiny_qwen3, tiny_qwen3_v2):
    """Each engine rank joins the trainer's group (ranks 1 and 2 of 3) and takes its slice of every bucket."""
    url, server = serve_engine_http(engine)
    try:
        trainer = TrainerProcess({"base_url": url, "checkpoint": str(tiny_qwen3_v2), "master_port": free_port(), "group_name": "tp-push",
                                  "buckets": 3, "ranks_per_engine": 2, "pushes": [{"version": "v2"}, {"version": "bad", "fault": (1, "nan")}]})
        manifest = trainer.expect("connected", timeout=60)["manifest"]
        pushed = trainer.expect("pushed")
        failed = trainer.expect("push_failed")
        assert trainer.expect("closed") == [True] and trainer.join() == 0
    finally:
        server.shutdown()
    assert pushed["buckets"] == 3 and pushed["version"] == "v2"
    assert "NaN" in failed["reason"] and failed["received"] == [True] and failed["rolled_back"] and not failed["group_broken"]
    assert manifest == manifest_of(tiny_qwen3_v2)
    check = engine.check_weights("checksum", expected=manifest)
    assert check.success, check.message
    assert greedy_ids(engine) == reference(tiny_qwen3_v2)
    assert engine.weight_version == "v2"


def test_a_checkpoint_engine_push_is_refused_cleanly(engine, tiny_qwen3_v2):
    """Not built for TP yet (each rank would take its own device's socket): refused, and the server told."""
    from test_checkpoint_engine_ipc import CPU_SOURCE, FakeParameterServer, push, split

    engine.scheduler.weight_updater.ipc_source = CPU_SOURCE
    before = engine.check_weights("checksum").digest
    server = FakeParameterServer(split(checkpoint_tensors(tiny_qwen3_v2), 2))
    res = push(engine, server)
    assert not res.success and "not supported with tensor_parallel_size > 1" in res.message
    assert server.outcome == "aborted" and "tensor_parallel_size" in server.answers[0].decode()
    assert engine.check_weights("checksum").digest == before


def test_release_and_resume_on_every_rank(engine, tiny_qwen3):
    expected = reference(tiny_qwen3)
    assert engine.release_memory_occupation().success
    assert engine.resume_memory_occupation().success
    assert greedy_ids(engine) == expected
    assert engine.check_weights("checksum", expected=manifest_of(tiny_qwen3)).success


def test_tied_embeddings_split_by_vocab(tiny_llama):
    with Engine(str(tiny_llama), tensor_parallel_size=2, **ARGS) as eng:
        assert greedy_ids(eng) == reference(tiny_llama)
        assert eng.check_weights("checksum", expected=manifest_of(tiny_llama)).success
        head = eng.get_weights_by_name("lm_head.weight", truncate_size=10_000)
        assert torch.equal(torch.tensor(head), checkpoint_tensors(tiny_llama)["model.embed_tokens.weight"])


def few_kv_heads(folder: Path, kv_heads: int) -> tuple[Path, Path]:
    """Qwen2 (k/v biases) with `kv_heads` KV heads, and a perturbed copy."""
    path = build_tiny_checkpoint(folder / "v1", "qwen2", num_key_value_heads=kv_heads)
    return path, perturb_checkpoint(path, folder / "v2", seed=1)


@pytest.mark.parametrize(("tp", "kv_heads"), [(2, 1), (4, 2)])
def test_fewer_kv_heads_than_ranks_are_replicated(tp, kv_heads, tmp_path, sglang_names, file_system_sharing):  # noqa: F811
    """SGLang's QKVParallelLinear replicates KV heads fewer than the ranks: each rank's k/v rows, bias and KV cache
    hold one head (at TP=4 with 2 heads, ranks 0-1 head 0 and ranks 2-3 head 1). Generation equals TP=1 and
    transformers; every update lands on every copy, and reads, checksums and saves take each head once."""
    v1, v2 = few_kv_heads(tmp_path, kv_heads)
    prompts = [prompt_ids(1, 9), prompt_ids(2, 21)]
    kw = dict(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
    with Engine(str(v1), **ARGS) as tp1:
        ref = tp1.generate(**kw)
    ckpt, k, bias = checkpoint_tensors(v1), "model.layers.1.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.bias"
    with Engine(str(v1), tensor_parallel_size=tp, **ARGS) as eng:
        assert eng.scheduler.model_runner.kv_cache.num_kv_heads == 1
        got = eng.generate(**kw)
        assert_greedy_matches_hf(v1, prompts, got, GREEDY["max_new_tokens"])
        lps = [[torch.tensor([x[0] for x in o["meta_info"]["output_token_logprobs"]]) for o in outs] for outs in (got, ref)]
        for g, r, o, e in zip(*lps, got, ref):
            assert o["output_ids"] == e["output_ids"]
            torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
        for name in (k, bias):
            assert torch.equal(torch.tensor(eng.get_weights_by_name(name)), ckpt[name]), name
        assert eng.check_weights("checksum", expected=manifest_of(v1)).success
        assert eng.update_weights_from_tensor(checkpoint_tensors(v2)).success
        assert eng.check_weights("checksum", expected=manifest_of(v2)).success
        assert greedy_ids(eng) == reference(v2)
        assert eng.update_weights_from_disk(str(v1)).success
        assert eng.check_weights("checksum", expected=manifest_of(v1)).success
        payload = serialize(flattened_bucket(list(checkpoint_tensors(v2).items())), output_str=True)  # slime's, one per rank
        res = eng.update_weights_from_tensor([payload] * tp, load_format="flattened_bucket")
        assert res.success, res.message
        assert eng.check_weights("checksum", expected=manifest_of(v2)).success
        _trainer_push(eng, v1, tp)
        assert eng.check_weights("checksum", expected=manifest_of(v1)).success
        bad = checkpoint_tensors(v2)
        bad[k][0, 0] = float("nan")
        res = eng.update_weights_from_tensor(bad)
        assert not res.success and k in res.message
        assert eng.check_weights("checksum", expected=manifest_of(v1)).success
        assert eng.begin_weight_update().success  # a session: a good bucket then the bad one, both rolled back
        assert eng.update_weights_from_tensor({bias: bad[bias]}).success
        assert not eng.update_weights_from_tensor({k: bad[k]}).success
        assert not eng.end_weight_update().success
        assert eng.check_weights("checksum", expected=manifest_of(v1)).success
        assert eng.check_weights("snapshot").success
        assert eng.release_memory_occupation().success and eng.resume_memory_occupation().success
        assert eng.check_weights("compare").success
        assert greedy_ids(eng) == reference(v1)
        assert eng.save_sharded_model(str(tmp_path / "saved"), max_size=40_000).success
    saved = hf_model(str(tmp_path / "saved")).state_dict()
    assert all(torch.equal(saved[n], t) for n, t in ckpt.items())


def _trainer_push(engine, checkpoint: Path, tp: int) -> None:
    """`checkpoint` pushed by a trainer over a weights update group every engine rank joins."""
    url, server = serve_engine_http(engine)
    try:
        trainer = TrainerProcess({"base_url": url, "checkpoint": str(checkpoint), "master_port": free_port(), "group_name": "kv-push",
                                  "buckets": 2, "ranks_per_engine": tp, "pushes": [{"version": "pushed"}]})
        assert trainer.expect("pushed", timeout=60)["version"] == "pushed"
        assert trainer.expect("closed") == [True] and trainer.join() == 0
    finally:
        server.shutdown()


def test_a_dead_worker_fails_requests_instead_of_hanging(tiny_qwen3):
    with Engine(str(tiny_qwen3), tensor_parallel_size=2, **ARGS) as eng:
        assert greedy_ids(eng) == reference(tiny_qwen3)
        worker = eng.tp_peers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        out = eng.generate(input_ids=prompt_ids(5, 7), sampling_params=GREEDY)
        reason = out["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "tensor-parallel engine broken" in reason["message"]
        assert "worker rank 1" in reason["message"] and "exited with code -9" in reason["message"]
        again = eng.generate(input_ids=prompt_ids(6, 7), sampling_params=GREEDY)["meta_info"]["finish_reason"]
        assert "tensor-parallel engine broken" in again["message"]
        res = eng.update_weights_from_disk(str(tiny_qwen3))
        assert not res.success and "tensor-parallel engine broken" in res.message


def test_a_hung_worker_fails_a_step_within_the_watchdog_timeout(tiny_qwen3):
    """A worker that hangs (stopped, not dead) fails the next step after SGLang's `watchdog_timeout` (our step bound),
    not after `tp_timeout_s` (the bound of a load), naming the bound and the worker; `failure()` (what `hotswap serve`
    polls, to exit) says so and a weight update is refused with the weights unchanged."""
    with Engine(str(tiny_qwen3), tensor_parallel_size=2, watchdog_timeout=1, tp_timeout_s=60, **ARGS) as eng:
        assert eng.config.step_timeout_s == 1.0 and eng.get_server_info()["watchdog_timeout"] == 1
        assert greedy_ids(eng) == reference(tiny_qwen3)
        worker = eng.tp_peers.procs[0]
        os.kill(worker.pid, signal.SIGSTOP)
        try:
            reason = eng.generate(input_ids=prompt_ids(5, 7), sampling_params=GREEDY)["meta_info"]["finish_reason"]
            assert reason["type"] == "abort" and "a forward step got no answer within 1 s (step_timeout_s, SGLang's watchdog_timeout)" in reason["message"]
            assert f"rank 1 (pid {worker.pid})" in reason["message"] and "a worker is hung" in reason["message"]
            assert eng.failure() == reason["message"].removeprefix("internal error: ")  # the worker named, not only the watchdog's bound
            res = eng.update_weights_from_disk(str(tiny_qwen3))
            assert not res.success and "weights unchanged" in res.message
        finally:
            os.kill(worker.pid, signal.SIGCONT)


def test_the_tp_bounds_are_checked_before_anything_starts(tiny_qwen3):
    for bad in (dict(tp_timeout_s=0), dict(watchdog_timeout=-1), dict(step_timeout_s=float("nan")), dict(tp_timeout_s="60")):
        with pytest.raises(HotswapError, match="_timeout_s must be a positive number of seconds"):
            Engine(str(tiny_qwen3), tensor_parallel_size=2, **bad, **ARGS)
    # a watchdog turned off by a huge value (or inf) waits a week: process-group timeouts must stay finite
    for off in (1e9, float("inf")):
        assert EngineConfig(model_path="m", **engine_args_from_sglang({"watchdog_timeout": off})).step_timeout_s == 7 * 24 * 3600


def test_an_idle_engine_learns_of_a_dead_worker_without_a_request(tiny_qwen3):
    """`failure()` (what `hotswap serve` polls) names a worker killed while nothing ran, before any collective."""
    with Engine(str(tiny_qwen3), tensor_parallel_size=2, **ARGS) as eng:
        assert eng.failure() is None
        worker = eng.tp_peers.procs[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.join(10)
        assert f"worker rank 1 (pid {worker.pid}) exited with code -9" in eng.failure()
        reason = eng.generate(input_ids=prompt_ids(5, 7), sampling_params=GREEDY)["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "worker rank 1" in reason["message"]


def test_serve_exits_when_a_worker_dies(tiny_qwen3):
    """As SGLang's server, which a failed rank takes down (its SIGQUIT to the launcher, or its watchdog's): `hotswap
    serve` stops, exiting non-zero and naming the worker, instead of answering /health 200 and every request with
    an abort for ever. A router, or whatever runs the server, then sees it gone."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "hotswap.cli", "serve", "--model-path", str(tiny_qwen3), "--tp-size", "2", "--device", "cpu",
                             "--port", str(port), "--page-size", "4", "--num-pages", "64", "--no-frontend-process", "--skip-server-warmup"],
                            env=serve_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        wait_healthy(proc, f"http://127.0.0.1:{port}", timeout=60)
        worker = next(int(c) for c in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
                      if "resource_tracker" not in Path(f"/proc/{c}/cmdline").read_text())
        os.kill(worker, signal.SIGKILL)
        assert proc.wait(timeout=30) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert f"worker rank 1 (pid {worker}) exited with code -9" in proc.stderr.read()


def test_cli_and_server_take_the_tp_size():
    from hotswap.cli import build_parser
    from hotswap.server.launch import engine_kwargs_from_args

    args = build_parser().parse_args(["serve", "--model-path", "m", "--tp-size", "2", "--load-format", "dummy"])
    assert engine_kwargs_from_args(args) == {"tensor_parallel_size": 2, "load_format": "dummy"}
    assert build_parser().parse_args(["generate", "--model-path", "m", "--prompt", "p", "--tp-size", "2"]).tensor_parallel_size == 2


def _gpus(n: int) -> None:
    if torch.cuda.device_count() < n:
        pytest.skip(f"needs {n} GPUs")


@pytest.mark.gpu
def test_gpu_tp2_matches_tp1_over_nccl(tiny_qwen3, tiny_qwen3_v2):
    _gpus(2)
    expected = reference(tiny_qwen3)
    with Engine(str(tiny_qwen3), device="cuda:0", dtype="float32") as tp1:
        assert greedy_ids(tp1) == expected
    with Engine(str(tiny_qwen3), device="cuda:0", dtype="float32", tensor_parallel_size=2, check_weights_finite=True) as eng:
        assert greedy_ids(eng) == expected
        assert eng.check_weights("checksum", expected=manifest_of(tiny_qwen3)).success
        v2 = {k: v.to("cuda:0") for k, v in checkpoint_tensors(tiny_qwen3_v2).items()}
        assert eng.update_weights_from_tensor(v2, weight_version="v2").success  # relayed to cuda:1 over NCCL
        assert eng.check_weights("checksum", expected=manifest_of(tiny_qwen3_v2)).success
        assert greedy_ids(eng) == reference(tiny_qwen3_v2)
        name, where = RANK1_ONLY
        v2[name][where] = float("nan")
        res = eng.update_weights_from_tensor(v2)
        assert not res.success and "tensor-parallel rank 1" in res.message
        assert eng.check_weights("checksum", expected=manifest_of(tiny_qwen3_v2)).success


@pytest.mark.gpu
def test_gpu_tp2_decode_replays_cuda_graphs_on_every_rank(tiny_qwen3, tiny_qwen3_v2, monkeypatch):
    """Both ranks capture the decode and extend buckets with the NCCL collectives inside; rank 0 sends each
    decode step as a graph ADVANCE and the worker replays the same bucket from the batch it rebuilt. Greedy in
    float32 equals TP=1 (also graphed) over a ragged batch of 12, after a weight update (the graphs read the
    live parameters) and after a release and resume (which recaptures on both ranks)."""
    _gpus(2)
    prompts = [prompt_ids(200 + i, 5 + 3 * i) for i in range(12)]
    with Engine(str(tiny_qwen3), device="cuda:0", dtype="float32") as tp1:
        expected = greedy_ids(tp1, prompts)
        tp1.update_weights_from_disk(str(tiny_qwen3_v2))
        expected_v2 = greedy_ids(tp1, prompts)
    modes: list[StepMode] = []
    encode = tp_protocol.encode_step

    def counting(replica, hb, fix, mode):
        modes.append(mode)
        return encode(replica, hb, fix, mode)

    monkeypatch.setattr(tp_protocol, "encode_step", counting)
    with Engine(str(tiny_qwen3), device="cuda:0", dtype="float32", tensor_parallel_size=2) as eng:
        assert eng.model_runner.cuda_graphs is not None and eng.model_runner.cuda_graphs.captured
        assert greedy_ids(eng, prompts) == expected
        assert modes.count(StepMode.DECODE_GRAPH) >= GREEDY["max_new_tokens"] - 2
        assert StepMode.EXTEND_GRAPH in modes  # the prefill of the 12 prompts
        v2 = {k: v.to("cuda:0") for k, v in checkpoint_tensors(tiny_qwen3_v2).items()}
        assert eng.update_weights_from_tensor(v2, weight_version="v2").success
        assert greedy_ids(eng, prompts) == expected_v2
        assert eng.release_memory_occupation().success
        assert eng.resume_memory_occupation().success
        assert greedy_ids(eng, prompts) == expected_v2


@pytest.mark.gpu
def test_gpu_engine_on_a_second_gpu(tiny_qwen3, tiny_qwen3_v2):
    """An engine on cuda:1 (a trainer beside it on cuda:0) serves and updates there: its threads launch on
    its own device, and the caller's current device is left alone."""
    _gpus(2)
    torch.cuda.set_device(0)
    with Engine(str(tiny_qwen3), device="cuda:1", dtype="float32") as eng:
        assert torch.cuda.current_device() == 0
        assert greedy_ids(eng) == reference(tiny_qwen3)
        v2 = {k: v.to("cuda:1") for k, v in checkpoint_tensors(tiny_qwen3_v2).items()}
        assert eng.update_weights_from_tensor(v2, weight_version="v2").success
        assert greedy_ids(eng) == reference(tiny_qwen3_v2)
        assert eng.update_weights_from_disk(str(tiny_qwen3)).success
        assert greedy_ids(eng) == reference(tiny_qwen3)


@pytest.mark.gpu
def test_gpu_trainer_pushes_over_nccl_to_tp2(tiny_qwen3, tiny_qwen3_v2):
    """Trainer on cuda:0, engine ranks on cuda:1 and cuda:2: one NCCL group of 3."""
    _gpus(3)
    with Engine(str(tiny_qwen3), device="cuda:1", dtype="float32", tensor_parallel_size=2) as eng:
        url, server = serve_engine_http(eng)
        try:
            trainer = TrainerProcess({"base_url": url, "checkpoint": str(tiny_qwen3_v2), "master_port": free_port(), "group_name": "tp-nccl",
                                      "buckets": 3, "ranks_per_engine": 2, "backend": "nccl", "device": "cuda:0", "timeout_s": 120,
                                      "pushes": [{"version": "v2"}]})
            manifest = trainer.expect("connected", timeout=120)["manifest"]
            assert trainer.expect("pushed", timeout=120)["buckets"] == 3
            assert trainer.expect("closed", timeout=60) == [True] and trainer.join() == 0
        finally:
            server.shutdown()
        assert eng.check_weights("checksum", expected=manifest).success
        assert greedy_ids(eng) == reference(tiny_qwen3_v2)


def test_a_failed_start_names_the_error_and_leaves_no_worker(tiny_qwen3):
    import multiprocessing

    before = set(multiprocessing.active_children())
    with pytest.raises(ValueError, match="unknown load_format 'bogus'"):
        Engine(str(tiny_qwen3), tensor_parallel_size=2, load_format="bogus", **ARGS)
    assert set(multiprocessing.active_children()) <= before
    with pytest.raises(ValueError, match="tensor_parallel_size 3 does not divide the model's num_attention_heads 4"):
        Engine(str(tiny_qwen3), tensor_parallel_size=3, **ARGS)


def test_an_moe_model_is_refused_at_construction_naming_the_limitation(tiny_qwen3_moe):
    """Experts are not sharded across ranks yet: the Engine says so before it spawns any worker."""
    import multiprocessing

    before = set(multiprocessing.active_children())
    with pytest.raises(HotswapError, match=r"mixture-of-experts model.*not sharded across tensor-parallel ranks.*tensor_parallel_size=1"):
        Engine(str(tiny_qwen3_moe), tensor_parallel_size=2, **ARGS)
    assert set(multiprocessing.active_children()) <= before
