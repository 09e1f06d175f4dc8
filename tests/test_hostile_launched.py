"""Hostile clients against the server as `hotswap serve` launches it: two front end processes on one socket over
pipes to the engine in this process. What can go wrong only in that form is what crosses a pipe or lives in a front
end process: one client's request or stream holding up the pipe or the engine service for everyone, a reader that
never reads, a client gone mid-stream, huge-but-allowed bodies, a request that does not pickle, a front end process
killed mid-request. Each case checks that other clients still get their replies (bounded waits), that the engine
ends idle with its KV cache whole, and that the hostile client gets a clear error."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import signal
import socket
import threading
import time
from concurrent.futures import Future

import pytest
from engine_support import SIX_STREAMS_BODY, close_with_reset, make_engine, read_first_event, wait_idle
from frontend_support import launched, linked_pipe, only_worker, send

from hotswap import protocol as p
from hotswap.errors import EngineUnavailableError, HotswapError
from hotswap.server.app import create_app
from hotswap.server.frontend_process import FrontendOptions

PROMPT = "Alice likes 12 apples"
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
LONG = {"max_new_tokens": 400, "temperature": 0.8, "ignore_eos": True}
MAX_BODY = 2 << 20
SEND_TIMEOUT_S = 1.0  # the server's --send-timeout-s here: a reader that stops reading is dropped after this
BODY_TIMEOUT_S = HEADER_TIMEOUT_S = 1.0  # its --body-timeout-s and --header-timeout-s


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    eng = make_engine(tiny_qwen3)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def group(engine):
    with launched(engine, max_body_bytes=MAX_BODY, send_timeout_s=SEND_TIMEOUT_S, body_timeout_s=BODY_TIMEOUT_S,
                  header_timeout_s=HEADER_TIMEOUT_S) as g:
        yield g


def clean(engine) -> None:
    """Nothing runs or waits, and every KV page comes back once the prefix cache is flushed."""
    wait_idle(engine)
    assert engine.flush_cache().success
    assert engine.get_load().kv_pages_used == 0
    assert engine.check_invariants().success


def others_served(group) -> None:
    """A greedy /generate answers through each worker (a bounded wait, not a timing)."""
    for worker in range(len(group.fronts)):
        with only_worker(group, worker):
            r = send(group.url, "POST", "/generate", json={"text": PROMPT, "sampling_params": GREEDY}, timeout=20)
        assert r.status_code == 200, r.text
        assert len(r.json()["output_ids"]) == 6


def raw(group, path: str, body: bytes, rcvbuf: int | None = None) -> socket.socket:
    host, port = group.fronts[0].address
    sock = socket.socket()
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(10)
    sock.connect((host, port))
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    return sock


def wait_running(engine, n: int, timeout: float = 20.0, until=lambda: False) -> None:
    """Wait until `n` requests run or wait on the engine (or `until()`), bounded."""
    deadline = time.monotonic() + timeout
    while (load := engine.get_load()).num_running + load.num_waiting < n and not until():
        assert time.monotonic() < deadline, f"{n} request(s) never ran: {load}"
        time.sleep(0.01)


# ---- clients gone mid-stream -------------------------------------------------------------------------------------------------

def test_a_reset_mid_stream_aborts_every_fanned_out_request_on_the_engine(group, engine):
    """A stream of 2 prompts x n=3 through worker 0 whose client resets after its first chunk: the front end process
    sees it and the abort crosses the pipe; all six engine requests end and their pages come back."""
    with only_worker(group, 0):
        sock = raw(group, "/v1/completions", SIX_STREAMS_BODY)
        read_first_event(sock)
    assert engine.get_load().num_running + engine.get_load().num_waiting == 6
    close_with_reset(sock)
    clean(engine)
    others_served(group)


def test_a_client_gone_before_a_non_streamed_reply_aborts_it(group, engine):
    """A non-streamed batch whose client hangs up while it runs: the front end aborts it over the pipe."""
    body = json.dumps({"text": [PROMPT, "Bob"], "sampling_params": {**LONG, "n": 2}}).encode()
    with only_worker(group, 1):
        sock = raw(group, "/generate", body)
        wait_running(engine, 4)
    sock.close()
    clean(engine)
    others_served(group)


def disconnects(group) -> int:
    """The server's count of clients gone before their request ended (both workers' together)."""
    text = send(group.url, "GET", "/metrics").text
    return int(float(next(line.split()[-1] for line in text.splitlines() if line.startswith("hotswap_client_disconnects_total"))))


def test_a_reader_that_never_reads_is_dropped_and_its_request_aborted(group, engine):
    """A stream (tens of megabytes of cumulative logprobs) whose client reads nothing: once the front end process's
    transport holds more than its high-water mark for the send timeout it drops the connection, and the request is
    gone from the engine; meanwhile the same worker serves its other clients."""
    before = disconnects(group)
    body = json.dumps({"text": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 480}, "stream": True, "return_logprob": True,
                       "top_logprobs_num": 20, "return_text_in_logprobs": True}).encode()
    with only_worker(group, 0):
        sock = raw(group, "/generate", body, rcvbuf=4096)
        wait_running(engine, 1)
        r = send(group.url, "POST", "/generate", json={"text": "Bob", "sampling_params": GREEDY}, timeout=20)
        assert r.status_code == 200, r.text
    try:
        deadline = time.monotonic() + 20
        while disconnects(group) == before:
            assert time.monotonic() < deadline, "the reader that reads nothing was never dropped"
            time.sleep(0.05)
        clean(engine)
    finally:
        sock.close()
    others_served(group)


# ---- one worker frozen, slow or flooded: the other serves --------------------------------------------------------------------

def test_a_frozen_worker_holds_up_only_its_own_streams(group, engine):
    """Worker 0 stops reading its pipe (SIGSTOP) while its stream runs: the engine service's sender for it blocks,
    the scheduler does not; worker 1's clients are served meanwhile, and worker 0's stream ends whole once it runs again."""
    body = json.dumps({"text": PROMPT, "sampling_params": {**LONG, "max_new_tokens": 300}, "stream": True, "return_logprob": True,
                       "top_logprobs_num": 5}).encode()
    with only_worker(group, 0):
        sock = raw(group, "/generate", body)
        wait_running(engine, 1)
    os.kill(group.fronts[0].process.pid, signal.SIGSTOP)
    try:
        for _ in range(3):
            with only_worker(group, 1):
                r = send(group.url, "POST", "/generate", json={"text": "Bob", "sampling_params": GREEDY}, timeout=20)
            assert r.status_code == 200, r.text
    finally:
        os.kill(group.fronts[0].process.pid, signal.SIGCONT)
    got = b""
    sock.settimeout(30)
    while not got.endswith(b"data: [DONE]\r\n\r\n") and not got.endswith(b"0\r\n\r\n"):
        chunk = sock.recv(1 << 16)
        assert chunk, got[-200:]
        got += chunk
    sock.close()
    last = [line for line in got.split(b"\r\n") if line.startswith(b"data: {")][-1]
    assert json.loads(last[6:])["meta_info"]["completion_tokens"] == 300
    clean(engine)


def test_huge_but_allowed_bodies_cross_the_pipe(group, engine):
    """Bodies near the body limit that are valid (many prompts in one batch, n large, the longest stop lists, the largest
    logit_bias) go down worker 0's pipe and come back whole, while worker 1 serves; nothing is left behind."""
    stops = ["zq" * 32] * 1024
    bias = {str(i): 0.0 for i in range(512)}  # every token of the vocabulary
    cases = [
        {"input_ids": [[5, 6, 7, 8] * 100] * 200, "sampling_params": {**GREEDY, "max_new_tokens": 2}},
        {"text": PROMPT, "sampling_params": {**GREEDY, "temperature": 1.0, "n": 64, "stop": stops, "logit_bias": bias}},
        {"text": [PROMPT] * 32, "sampling_params": {**GREEDY, "stop": stops, "logit_bias": bias}, "return_logprob": True,
         "top_logprobs_num": 5, "logprob_start_len": 0},
    ]
    for body in cases:
        assert len(json.dumps(body)) <= MAX_BODY
        with only_worker(group, 0):
            result: dict = {}
            t = threading.Thread(target=lambda: result.update(r=send(group.url, "POST", "/generate", json=body, timeout=60)))
            t.start()
            wait_running(engine, 1, until=lambda: not t.is_alive())  # worker 0 took it
        others_served(group)
        t.join(60)
        r = result["r"]
        assert r.status_code == 200, r.text[:300]
        replies = r.json()
        want = len(body["input_ids"]) if "input_ids" in body else len(body["text"]) if isinstance(body["text"], list) else body["sampling_params"]["n"]
        assert len(replies) == want
        assert all(len(x["output_ids"]) == body["sampling_params"]["max_new_tokens"] for x in replies)
    clean(engine)


