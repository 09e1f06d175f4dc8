"""What a framework author hits around a push: a begin that answers after the pusher gave up, an engine whose
abort nobody confirmed, a dtype="auto" check that cannot read the dtype, an empty push, a server with an
admin key."""

from __future__ import annotations

import time

import pytest
from test_trainer_ipc import recording_server
from trainer_support import Faults, checkpoint_tensors, serve_engine_http

from hotswap import Engine
from hotswap.trainer import EngineResult, HttpEngineClient, IPCWeightPusher, WeightPushError, verify_engine_weights, verify_engines
from hotswap.trainer.push import ROLLED_BACK, UNKNOWN, UNTOUCHED


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        yield eng


def no_session_open(engine) -> bool:
    return "no weight-update session is open" in engine.end_weight_update(abort=True).message and not engine.get_load().paused


def test_a_begin_answered_after_the_push_gave_up_is_aborted(engine, tiny_qwen3_v2):
    """The engine answers begin_weight_update after call_timeout_s (it drained long rollouts first): the push
    fails, and the session that begin opened late is aborted by its id, not left holding generation until it
    expires (weight_session_timeout_s) with every rollout queued behind it."""
    url, server = serve_engine_http(engine, Faults(delay_before={"/begin_weight_update": 1.0}))
    try:
        before = engine.check_weights("checksum").digest
        with pytest.raises(WeightPushError, match="begin_weight_update: no reply within 0.3 s"):
            IPCWeightPusher(HttpEngineClient(url, timeout_s=10), call_timeout_s=0.3).push(checkpoint_tensors(tiny_qwen3_v2), weight_version="late")
        time.sleep(1.5)  # the begin lands, then its abort
        assert no_session_open(engine)
        assert engine.check_weights("checksum").digest == before and engine.weight_version != "late"
    finally:
        server.shutdown()


class DeadEngineFront:
    """A front end whose engine process died: it opened a session, then answers every call with a refusal."""

    def __init__(self, token: str):
        self.token = token

    def __repr__(self) -> str:
        return "DeadEngineFront()"

    def begin_weight_update(self):
        return {"success": True, "message": "open", "session_id": "s-dead"}

    def update_weights_from_tensor(self, *args, **kwargs):
        return {"success": False, "message": "the engine process closed the connection"}

    def end_weight_update(self, *args, **kwargs):
        return {"success": False, "message": "the engine process closed the connection"}

    def get_ipc_token(self) -> str:
        return self.token


def test_an_abort_nobody_confirmed_leaves_the_engine_unknown(engine, tiny_qwen3_v2):
    """Only the engine's sessions confirm an abort naming a session: a refusal that does not say how the session
    ended (a dead engine behind its front end) is no rollback."""
    before = engine.check_weights("checksum").digest
    with pytest.raises(WeightPushError) as info:
        IPCWeightPusher([engine, DeadEngineFront(engine.get_ipc_token())]).push(checkpoint_tensors(tiny_qwen3_v2), weight_version="dead")
    assert info.value.states == [ROLLED_BACK, UNKNOWN] and not info.value.rolled_back
    assert "DeadEngineFront() unknown" in info.value.reason
    assert engine.check_weights("checksum").digest == before and no_session_open(engine)


class NoModelInfo:
    """An engine whose model info the trainer may not read (a server's API key it does not hold)."""

    def __init__(self, engine):
        self.engine = engine

    def __repr__(self) -> str:
        return "NoModelInfo()"

    def get_model_info(self):
        return EngineResult(False, "HTTP 401: missing or invalid API key")

    def check_weights(self, *args, **kwargs):
        return self.engine.check_weights(*args, **kwargs)


def test_dtype_auto_that_cannot_be_read_is_an_error_not_a_mismatch(engine, tiny_qwen3):
    weights = checkpoint_tensors(tiny_qwen3)
    assert engine.update_weights_from_tensor(list(weights.items())).success
    report = verify_engines(NoModelInfo(engine), weights, dtype="auto")[0]
    assert not report.ok and not report.differ and "cannot read the weight dtype" in report.error and "401" in report.error
    one = verify_engine_weights(NoModelInfo(engine), weights, dtype="auto")
    assert not one and "cannot read the weight dtype" in one.message
    assert verify_engines(engine, weights, dtype="auto")[0].ok


def test_an_empty_push_is_refused_before_any_engine_call(engine, tiny_qwen3_v2):
    """A consumed iterator (named_parameters() read once already) or an empty mapping would commit the new
    version over unchanged weights."""
    named = iter(checkpoint_tensors(tiny_qwen3_v2).items())
    list(named)
    version = engine.weight_version
    for weights in (named, {}):
        with pytest.raises(WeightPushError, match="nothing to push") as info:
            IPCWeightPusher(engine).push(weights, weight_version="empty")
        assert info.value.states == [UNTOUCHED] and info.value.rolled_back
    assert engine.weight_version == version and no_session_open(engine)


def test_http_client_sends_the_admin_key_on_admin_routes_and_the_api_key_on_status_routes():
    """A server with both of SGLang's keys refuses the API key on admin routes and the admin key elsewhere."""
    url, server, seen = recording_server()
    try:
        client = HttpEngineClient(url, api_key="api", admin_api_key="admin", timeout_s=5)
        client.begin_weight_update()
        client.get_ipc_token()
        client.check_weights("checksum")
        client.get_model_info()
        client.post("/generate", {"input_ids": [1]}, admin=False)
        assert {path: auth for _, path, auth in seen} == {"/begin_weight_update": "Bearer admin", "/get_ipc_token": "Bearer admin",
                                                          "/weights_checker": "Bearer admin", "/get_model_info": "Bearer api",
                                                          "/generate": "Bearer api"}
        seen.clear()
        HttpEngineClient(url, api_key="api", timeout_s=5).begin_weight_update()  # one key: sent everywhere, as before
        assert [auth for _, _, auth in seen] == ["Bearer api"]
    finally:
        server.shutdown()
    with pytest.raises(ValueError, match="admin_api_key"):
        HttpEngineClient(url, admin_api_key=" ")
