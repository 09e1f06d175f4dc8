"""An update of several calls is one update. A trainer pushing N buckets brackets them with
begin_weight_update / end_weight_update; a fault in any bucket, a trainer that dies, or a refused call
leaves the engine exactly as before the session, and no request ever sees a mixture of weights."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from hf_reference import UPDATE_GREEDY as GREEDY
from hf_reference import prompt_ids, reference_ids
from trainer_support import TrainerProcess, bucket_bytes_for, checkpoint_tensors, faulted, serve_engine_http

from hotswap import Engine
from hotswap.trainer import free_port, iter_buckets, iter_named_tensors, state_dict_manifest

PROMPTS = [prompt_ids(1, 9), prompt_ids(2, 21), prompt_ids(3, 5)]


def outputs(engine) -> list[tuple[list[int], list]]:
    """Greedy tokens and their log-probabilities, compared bit for bit: one prompt at a time on a flushed
    prefix cache, so every run takes the same path through the model (batch composition and cached
    prefixes change the rounding)."""
    out = []
    for ids in PROMPTS:
        assert engine.flush_cache().success
        o = engine.generate(input_ids=ids, sampling_params=GREEDY, return_logprob=True)
        out.append((o["output_ids"], o["meta_info"]["output_token_logprobs"]))
    return out


def make_engine(path, **kw) -> Engine:
    return Engine(str(path), device="cpu", page_size=4, **kw)


def serve(engine):
    url, server = serve_engine_http(engine)
    return url, server


def spec(base_url, checkpoint, pushes, **kw) -> dict:
    return {"base_url": base_url, "checkpoint": str(checkpoint), "master_port": free_port(), "group_name": kw.pop("group_name", "sg"),
            "buckets": 3, "pushes": pushes, **kw}


def state(engine):
    return engine.check_weights("checksum").digest, outputs(engine), engine.weight_version


# ---- a fault in the third bucket rolls back the first two ---------------------------------------------


@pytest.mark.parametrize("fault", ["shape", "nan"])
def test_fault_in_third_bucket_restores_everything(tiny_qwen3, tiny_qwen3_v2, fault):
    with make_engine(tiny_qwen3, check_weights_finite=True) as engine:
        url, server = serve(engine)
        before = state(engine)
        trainer = TrainerProcess(spec(url, tiny_qwen3_v2, [{"version": "bad", "fault": (2, fault)}]))
        trainer.expect("connected")
        assert trainer.expect("bucket") == 0 and trainer.expect("bucket") == 1  # two buckets landed first
        failed = trainer.expect("push_failed")
        assert trainer.expect("closed") == [True] and trainer.join() == 0
        assert ("shape mismatch" if fault == "shape" else "NaN or Inf") in failed["reason"]
        assert failed["rolled_back"] and not failed["group_broken"]
        assert state(engine) == before  # checksums, tokens and log-probabilities, bit for bit; version unchanged
        server.shutdown()
        assert engine.check_invariants().success


def test_fault_in_third_bucket_in_process(tiny_qwen3, tiny_qwen3_v2):
    """The same with update_weights_from_tensor calls, no trainer process: the session machinery alone."""
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    size = bucket_bytes_for(v2, 3)
    with make_engine(tiny_qwen3, check_weights_finite=True) as engine:
        before = state(engine)
        for kind in ("shape", "nan"):
            buckets = list(iter_buckets(iter_named_tensors(faulted(v2, size, 2, kind)), size))
            assert engine.begin_weight_update().success
            assert engine.update_weights_from_tensor(buckets[0]).success
            assert engine.update_weights_from_tensor(buckets[1]).success
            bad = engine.update_weights_from_tensor(buckets[2])
            assert not bad.success and "session" in bad.message
            end = engine.end_weight_update(weight_version="never")
            assert not end.success and end.rolled_back
            assert state(engine) == before


# ---- generation running through a slow session sees old or new weights, never a mixture ---------------


def test_concurrent_generation_sees_old_or_new_weights(tiny_qwen3, tiny_qwen3_v2):
    old, new = reference_ids(tiny_qwen3, PROMPTS), reference_ids(tiny_qwen3_v2, PROMPTS)
    assert all(a != b for a, b in zip(old, new))
    with make_engine(tiny_qwen3) as engine:
        url, server = serve(engine)
        finished, stop = [], threading.Event()

        def client(i: int) -> None:
            while not stop.is_set():
                out = engine.generate(input_ids=PROMPTS[i], sampling_params=GREEDY)
                finished.append((i, out["output_ids"], out["meta_info"]))

        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(PROMPTS))]
        for t in threads:
            t.start()
        while len(finished) < 6:
            time.sleep(0.01)
        trainer = TrainerProcess(spec(url, tiny_qwen3_v2, [{"version": "v2", "sleep_after_bucket": 0.3}]))
        pushed = trainer.expect("pushed")
        n_at_commit = len(finished)
        while len(finished) < n_at_commit + 6:
            time.sleep(0.01)
        stop.set()
        for t in threads:
            t.join(30)
        assert trainer.expect("closed") == [True] and trainer.join() == 0
        server.shutdown()
    assert pushed["buckets"] == 3 and pushed["elapsed_s"] >= 0.9
    seen = set()
    for i, ids, meta in finished:
        version = meta["weight_version"]
        assert "weight_versions" not in meta  # every token of a request came from one version
        assert ids == (old[i] if version == "default" else new[i]), (i, version)
        assert version in ("default", "v2")
        seen.add(version)
    assert seen == {"default", "v2"}


# ---- a trainer killed mid-session ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["between_calls", "mid_broadcast"])
def test_killed_trainer_rolls_back_and_a_new_trainer_can_update(tiny_qwen3, tiny_qwen3_v2, how):
    old = reference_ids(tiny_qwen3, PROMPTS)
    timeout = 3.0
    with make_engine(tiny_qwen3, weight_session_timeout_s=timeout) as engine:
        url, server = serve(engine)
        before = engine.check_weights("checksum").digest
        trainer = TrainerProcess(spec(url, tiny_qwen3_v2, [{"version": "v2", "stop_after_bucket": 0,
                                                            "hang_in_bucket": how == "mid_broadcast"}], group_name="doomed"))
        trainer.expect("stopped")
        stopped_at = time.monotonic()
        assert engine.get_load().paused  # the session holds generation
        done = []
        waiter = threading.Thread(target=lambda: done.append((outputs(engine), time.monotonic())))
        waiter.start()
        trainer.kill()
        waiter.join(30)
        (outs, served_at), = done
        # rolled back within the session timeout (plus the scheduler's 0.5 s tick), serving on the old weights
        assert served_at - stopped_at < timeout + 1.5
        assert [ids for ids, _ in outs] == old
        assert engine.check_weights("checksum").digest == before and engine.weight_version == "default"
        # the dead group goes away cleanly, whatever state it was left in
        destroyed = engine.destroy_weights_update_group("doomed")
        assert destroyed.success, destroyed.message
        if how == "mid_broadcast":
            assert "broken" in destroyed.message
        # a new trainer, on a new port with a new group name, updates
        trainer2 = TrainerProcess(spec(url, tiny_qwen3_v2, [{"version": "v2"}], group_name="fresh"))
        manifest = trainer2.expect("connected")["manifest"]
        assert trainer2.expect("pushed")["version"] == "v2"
        assert trainer2.expect("closed") == [True] and trainer2.join() == 0
        assert engine.check_weights("checksum", expected=manifest).success
        assert [ids for ids, _ in outputs(engine)] == reference_ids(tiny_qwen3_v2, PROMPTS)
        server.shutdown()
        assert engine.check_invariants().success


def test_hung_trainer_times_out_mid_broadcast(tiny_qwen3, tiny_qwen3_v2):
    """A trainer alive but silent inside a broadcast: the engine's receive gives up at the session timeout."""
    old = reference_ids(tiny_qwen3, PROMPTS)
    with make_engine(tiny_qwen3, weight_session_timeout_s=2.0) as engine:
        url, server = serve(engine)
        before = engine.check_weights("checksum").digest
        trainer = TrainerProcess(spec(url, tiny_qwen3_v2, [{"version": "v2", "stop_after_bucket": 0, "hang_in_bucket": True}],
                                      group_name="hung"))
        trainer.expect("stopped")
        start = time.monotonic()
        outs = outputs(engine)  # waits for the rollback
        assert time.monotonic() - start < 2.0 + 1.5
        assert [ids for ids, _ in outs] == old and engine.check_weights("checksum").digest == before
        refused = engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], group_name="hung")
        assert not refused.success and "broken" in refused.message and refused.extra.received is False
        trainer.kill()
        assert engine.destroy_weights_update_group("hung").success
        server.shutdown()