def test_an_oversized_body_is_refused_by_the_front_end(group, engine):
    """One byte over the limit: 413 from the front end process, nothing crosses the pipe."""
    body = {"input_ids": [5] * (MAX_BODY // 2), "sampling_params": GREEDY}
    r = send(group.url, "POST", "/generate", json=body)
    assert r.status_code == 413 and "max" in r.json()["error"]["message"].lower()
    clean(engine)


def test_slow_and_malformed_clients_of_one_worker_cost_the_others_nothing(group, engine):
    """Worker 0 holds half-sent heads and bodies and is sent malformed requests; both workers serve meanwhile, and the
    half-sent ones are dropped (408) within their bounds, leaving nothing on the engine."""
    host, port = group.fronts[0].address
    with only_worker(group, 0):
        slow = [socket.create_connection((host, port), timeout=10) for _ in range(8)]
        for i, s in enumerate(slow):
            s.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n" if i % 2 else
                      b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"te")
        for junk in (b"\x00\xff" * 64 + b"\r\n\r\n", b"GET / HTTP/9.9\r\n\r\n", b"POST /generate HTTP/1.1\r\nContent-Length: -1\r\n\r\n"):
            with socket.create_connection((host, port), timeout=10) as s:
                s.sendall(junk)
                assert s.recv(4096).startswith(b"HTTP/1.1 4") or True
        others_served(group)
    for s in slow:
        reply = b""
        while chunk := s.recv(4096):
            reply += chunk
        s.close()
        assert reply == b"" or reply.startswith(b"HTTP/1.1 408"), reply[:200]
    clean(engine)


# ---- what does not cross the pipe -------------------------------------------------------------------------------------------

def _refuse_rebuild() -> None:
    raise RuntimeError("cannot be rebuilt on this side")


class Unreadable:
    """A message that pickles but cannot be rebuilt on the other side."""

    def __reduce__(self):
        return (_refuse_rebuild, ())


class Unpicklable:
    """A message whose pickling raises ValueError (as HotswapError, a ValueError, would)."""

    def __reduce__(self):
        raise ValueError("refuses to be pickled")


def test_a_message_the_engine_cannot_read_closes_the_pipe_instead_of_hanging(engine):
    """The engine service's reader stopped on it without a word while its pipe stayed open: every later call of that
    front end then waited forever. Now the pipe closes and the front end's calls fail, naming why."""
    with linked_pipe(engine) as (service, remote):
        remote.scheduler.submit(Unreadable())
        with pytest.raises(EngineUnavailableError):
            remote.scheduler.submit(p.GetLoadRequest()).result(timeout=10)
        assert service.closed.wait(10)
    clean(engine)


def test_a_request_that_does_not_pickle_is_refused_by_name_and_the_pipe_serves_on(engine):
    """A request whose pickling raised ValueError was taken for a pipe that is gone (503, "unreachable")."""
    with linked_pipe(engine) as (_, remote):
        error = remote.scheduler.submit(Unpicklable()).exception(timeout=10)
        assert type(error) is HotswapError and "cannot send Unpicklable" in str(error), error
        assert remote.scheduler.submit(p.GetLoadRequest()).result(timeout=10).success


class TwoArgumentError(RuntimeError):
    """An error whose class takes other arguments than the message it keeps: it pickles, and pickle cannot rebuild it."""

    def __init__(self, what: str, why: str):
        super().__init__(f"{what}: {why}")


def test_an_error_the_front_end_cannot_rebuild_fails_only_its_call(engine, monkeypatch):
    """The front end's reader stopped on an error reply it could not unpickle: every call and request of that front end
    failed and it exited (under serve, taking the server down). Now that call alone fails, naming the error."""
    real = engine.scheduler.submit

    def failing(request):
        if not isinstance(request, p.CheckInvariantsRequest):
            return real(request)
        fut = Future()
        fut.set_exception(TwoArgumentError("check", "injected"))
        return fut

    monkeypatch.setattr(engine.scheduler, "submit", failing)
    with linked_pipe(engine) as (_, remote):
        with pytest.raises(HotswapError, match="TwoArgumentError: check: injected") as caught:
            remote.check_invariants()
        assert not isinstance(caught.value, EngineUnavailableError)
        assert remote.get_load().success


def test_an_output_that_does_not_pickle_ends_only_its_request(group, engine, monkeypatch):
    """One request's output that does not pickle made the engine service drop the whole step's message: every request
    with an output in that step waited forever. Now that request alone ends (an error naming why, aborted on the engine,
    its KV freed) and the others of the step arrive whole."""
    service = group.fronts[0].service
    real = service._sink

    def poisoning(out: p.GenerateOutput) -> None:
        if out.rid == "poison" and out.new_token_ids and not out.finished:
            out = dataclasses.replace(out, new_top_logprobs=[[(0.0, threading.Lock())]])
        real(out)

    monkeypatch.setattr(service, "_sink", poisoning)
    streams = {rid: {"text": PROMPT, "rid": rid, "stream": True, "return_logprob": True, "top_logprobs_num": 2,
                     "sampling_params": {**LONG, "max_new_tokens": 200, "temperature": 0}} for rid in ("poison", "fine")}
    results: dict = {}
    with only_worker(group, 0):
        threads = [threading.Thread(target=lambda rid=rid, body=body: results.update({rid: send(group.url, "POST", "/generate", json=body, timeout=30)}))
                   for rid, body in streams.items()]
        for t in threads:
            t.start()
        wait_running(engine, 2, until=lambda: len(results) == 2)
    for t in threads:
        t.join(40)
    fine = [json.loads(line[6:]) for line in results["fine"].text.splitlines() if line.startswith("data: {")]
    assert fine[-1]["meta_info"]["completion_tokens"] == 200
    poisoned = [json.loads(line[6:]) for line in results["poison"].text.splitlines() if line.startswith("data: {")]
    reason = poisoned[-1]["meta_info"]["finish_reason"]
    assert reason["type"] == "abort" and "could not be sent to the front end: TypeError" in reason["message"], reason
    clean(engine)


def test_front_end_options_bound_bodies_as_the_app_in_a_thread_does():
    """FrontendOptions left the body size and body time unbounded unless told (0): a front end process started without
    serve's flags (the documented `FrontendOptions(host, port)`, the benches) let a body trickle in forever, where
    create_app bounds both by default."""
    options, defaults = FrontendOptions(host="127.0.0.1", port=1), inspect.signature(create_app).parameters
    assert options.max_body_bytes == defaults["max_body_bytes"].default > 0
    assert options.body_timeout_s == defaults["body_timeout_s"].default > 0


# ---- last: it kills a worker of the module's server ----------------------------------------------------------------------------

def test_a_worker_killed_mid_request_frees_its_requests_and_the_other_serves_on(group, engine):
    """Worker 0 is killed (SIGKILL) while it holds a queued batch (2 prompts x n=2), a stream and a flush waiting for them:
    the engine service sees its pipe close and aborts all of them (their pages come back); worker 1 serves on, the
    killed stream's rid included."""
    body = {"text": ["a", "b"], "sampling_params": {**LONG, "n": 2}}
    stream = {"text": PROMPT, "rid": "killed", "stream": True, "sampling_params": LONG}
    with only_worker(group, 0):
        assert send(group.url, "POST", "/pause_generation", json={"mode": "in_place"}).status_code == 200
        socks = [raw(group, "/generate", json.dumps(body).encode()), raw(group, "/generate", json.dumps(stream).encode()),
                 raw(group, "/flush_cache?timeout=30", b"")]
        wait_running(engine, 5)
        os.kill(group.fronts[0].process.pid, signal.SIGKILL)
    try:
        group.fronts[0].process.join(10)
        assert group.fronts[0].process.exitcode == -signal.SIGKILL
        assert group.fronts[0].service.closed.wait(10)
        assert send(group.url, "POST", "/continue_generation", json={}).status_code == 200
        clean(engine)
        r = send(group.url, "POST", "/generate", json={**stream, "stream": False, "sampling_params": GREEDY}, timeout=20)
        assert r.status_code == 200 and r.json()["meta_info"]["id"] == "killed", r.text
        assert send(group.url, "GET", "/get_load").json()[0]["num_reqs"] == 0
    finally:
        for s in socks:
            s.close()
