"""The engine behind a pipe: RemoteEngine (the front end's EngineAPI) against the Engine it stands in for,
over an in-process Pipe, and the HTTP front end in its own process (`hotswap serve --frontend-process`)."""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import threading
import time

import httpx
import pytest
from engine_support import make_engine, sse_events, wait_idle
from frontend_support import linked_pipe

from hotswap import protocol as p
from hotswap.engine.remote import RemoteEngine
from hotswap.engine.service import EngineService
from hotswap.errors import EngineUnavailableError, HotswapError
from hotswap.sampling_params import SamplingParams
from hotswap.server.frontend_process import FrontendOptions, FrontendProcess
from hotswap.server.launch import bind_socket

GREEDY = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
SAMPLED = {"max_new_tokens": 8, "temperature": 1.0, "ignore_eos": True, "seed": 7}


@pytest.fixture
def linked(tiny_qwen3):
    """(engine, its service, a RemoteEngine on the other end of the pipe)."""
    engine = make_engine(tiny_qwen3)
    try:
        with linked_pipe(engine) as (service, remote):
            yield engine, service, remote
    finally:
        engine.shutdown()


def test_remote_generate_equals_local(linked):
    """Every generate shape gives through the pipe what the engine gives in process: tokens, logprobs, text, meta."""
    engine, _, remote = linked
    for params, kw in ((GREEDY, {"return_logprob": True, "top_logprobs_num": 2}), (SAMPLED, {"return_logprob": True})):
        engine.flush_cache()
        local = engine.generate("Alice likes", params, **kw)
        engine.flush_cache()
        there = remote.generate("Alice likes", params, **kw)
        assert there["output_ids"] == local["output_ids"] and there["text"] == local["text"]
        assert strip_volatile(there["meta_info"]) == strip_volatile(local["meta_info"])
    greedy = engine.generate("Alice likes", GREEDY)
    streamed = list(remote.generate("Alice likes", GREEDY, stream=True, incremental_streaming_output=True))
    assert sum((c["output_ids"] for c in streamed), []) == greedy["output_ids"]
    assert "".join(c["text"] for c in streamed) == greedy["text"]

    async def fan_out():
        outs = await remote.async_generate(["Alice likes", "Bob"], dict(SAMPLED, n=2))
        chunks = [c async for c in await remote.async_generate(["Alice likes", "Bob"], GREEDY, stream=True)]
        return outs, chunks

    outs, chunks = asyncio.run(fan_out())
    assert len(outs) == 4 and all(len(o["output_ids"]) == 8 for o in outs)
    assert {c["index"] for c in chunks} == {0, 1}
    assert remote.get_load().num_running == 0


def test_sampled_streaming_with_logprobs_through_the_pipe_equals_the_engine_in_process(linked, monkeypatch):
    """The RL shape (temperature 1, a seed, logprobs, n streams): the chunks through the front end's pipe carry the
    tokens, logprobs and meta the engine gives in process, and most tokens crossed as token rows (test_token_rows.py)."""
    engine, _, remote = linked
    crossed = []
    rebuild = p.output_of_token_row
    monkeypatch.setattr(p, "output_of_token_row", lambda row: crossed.append(row) or rebuild(row))
    params = {"max_new_tokens": 12, "temperature": 1.0, "ignore_eos": True, "seed": 11}

    def chunks(api) -> dict[int, list[dict]]:
        api.flush_cache()
        got: dict[int, list[dict]] = {}
        for c in api.generate(["Alice likes", "Bob"], params, stream=True, return_logprob=True, incremental_streaming_output=True):
            got.setdefault(c["index"], []).append(c)
        return got

    local, there = chunks(engine), chunks(remote)
    assert local.keys() == there.keys() == {0, 1}
    for k in local:
        ids = [sum((c["output_ids"] for c in chunks_), []) for chunks_ in (local[k], there[k])]
        lps = [sum((c["meta_info"]["output_token_logprobs"] for c in chunks_), []) for chunks_ in (local[k], there[k])]
        assert ids[0] == ids[1] and len(ids[0]) == 12
        assert lps[0] == lps[1]
        last = [chunks_[-1]["meta_info"] for chunks_ in (local[k], there[k])]
        assert [m["prompt_tokens"] for m in last] == [last[0]["prompt_tokens"]] * 2
        assert [m["finish_reason"] for m in last] == [last[0]["finish_reason"]] * 2
    assert len(crossed) >= 2 * 12 - 2 * 2  # all but each request's first (prompt logprobs) and last output


