"""IPCWeightPusher with several bucket calls in flight (`calls_in_flight`): weights land bit-exact, the next
bucket is sent before the last one's reply, a failure sends nothing more and rolls every bucket back (a
bucket landing after the abort is refused by its session id), and a silent engine fails the push in
bounded time."""

from __future__ import annotations

import os
import threading
import time

import pytest
from trainer_support import bucket_bytes_for, checkpoint_tensors, faulted, serve_engine_http

from hotswap.trainer import HttpEngineClient, IPCWeightPusher, WeightPushError, iter_buckets, iter_named_tensors, verify_engine_weights
from hotswap.trainer.push import ROLLED_BACK
from hotswap.wire.ipc import shm_block_prefix

BUCKETS = 4


def snapshot(engine) -> tuple[str, str]:
    return engine.check_weights("checksum").digest, engine.weight_version


def no_session_open(engine) -> bool:
    return "no weight-update session is open" in engine.end_weight_update(abort=True).message


def bucket_names(weights, bucket_bytes: int) -> list[list[str]]:
    return [[n for n, _ in b] for b in iter_buckets(iter_named_tensors(weights), bucket_bytes)]


def leftover_blocks(engine) -> list[str]:
    return [f for f in os.listdir("/dev/shm") if f.startswith(shm_block_prefix(engine.get_ipc_token()))]


class Wrapped:
    """An engine whose bucket calls this test steers: each is logged ("call"/"reply", bucket index) and may be
    held by `before(k)` (ahead of the engine) or `after(k)` (ahead of the reply); the rest passes through."""

    def __init__(self, engine, names: list[list[str]]):
        self.engine = engine
        self.bucket_of = {b[0]: k for k, b in enumerate(names)}
        self.events: list[tuple[str, int]] = []
        self.replies: dict[int, object] = {}
        self.lock = threading.Lock()
        self.outstanding = self.most = 0

    def __getattr__(self, name):
        return getattr(self.engine, name)

    def before(self, k: int) -> None:
        pass

    def after(self, k: int) -> None:
        pass

    def update_weights_from_tensor(self, named_tensors, **kw):
        k = self.bucket_of[named_tensors[0]["name"]]
        with self.lock:
            self.events.append(("call", k))
            self.outstanding += 1
            self.most = max(self.most, self.outstanding)
        self.before(k)
        out = self.replies[k] = self.engine.update_weights_from_tensor(named_tensors, **kw)
        self.after(k)
        with self.lock:
            self.events.append(("reply", k))
            self.outstanding -= 1
        return out

    def __repr__(self):
        return "Wrapped(engine)"