# ---- refusals: each a reply with a message, the engine unharmed ---------------------------------------


def test_session_refusals_leave_the_engine_unharmed(tiny_qwen3, tiny_qwen3_v2):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    size = bucket_bytes_for(v2, 3)
    buckets = list(iter_buckets(iter_named_tensors(v2), size))
    nan_bucket = [(n, torch.full_like(t, float("nan"))) for n, t in buckets[1]]
    with make_engine(tiny_qwen3, check_weights_finite=True) as engine:
        before = state(engine)

        def unharmed():
            assert state(engine) == before

        # double begin
        assert engine.begin_weight_update().success
        res = engine.begin_weight_update()
        assert not res.success and "already open" in res.message
        # release_memory_occupation during a session
        res = engine.release_memory_occupation()
        assert not res.success and "session" in res.message
        end = engine.end_weight_update()
        assert end.success and "nothing to commit" in end.message
        unharmed()
        # end without begin
        res = engine.end_weight_update()
        assert not res.success and "no weight-update session" in res.message
        unharmed()
        # update into a failed session
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(buckets[0]).success
        failed = engine.update_weights_from_tensor(nan_bucket)
        assert not failed.success and "NaN" in failed.message and failed.rolled_back
        res = engine.update_weights_from_tensor(buckets[2])
        assert not res.success and "already failed" in res.message
        res = engine.end_weight_update(weight_version="v2")
        assert not res.success and res.rolled_back and "NaN" in res.message
        unharmed()
        # a bucket refused at validation fails the session too: ending it cannot commit the others alone
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(buckets[0]).success
        res = engine.update_weights_from_tensor([("model.nope.weight", torch.zeros(2))])
        assert not res.success and "unknown parameter" in res.message and "marked failed" in res.message
        assert not engine.end_weight_update().success
        unharmed()
        # distributed metadata refused up front inside a session: same
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(buckets[0]).success
        res = engine.update_weights_from_distributed(["model.norm.weight"], ["float32"], [[64]], group_name="none")
        assert not res.success and "marked failed" in res.message
        assert not engine.end_weight_update().success
        unharmed()
        # abort: the trainer's own failure ends the session without committing
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(buckets[0]).success
        res = engine.end_weight_update(abort=True)
        assert res.success and res.rolled_back and "aborted" in res.message
        unharmed()
        # and a whole session commits once, at the end
        assert engine.begin_weight_update().success
        for b in buckets:
            assert engine.update_weights_from_tensor(b).success
            assert engine.weight_version == "default"
        res = engine.end_weight_update(weight_version="v2")
        assert res.success and res.weight_version == "v2" and res.num_tensors == len(v2)
        assert engine.check_weights("checksum", expected=state_dict_manifest(v2)).success
        assert [ids for ids, _ in outputs(engine)] == reference_ids(tiny_qwen3_v2, PROMPTS)
        assert engine.check_invariants().success


