"""A trainer pushing into several engines while some of them fail: down, slow, refusing, dying mid-push or
losing a commit's reply. Every wait is bounded, the error names the engine and what failed, and no engine
is left serving a half-pushed update, an open session or another version than its peers without the
error saying so."""

from __future__ import annotations

import time

import pytest
import torch
from trainer_support import Faults, checkpoint_tensors, serve_engine_http

from hotswap import Engine
from hotswap.trainer import DiskWeightPusher, HttpEngineClient, IPCWeightPusher, WeightPushError, free_port, verify_engines
from hotswap.trainer.push import COMMITTED, ROLLED_BACK, UNKNOWN, UNTOUCHED

BUCKET = 200_000  # three buckets of the tiny model
TENSOR_ROUTE = "/update_weights_from_tensor"


@pytest.fixture(scope="module")
def engines(tiny_qwen3):
    """Three tiny engines, reused: every case leaves them as it found them (or says otherwise and cleans up)."""
    with (Engine(str(tiny_qwen3), device="cpu", page_size=4) as a, Engine(str(tiny_qwen3), device="cpu", page_size=4) as b,
          Engine(str(tiny_qwen3), device="cpu", page_size=4) as c):
        yield a, b, c


def snapshot(engine) -> tuple[str, str]:
    return engine.check_weights("checksum").digest, engine.weight_version


def no_session_open(engine) -> bool:
    return "no weight-update session is open" in engine.end_weight_update(abort=True).message and not engine.get_load().paused


def front(engine, faults: Faults | None = None, timeout_s: float = 30.0):
    url, server = serve_engine_http(engine, faults)
    return HttpEngineClient(url, timeout_s=timeout_s, connect_timeout_s=2.0), server


@pytest.mark.parametrize("fault", ["down", "slow", "refusing", "dies"])
def test_one_failing_engine_rolls_every_engine_back(engines, tiny_qwen3_v2, fault):
    a, b, c = engines
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    http_b, server_b = front(b)
    if fault == "down":
        faulty, server_c = HttpEngineClient(f"http://127.0.0.1:{free_port()}", connect_timeout_s=2.0), None
        what = "Connection refused"
    elif fault == "slow":  # applies the bucket, answers after the trainer gave up
        faulty, server_c = front(c, Faults(delay_after={TENSOR_ROUTE: 2.0}), timeout_s=0.5)
        what = "within 0.5 s"
    elif fault == "refusing":
        faulty, server_c = front(c, Faults(bad_shape=True))
        what = "shape"
    else:  # killed while loading the second bucket: no reply, then nothing listens
        faulty, server_c = front(c, Faults(die_on={TENSOR_ROUTE: 2}))
        what = "dropped the connection"
    before = [snapshot(e) for e in engines]
    start = time.monotonic()
    try:
        with pytest.raises(WeightPushError) as info:
            IPCWeightPusher([a, http_b, faulty], bucket_bytes=BUCKET, call_timeout_s=10).push(v2, weight_version=f"v2-{fault}")
        assert time.monotonic() - start < 8
        err = info.value
        assert faulty.base_url in err.reason and what in err.reason, err.reason
        # the healthy engines (in process and over HTTP) rolled back and serve again, with the old version
        assert err.states[:2] == [ROLLED_BACK, ROLLED_BACK]
        assert err.states[2] == {"down": UNTOUCHED, "slow": ROLLED_BACK, "refusing": ROLLED_BACK, "dies": UNKNOWN}[fault]
        assert err.rolled_back == (fault != "dies")
        time.sleep(2.1 if fault == "slow" else 0)  # the slow engine's late reply changes nothing either
        if fault == "dies":  # its process would be gone with its session; the stand-in's is closed here
            assert c.end_weight_update(abort=True).rolled_back
        assert [snapshot(e) for e in engines] == before
        assert all(no_session_open(e) for e in engines)
    finally:
        server_b.shutdown()
        if server_c is not None and fault != "dies":
            server_c.shutdown()


def test_lost_commit_reply_is_settled_and_mixed_versions_are_named(engines, tiny_qwen3, tiny_qwen3_v2):
    a, b, _ = engines
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    # b commits, but its reply comes after the trainer's timeout: read back, it counts as committed
    slow_b, server = front(b, Faults(delay_after={"/end_weight_update": 1.5}), timeout_s=0.5)
    try:
        res = IPCWeightPusher([a, slow_b], bucket_bytes=BUCKET).push(v2, weight_version="v2")
        assert res.weight_version == "v2" and a.weight_version == b.weight_version == "v2"
        assert "reply was lost" in res.engine_results[1].message
    finally:
        server.shutdown()
    # b dies before its commit: a committed, b did not; the error says so and who holds what
    dying_b, server = front(b, Faults(die_on={"/end_weight_update": 1}))
    with pytest.raises(WeightPushError) as info:
        IPCWeightPusher([a, dying_b], bucket_bytes=BUCKET).push(v1, weight_version="v3")
    err = info.value
    assert err.states == [COMMITTED, UNKNOWN] and err.committed == [0] and not err.rolled_back
    assert "serve different weights" in err.reason and dying_b.base_url in err.reason
    assert a.weight_version == "v3" and b.weight_version == "v2"
    b.end_weight_update(abort=True)  # b's process would be gone; the stand-in's session is closed here
    # the documented recovery: push the same weights and version again; every engine ends equal
    http_b, server = front(b)
    try:
        res = IPCWeightPusher([a, http_b], bucket_bytes=BUCKET).push(v1, weight_version="v3")
        assert res.weight_version == "v3" and a.weight_version == b.weight_version == "v3"
        assert all(r.ok for r in verify_engines([a, http_b], v1))
    finally:
        server.shutdown()