@pytest.mark.parametrize("transport", ["in_process", "http", "app"])
@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_pushes_land_bit_exact_with_calls_in_flight(request, engine, tiny_qwen3, tiny_qwen3_v2, in_flight, transport):
    """In process, over HTTP (the tests' front) and through the server's app (`hotswap serve`'s routes)."""
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    bucket_bytes = bucket_bytes_for(v2, BUCKETS)
    url, server = serve_engine_http(engine) if transport == "http" else (None, None)
    url = request.getfixturevalue("server").url if transport == "app" else url
    target = HttpEngineClient(url, timeout_s=30) if url else engine
    try:
        for weights, version in ((v2, f"v2-{in_flight}"), (v1, f"v1-{in_flight}")):
            seen = []
            res = IPCWeightPusher(target, bucket_bytes=bucket_bytes, calls_in_flight=in_flight).push(
                weights, weight_version=version, progress=lambda *a: seen.append(a))
            sizes = [(len(b), sum(t.numel() * 4 for _, t in b)) for b in iter_buckets(iter_named_tensors(weights), bucket_bytes)]
            # once per bucket, in order, with the running totals
            assert seen == [(k, sum(n for n, _ in sizes[:k + 1]), sum(b for _, b in sizes[:k + 1])) for k in range(BUCKETS)]
            assert (res.num_buckets, res.num_tensors, res.num_bytes) == (BUCKETS, len(weights), sum(b for _, b in sizes))
            assert res.weight_version == version == engine.weight_version
            assert verify_engine_weights(engine, weights).success
        assert leftover_blocks(engine) == [] and no_session_open(engine)
    finally:
        if server is not None:
            server.shutdown()


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_the_next_bucket_is_sent_before_the_last_ones_reply(engine, tiny_qwen3, in_flight):
    """Each bucket's reply is held until the next bucket's call has reached the engine (or 2 s passed): with
    calls in flight that happens every time, one call at a time never; never more than `in_flight` calls
    are outstanding."""
    v1 = checkpoint_tensors(tiny_qwen3)
    bucket_bytes = bucket_bytes_for(v1, BUCKETS)
    wrapped = Wrapped(engine, bucket_names(v1, bucket_bytes))
    started = [threading.Event() for _ in range(BUCKETS + 1)]
    started[BUCKETS].set()
    wrapped.before = lambda k: started[k].set()
    wrapped.after = lambda k: started[k + 1].wait(2 if in_flight > 1 else 0)
    res = IPCWeightPusher(wrapped, bucket_bytes=bucket_bytes, calls_in_flight=in_flight).push(v1, weight_version=f"order-{in_flight}")
    assert res.num_buckets == BUCKETS and verify_engine_weights(engine, v1).success
    at = {e: i for i, e in enumerate(wrapped.events)}
    overlapped = [at["call", k + 1] < at["reply", k] for k in range(BUCKETS - 1)]
    assert overlapped == [in_flight > 1] * (BUCKETS - 1), wrapped.events
    assert wrapped.most == 1 if in_flight == 1 else 2 <= wrapped.most <= in_flight


@pytest.mark.parametrize("in_flight", [1, 2, 3])
def test_a_refused_bucket_rolls_every_bucket_back(engine, tiny_qwen3_v2, in_flight):
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    bucket_bytes = bucket_bytes_for(v2, BUCKETS)
    before = snapshot(engine)
    with pytest.raises(WeightPushError, match="update_weights_from_tensor failed on .*shape") as info:
        IPCWeightPusher(engine, bucket_bytes=bucket_bytes, calls_in_flight=in_flight).push(faulted(v2, bucket_bytes, 1, "shape"),
                                                                                            weight_version="bad")
    assert info.value.states == [ROLLED_BACK] and info.value.rolled_back
    assert snapshot(engine) == before and no_session_open(engine) and leftover_blocks(engine) == []


def test_a_bucket_in_flight_that_lands_after_the_abort_is_refused(engine, tiny_qwen3_v2):
    """Bucket 1 is refused while bucket 2 is in flight; bucket 2 reaches the engine only after the pusher gave up
    on it and aborted the session: it names that session and is refused, bucket 3 is never sent, and the
    engine holds its weights as before, bit for bit."""
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    bucket_bytes = bucket_bytes_for(v2, BUCKETS)
    bad = faulted(v2, bucket_bytes, 1, "shape")
    wrapped = Wrapped(engine, bucket_names(bad, bucket_bytes))
    aborted, landed = threading.Event(), threading.Event()

    def end_weight_update(*args, **kw):
        out = engine.end_weight_update(*args, **kw)
        aborted.set()
        return out

    wrapped.end_weight_update = end_weight_update
    wrapped.before = lambda k: aborted.wait(10) if k == 2 else None
    wrapped.after = lambda k: landed.set() if k == 2 else None
    before = snapshot(engine)
    with pytest.raises(WeightPushError, match="shape") as info:
        IPCWeightPusher(wrapped, bucket_bytes=bucket_bytes, calls_in_flight=2, call_timeout_s=1.5).push(bad, weight_version="late")
    assert info.value.states == [ROLLED_BACK] and info.value.rolled_back
    assert landed.wait(10)
    late = wrapped.replies[2]
    assert not late.success and "is not open: it was aborted" in late.message and late.extra.session == "aborted"
    assert sorted(k for e, k in wrapped.events if e == "call") == [0, 1, 2]
    assert snapshot(engine) == before and no_session_open(engine) and leftover_blocks(engine) == []