def strip_volatile(meta: dict) -> dict:
    """meta_info without what differs between any two calls (the request id, timings)."""
    return {k: v for k, v in meta.items() if k not in ("id", "e2e_latency")}


def test_remote_control_calls_and_refusals(linked, tiny_qwen3):
    """Control calls reach the scheduler and come back with their reply types; a refusal crosses as the engine's
    own error; a bad request changes nothing."""
    engine, _, remote = linked
    assert remote.capacity() == engine.capacity()
    info = remote.get_server_info()
    assert info["max_total_num_tokens"] == engine.capacity().max_total_tokens and info["weight_version"] == "default"
    before = remote.check_weights("checksum")
    out = remote.update_weights_from_disk(str(tiny_qwen3), weight_version="v2")
    assert out.success and remote.weight_version == "v2" == engine.weight_version
    assert remote.check_weights("checksum").checksums == before.checksums
    bad = remote.update_weights_from_disk("/definitely/missing")
    assert not bad.success and "missing" in bad.message
    with pytest.raises(HotswapError, match="unknown parameter"):
        remote.get_weights_by_name("no.such.weight")
    assert remote.get_weights_by_name("model.norm.weight", 2) == engine.get_weights_by_name("model.norm.weight", 2)
    with pytest.raises(HotswapError, match="max_new_tokens"):
        remote.generate("Alice", {"max_new_tokens": -3})
    assert remote.pause("keep").success and remote.is_paused()
    assert remote.resume().success and not remote.is_paused()


def test_abort_by_rid_through_the_pipe(linked):
    """abort_request(rid) from the front end ends that running request with its tokens so far."""
    engine, _, remote = linked
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(out=remote.generate("Alice", {"max_new_tokens": 500, "ignore_eos": True}, rid="r1")))
    t.start()
    deadline = time.monotonic() + 30
    while engine.get_load().num_running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    assert remote.pause("keep").success  # frozen mid-generation, so the abort cannot race its natural end
    assert remote.abort_request("r1").success
    assert remote.resume().success
    t.join(30)
    assert result["out"]["meta_info"]["finish_reason"]["type"] == "abort"
    wait_idle(engine)


async def until(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.005)


async def cancel_then_resend(engine, service, remote, resend):
    """Cancel a running request of rid "r1" and send "r1" again (`resend()`) before the engine's outputs can come back
    (they wait on the service's step lock): the old request's abort reaches the front end after the new request's route
    is set."""
    old = asyncio.ensure_future(remote.async_generate("Alice likes", {"max_new_tokens": 400, "ignore_eos": True}, rid="r1"))
    await until(lambda: engine.get_load().num_running == 1, "the first request never ran")
    with service._step_lock:
        old.cancel()
        await asyncio.gather(old, return_exceptions=True)
        new = asyncio.ensure_future(resend())
        await until(lambda: "r1" in remote._live_rids, "the resent request was never sent")
    return await new


def test_a_rid_resent_right_after_its_call_was_cancelled_gets_its_own_reply(linked):
    """A framework that times a request out and retries it under the same rid must get the retry's reply, not the
    cancelled request's abort (and its tokens); both end, nothing is left running."""
    engine, service, remote = linked
    short = {"max_new_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    out = asyncio.run(cancel_then_resend(engine, service, remote, lambda: remote.async_generate("Bob", short, rid="r1")))
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 8}
    assert out["output_ids"] == engine.generate("Bob", short)["output_ids"]
    wait_idle(engine)
    assert engine.check_invariants().success


def test_a_closing_front_end_aborts_a_rid_resent_after_a_cancel(linked):
    """The engine's side counts a rid once per request: the cancelled request's end must not make it forget the
    retry, which the front end's exit then aborts (held by a pause, it could not end on its own)."""
    engine, service, remote = linked

    async def resend():
        stream = await remote.async_generate("Bob", {"max_new_tokens": 400, "ignore_eos": True}, rid="r1", stream=True)
        await anext(stream)  # the old request's last output came before this one's first
        return stream

    async def main() -> None:
        stream = await cancel_then_resend(engine, service, remote, resend)
        assert engine.pause_generation(mode="in_place").success
        remote.shutdown()  # the front end exits with the retry running: only the engine's side can abort it now
        await stream.aclose()

    try:
        asyncio.run(main())
        assert service.closed.wait(10)
        wait_idle(engine)
    finally:
        engine.continue_generation()
    assert engine.check_invariants().success