def test_a_pause_without_updates_does_not_expire(tiny_qwen3):
    with make_engine(tiny_qwen3, weight_session_timeout_s=0.5) as engine:
        assert engine.pause_generation("in_place").success
        time.sleep(1.2)
        assert engine.get_load().paused
        assert engine.continue_generation().success
        assert not engine.get_load().paused
        assert [ids for ids, _ in outputs(engine)] == reference_ids(tiny_qwen3, PROMPTS)


def test_a_pause_holding_updates_does_not_expire(tiny_qwen3, tiny_qwen3_v2):
    """vLLM's and SGLang's pause lasts until resume, and prime-rl resumes only when its slowest server has loaded
    (up to 720 s a try): an update made during a pause stays however long the resume takes. It used to be rolled
    back after weight_session_timeout_s of quiet, serving the old policy without a word (a black-box sweep)."""
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    with make_engine(tiny_qwen3, weight_session_timeout_s=0.5) as engine:
        assert engine.pause_generation("in_place").success
        assert engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2").success
        time.sleep(1.2)
        assert engine.get_load().paused and engine.weight_version == "v2"
        assert engine.continue_generation().success
        assert engine.check_weights("checksum", expected=state_dict_manifest(v2)).success
        assert [ids for ids, _ in outputs(engine)] == reference_ids(tiny_qwen3_v2, PROMPTS)


def test_an_abandoned_session_expires(tiny_qwen3, tiny_qwen3_v2):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    with make_engine(tiny_qwen3, weight_session_timeout_s=0.5) as engine:
        before = state(engine)
        assert engine.begin_weight_update().success
        assert engine.update_weights_from_tensor(list(v2.items())[:5]).success
        time.sleep(1.2)
        assert not engine.get_load().paused
        assert state(engine) == before
        res = engine.end_weight_update()
        assert not res.success and "expired" in res.message


def test_a_pause_made_while_a_session_is_open_still_holds_its_updates_together(tiny_qwen3, tiny_qwen3_v2):
    """begin_weight_update, then pause_generation (another caller's), then end_weight_update: generation stays paused,
    and the updates made in the rest of the pause form one session, as in any pause, committed or rolled back together
    at continue_generation. The pause had no session of its own after the end: each later update committed at once, and
    a refused one left the earlier ones served under their version."""
    with make_engine(tiny_qwen3) as engine:
        before = state(engine)
        assert engine.begin_weight_update().success
        assert engine.pause_generation("abort").success
        assert engine.end_weight_update().success
        assert engine.get_load().paused
        assert engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="v2").success
        assert not engine.update_weights_from_tensor([("model.norm.weight", torch.zeros(3))]).success
        assert engine.continue_generation().success
        assert state(engine) == before and engine.weight_version == "default"