def test_without_sessions_the_buckets_in_flight_after_a_failed_one_stay_applied(engine, tiny_qwen3, tiny_qwen3_v2):
    """SGLang's mode (no sessions): each call is atomic on its own, so what landed stays: with two calls in flight,
    buckets 0 and 2 (sent while bucket 1 was in flight), not 1 (refused) nor 3 (never sent)."""
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    bucket_bytes = bucket_bytes_for(v2, BUCKETS)
    names = bucket_names(v2, bucket_bytes)
    try:
        with pytest.raises(WeightPushError, match="shape"):
            IPCWeightPusher(engine, bucket_bytes=bucket_bytes, use_sessions=False, calls_in_flight=2).push(faulted(v2, bucket_bytes, 1, "shape"),
                                                                                     weight_version="partial")
        assert set(verify_engine_weights(engine, v2).get("mismatches")) == set(names[1] + names[3])
        assert engine.weight_version == "partial"  # set by the first call that landed, as SGLang does
    finally:
        assert IPCWeightPusher(engine, bucket_bytes=bucket_bytes).push(v1, weight_version="v1").weight_version == "v1"
    assert verify_engine_weights(engine, v1).success


def test_a_silent_engine_with_calls_in_flight_fails_the_push_in_bounded_time(engine, tiny_qwen3, tiny_qwen3_v2):
    """Bucket calls that never answer: the push waits `call_timeout_s` for the oldest, once more for the one in
    flight behind it, sends nothing else, aborts, and unlinks both blocks."""
    v1, v2 = checkpoint_tensors(tiny_qwen3), checkpoint_tensors(tiny_qwen3_v2)
    bucket_bytes = bucket_bytes_for(v2, BUCKETS)
    wrapped = Wrapped(engine, bucket_names(v2, bucket_bytes))
    release = threading.Event()

    def silent(named_tensors, **kw):
        wrapped.events.append(("call", wrapped.bucket_of[named_tensors[0]["name"]]))
        release.wait(10)
        return {"success": False, "message": "released by the test"}

    wrapped.update_weights_from_tensor = silent
    before = snapshot(engine)
    start = time.monotonic()
    try:
        with pytest.raises(WeightPushError, match=r"update_weights_from_tensor failed on Wrapped\(engine\): .*no reply within 0.5 s") as info:
            IPCWeightPusher(wrapped, bucket_bytes=bucket_bytes, calls_in_flight=2, call_timeout_s=0.5).push(v2, weight_version="silent")
        assert time.monotonic() - start < 4 and info.value.states == [ROLLED_BACK]
        assert wrapped.events == [("call", 0), ("call", 1)] and leftover_blocks(engine) == []
    finally:
        release.set()
    assert snapshot(engine) == before and no_session_open(engine) and verify_engine_weights(engine, v1).success


@pytest.mark.gpu
def test_gpu_buckets_pack_into_one_buffer_per_call_in_flight():
    """Bucket k packs into buffer k % calls_in_flight: with 2 in flight buckets k and k + 2 name one storage, k and k + 1
    two (the engine maps each once and keeps both mapped)."""
    import torch

    weights = {f"model.layers.{i}.w": torch.randn(64, 64, device="cuda") for i in range(8)}
    storages = {}  # bucket -> the storages its handles name (calls in flight may arrive in either order)

    class Recorder:
        def begin_weight_update(self):
            return {"success": True}

        def end_weight_update(self, weight_version=None, abort=False, **kw):
            return {"success": True, "weight_version": weight_version}

        def update_weights_from_tensor(self, named_tensors, **kw):
            storages[int(named_tensors[0]["name"].split(".")[2]) // 2] = {(d["handle"], d["storage_handle_offset"]) for d in named_tensors}
            return {"success": True}

    res = IPCWeightPusher(Recorder(), bucket_bytes=2 * 64 * 64 * 4, calls_in_flight=2).push(weights, weight_version="ring")
    assert res.num_buckets == 4 and sorted(storages) == [0, 1, 2, 3] and all(len(s) == 1 for s in storages.values())
    assert storages[0] == storages[2] and storages[1] == storages[3] and storages[0] != storages[1]