def test_a_request_that_does_not_pickle_is_refused_by_name(linked):
    """A request the pipe cannot carry (an in-process object) fails with an error naming it; nothing reaches the
    engine and the link goes on working."""
    engine, _, remote = linked
    before = engine.check_weights("checksum").digest
    with pytest.raises(HotswapError, match="cannot send UpdateWeightsFromTensorRequest"):
        remote.update_weights_from_tensor([("model.norm.weight", lambda: None)])
    assert engine.check_weights("checksum").digest == before
    assert remote.generate("Alice", GREEDY)["output_ids"] == engine.generate("Alice", GREEDY)["output_ids"]


def test_a_failing_consumer_costs_only_itself(linked):
    """A request whose sink raises (a broken consumer on the front end) is delivered to no further, as in the
    scheduler; every other request on the link still gets its outputs."""
    engine, _, remote = linked

    def broken(out):
        raise RuntimeError("consumer broke")

    req = p.GenerateRequest(rid="broken", input_ids=[1, 2, 3], sampling_params=SamplingParams(max_new_tokens=4, ignore_eos=True),
                            seed=0, sink=broken, stream=True)
    remote.scheduler.submit(p.GenerateBatch(requests=[req])).result(timeout=30)
    assert within(30, lambda: remote.generate("Alice", GREEDY))["output_ids"] == engine.generate("Alice", GREEDY)["output_ids"]
    wait_idle(engine)
    assert remote.scheduler.dead is None


def within(seconds: float, fn):
    """fn() in a thread, failing the test (instead of hanging it) if it has not returned in `seconds`."""
    result: list = []
    t = threading.Thread(target=lambda: result.append(fn()), daemon=True)
    t.start()
    t.join(seconds)
    assert result, f"no answer within {seconds} s"
    return result[0]


def test_either_end_closing_ends_the_other_cleanly(tiny_qwen3):
    """The engine's side closing fails what waits on it and ends running streams aborted (nothing hangs); the
    front end closing aborts its requests in the engine, which goes on serving."""
    engine = make_engine(tiny_qwen3)
    try:
        ours, theirs = mp.Pipe(duplex=True)
        service = EngineService(engine, ours).start()
        closed = threading.Event()
        remote = RemoteEngine(theirs, service.info, on_close=closed.set)
        stream = remote.generate("Alice", {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
        next(stream)
        service.close()
        chunks = list(stream)
        assert chunks[-1]["meta_info"]["finish_reason"]["type"] == "abort"
        assert "closed" in chunks[-1]["meta_info"]["finish_reason"]["message"]
        assert closed.wait(5)
        with pytest.raises(EngineUnavailableError):
            remote.get_load()
        with pytest.raises(EngineUnavailableError, match="closed"):  # refused at once (503), never left waiting
            remote.generate("Alice", GREEDY)
        remote.shutdown()
        wait_idle(engine)  # the engine aborted what the gone front end had running

        ours, theirs = mp.Pipe(duplex=True)
        service = EngineService(engine, ours).start()
        remote = RemoteEngine(theirs, service.info)
        stream = remote.generate("Alice", {"max_new_tokens": 500, "ignore_eos": True}, stream=True)
        next(stream)
        assert engine.get_load().num_running == 1
        remote.shutdown()
        assert service.closed.wait(5)
        wait_idle(engine)
        assert engine.generate("Alice", GREEDY)["meta_info"]["finish_reason"]["type"] == "length"
        service.close()
    finally:
        engine.shutdown()


@pytest.mark.slow
def test_http_front_end_in_its_own_process(tiny_qwen3):
    """The app served from a spawned process answers as the in-process one does: native and OpenAI routes,
    streamed and not, weight updates and their refusals; stop() drains it and it exits 0."""
    engine = make_engine(tiny_qwen3)
    sock = bind_socket("127.0.0.1", 0)
    try:
        with FrontendProcess(engine, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1], api_key="k")).start() as front:
            with httpx.Client(base_url=front.url, timeout=60, headers={"Authorization": "Bearer k"}) as c:
                assert httpx.get(front.url + "/get_server_info").status_code == 401  # the key holds over there too
                body = {"text": "Alice likes", "sampling_params": GREEDY, "return_logprob": True}
                engine.flush_cache()
                local = engine.generate("Alice likes", GREEDY, return_logprob=True)
                engine.flush_cache()
                out = c.post("/generate", json=body).json()
                assert out["output_ids"] == local["output_ids"]
                assert out["meta_info"]["output_token_logprobs"] == json.loads(json.dumps(local["meta_info"]["output_token_logprobs"]))
                with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
                    events = sse_events(r.iter_lines())
                assert events[-1]["output_ids"] == local["output_ids"] and events[-1]["text"] == local["text"]
                r = c.post("/v1/completions", json={"model": "m", "prompt": "Alice likes", "max_tokens": 8, "temperature": 0,
                                                   "ignore_eos": True})
                assert r.status_code == 200 and r.json()["choices"][0]["text"] == local["text"]
                r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3), "weight_version": "v2"})
                assert r.status_code == 200 and r.json()["success"]
                assert c.get("/get_weight_version").json()["weight_version"] == "v2"
                assert c.post("/update_weights_from_disk", json={"model_path": "/definitely/missing"}).status_code == 400
                info = c.get("/get_server_info").json()
                assert info["weight_version"] == "v2" and info["max_total_num_tokens"] == engine.capacity().max_total_tokens
            front.stop()
            assert front.process.exitcode == 0
        assert json.dumps(engine.get_load().to_dict())  # the engine is still fine once its front end is gone
        wait_idle(engine)
    finally:
        engine.shutdown()