def test_retry_after_a_timed_out_begin_ends_the_stale_session(engines, tiny_qwen3_v2):
    """The begin reaches the engine after the trainer gave up (and after its abort): the session it opens is
    stale. The retried push ends it and applies the weights once; nothing is left open."""
    a = engines[0]
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    faults = Faults(delay_before={"/begin_weight_update": 1.0})
    client, server = front(a, faults, timeout_s=0.3)
    try:
        pusher = IPCWeightPusher(client, bucket_bytes=BUCKET)
        with pytest.raises(WeightPushError, match="begin_weight_update failed on .* within 0.3 s") as info:
            pusher.push(v2, weight_version="v7")
        assert info.value.states == [ROLLED_BACK]  # the abort found nothing to end yet
        time.sleep(1.2)
        assert a.get_load().paused  # the late begin opened a session that holds generation
        faults.delay_before.clear()
        res = pusher.push(v2, weight_version="v7")
        assert res.weight_version == "v7" and a.weight_version == "v7" and res.num_buckets == 3
        assert all(r.ok for r in verify_engines(a, v2)) and no_session_open(a)
    finally:
        server.shutdown()


def test_a_bucket_landing_after_the_abort_is_refused(engines, tiny_qwen3, tiny_qwen3_v2, tmp_path):
    """The bucket call reaches the engine after the trainer gave up on it and aborted the session (the
    checkpoint is kept, so the engine could still read it): it names the aborted session and is refused, so
    the engine keeps serving its weights under its version, not part of the new ones under the old name."""
    a = engines[0]
    client, server = front(a, Faults(delay_before={"/update_weights_from_disk": 1.0}), timeout_s=0.3)
    before = snapshot(a)
    try:
        pusher = DiskWeightPusher(client, template_dir=tiny_qwen3, root_dir=tmp_path, keep=True, call_timeout_s=0.3)
        with pytest.raises(WeightPushError, match="update_weights_from_disk failed on .* within 0.3 s") as info:
            pusher.push(checkpoint_tensors(tiny_qwen3_v2), weight_version="late")
        assert info.value.states == [ROLLED_BACK] and pusher.last_path.is_dir()
        time.sleep(1.5)  # the late call has landed and been answered
        assert snapshot(a) == before and no_session_open(a)
    finally:
        server.shutdown()


def test_a_slow_in_process_engine_fails_the_push_in_bounded_time(engines, tiny_qwen3_v2):
    """An in-process engine that loads a bucket but answers late fails the push within call_timeout_s, named,
    and its session is rolled back with the others."""
    a, b, _ = engines

    class Slow:
        def __getattr__(self, name):
            return getattr(b, name)

        def update_weights_from_tensor(self, *args, **kwargs):
            out = b.update_weights_from_tensor(*args, **kwargs)
            time.sleep(2)
            return out

        def __repr__(self):
            return "Slow(engine b)"

    before = [snapshot(a), snapshot(b)]
    start = time.monotonic()
    with pytest.raises(WeightPushError, match=r"update_weights_from_tensor failed on Slow\(engine b\): .*no reply within 0.5 s") as info:
        IPCWeightPusher([a, Slow()], bucket_bytes=BUCKET, call_timeout_s=0.5).push(checkpoint_tensors(tiny_qwen3_v2), weight_version="x")
    assert time.monotonic() - start < 1.5 and info.value.states == [ROLLED_BACK, ROLLED_BACK] and info.value.rolled_back
    time.sleep(2)
    assert [snapshot(a), snapshot(b)] == before and no_session_open(a) and no_session_open(b)


def test_verify_engines_names_the_differing_tensors_per_engine(engines, tiny_qwen3, tiny_qwen3_v2):
    a, b, _ = engines
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    IPCWeightPusher(a, bucket_bytes=BUCKET).push(v2, weight_version="check-v2")
    IPCWeightPusher(b, bucket_bytes=BUCKET).push(v1, weight_version="check-v1")
    http_b, server = front(b)
    try:
        expected = {**v2, "model.extra.weight": torch.ones(3)}
        ra, rb = verify_engines([a, http_b], expected)
        assert ra.engine == repr(a) and ra.differ == [] and ra.missing == ["model.extra.weight"] and ra.extra == []
        changed = sorted(n for n in v2 if not torch.equal(v1[n], v2[n]))
        assert rb.engine == repr(http_b) and rb.differ == changed and not rb.ok and http_b.base_url in str(rb)
        assert [r.ok for r in verify_engines([a, http_b], v2)] == [True, False]
    finally:
        server.shutdown()


def test_an_engine_committing_under_another_version_fails_the_push(engines, tiny_qwen3_v2):
    """Every committed engine must report the pushed version; one that commits but keeps its old version
    (here: a handle that drops it, as a session API without versions would) is named, not hidden."""
    a, b, _ = engines

    class Versionless:
        def __getattr__(self, name):
            return getattr(b, name)

        def end_weight_update(self, weight_version=None, abort=False, session_id=None):
            return b.end_weight_update(abort=abort, session_id=session_id)

        def __repr__(self):
            return "Versionless(engine b)"

    old = b.weight_version
    with pytest.raises(WeightPushError, match=rf"another weight_version than 'vv'.*Versionless\(engine b\): '{old}'") as info:
        IPCWeightPusher([a, Versionless()], bucket_bytes=BUCKET).push(checkpoint_tensors(tiny_qwen3_v2), weight_version="vv")
    assert info.value.states == [COMMITTED, COMMITTED] and a.weight_version == "vv" and b.weight_version == old