def test_a_disk_update_through_one_front_end_moves_every_front_ends_model_path(tiny_qwen3, tiny_qwen3_v2):
    """Several front ends of one server (`--frontend-workers`): the folder the served weights came from is what every
    one of them reports (`/get_model_info`, the OpenAI model id), not only the one that took the update."""
    engine = make_engine(tiny_qwen3)
    siblings: list[EngineService] = []
    pairs = [mp.Pipe(duplex=True) for _ in range(2)]
    services = [EngineService(engine, ours, siblings).start() for ours, _ in pairs]
    remotes = [RemoteEngine(theirs, service.info) for (_, theirs), service in zip(pairs, services)]
    try:
        assert [r.model_path for r in remotes] == [str(tiny_qwen3)] * 2
        assert remotes[0].update_weights_from_disk(str(tiny_qwen3_v2)).success
        deadline = time.monotonic() + 10
        while remotes[1].model_path != str(tiny_qwen3_v2) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert [r.model_path for r in remotes] == [str(tiny_qwen3_v2)] * 2
        assert engine.model_path == str(tiny_qwen3_v2)
        assert not remotes[1].update_weights_from_disk(str(tiny_qwen3_v2) + "-missing").success  # a refusal moves nothing
        time.sleep(0.1)
        assert [r.model_path for r in remotes] == [str(tiny_qwen3_v2)] * 2
    finally:
        for remote in remotes:
            remote.shutdown()
        for service in services:
            service.close()
        engine.shutdown()


def test_a_front_end_group_makes_its_engine_services_siblings(tiny_qwen3):
    """How `hotswap serve --frontend-workers N` wires the test above: one list every service of the group joins."""
    from hotswap.server.frontend_process import FrontendGroup

    engine = make_engine(tiny_qwen3)
    sock = bind_socket("127.0.0.1", 0)
    group = FrontendGroup(engine, sock, FrontendOptions(host="127.0.0.1", port=sock.getsockname()[1]), workers=2)
    try:
        services = [front.service for front in group.fronts]
        assert services[0].siblings is services[1].siblings and services[0].siblings == services
    finally:
        group.stop()
        engine.shutdown()


def test_model_info_after_another_front_ends_disk_update_names_the_new_folder(tiny_qwen3, tiny_qwen3_v2):
    """get_model_info reads the model path after its round trip to the engine, so a disk update another front end made
    before it shows even when this front end has not yet taken the announcement (its reader is held here until the call
    is in flight)."""
    engine = make_engine(tiny_qwen3)
    siblings: list[EngineService] = []
    pairs = [mp.Pipe(duplex=True) for _ in range(2)]
    services = [EngineService(engine, ours, siblings).start() for ours, _ in pairs]
    remotes = [RemoteEngine(theirs, service.info) for (_, theirs), service in zip(pairs, services)]
    entered, release = threading.Event(), threading.Event()
    follow = remotes[1].scheduler._on_model_path

    def held(path: str) -> None:
        entered.set()
        release.wait(30)
        follow(path)

    remotes[1].scheduler._on_model_path = held
    try:
        assert remotes[0].update_weights_from_disk(str(tiny_qwen3_v2)).success
        assert entered.wait(30)
        result: dict = {}
        t = threading.Thread(target=lambda: result.update(info=remotes[1].get_model_info()))
        t.start()
        deadline = time.monotonic() + 10
        while not remotes[1].scheduler._calls:  # its call to the engine is sent (and waits behind the announcement)
            assert time.monotonic() < deadline
            time.sleep(0.001)
        release.set()
        t.join(30)
        assert result["info"]["model_path"] == str(tiny_qwen3_v2)
    finally:
        release.set()
        for remote in remotes:
            remote.shutdown()
        for service in services:
            service.close()
        engine.shutdown()
