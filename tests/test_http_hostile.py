"""A hostile client against the transport and the door, beyond what the body fuzz (test_http_fuzz.py) sends:
connections that never finish their request head or never read their reply, cross-site form posts with an
empty body, request fields that cost every other client (logit_bias, stop strings, rids, version names), and
engine errors crossing the front end process's pipe."""

from __future__ import annotations

import json
import socket
import time

import pytest
from engine_support import make_engine, wait_idle

from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT = "Alice likes 12 apples"
HEAD_TIMEOUT_S = 0.5
SEND_TIMEOUT_S = 0.5


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3, num_pages=96) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, served_model_name="tiny"), header_timeout_s=HEAD_TIMEOUT_S, send_timeout_s=SEND_TIMEOUT_S) as srv:
        yield srv


def _read_until_closed(sock: socket.socket, limit_s: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or `limit_s` passes), and when it closed."""
    start = time.monotonic()
    sock.settimeout(limit_s)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        data += b"<still open>"
    return data, time.monotonic() - start


def test_a_connection_that_never_finishes_its_request_head_is_closed(server, engine):
    """uvicorn bounds only a connection idle after a reply (and any byte resets that): a client that connected and
    sent nothing, or trickled a request head, held its connection and a descriptor forever (slowloris)."""
    silent = socket.create_connection((server.host, server.port))
    trickling = socket.create_connection((server.host, server.port))
    try:
        trickling.sendall(b"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        for _ in range(3):  # a header line now and then: each arrives before any per-read timeout would fire
            time.sleep(HEAD_TIMEOUT_S / 4)
            trickling.sendall(b"X-Slow: 1\r\n")
        got, took = _read_until_closed(trickling, 5)
        assert got.startswith(b"HTTP/1.1 408") and b"request head not received" in got, got[:300]
        assert took < HEAD_TIMEOUT_S + 3
        got, _ = _read_until_closed(silent, 5)
        assert got == b"", got[:300]  # nothing was asked: closed without a reply
    finally:
        silent.close()
        trickling.close()

    # a client that keeps its connection busy is never cut: a reply that takes longer than the head bound, then
    # another request on the same connection after a pause shorter than it
    body = json.dumps({"text": PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 0}}).encode()
    head = (f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    engine.pause_generation(mode="in_place")
    sock = socket.create_connection((server.host, server.port), timeout=10)
    try:
        sock.sendall(head + body)
        time.sleep(HEAD_TIMEOUT_S * 2)  # the request waits in the engine past the head bound
        engine.continue_generation()
        for i in range(2):
            reply = b""
            while b'"e2e_latency"' not in reply:
                chunk = sock.recv(65536)
                assert chunk, f"reply {i}: the server closed a busy connection"
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200"), reply[:300]
            time.sleep(HEAD_TIMEOUT_S / 2)
            sock.sendall(head + body)
    finally:
        sock.close()
        engine.continue_generation()
    wait_idle(engine)


@pytest.mark.parametrize("ctype", ["application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "text/plain;charset=UTF-8"])
def test_an_empty_form_post_cannot_pause_or_sleep_the_engine(server, engine, ctype):
    """A fieldless <form method=post action=".../pause_generation?mode=abort"> sends its content type with an empty
    body: the JSON check looked only at requests with a body, and the route read its query string, so a page in a
    browser that sends no Origin paused generation."""
    import httpx

    for path in ("/pause_generation?mode=abort", "/pause?mode=abort", "/sleep?level=1"):
        reply = httpx.post(server.url + path, content=b"", headers={"Content-Type": ctype}, timeout=30)
        assert reply.status_code == 415 and "application/json" in reply.json()["error"]["message"], (path, reply.text)
    load = engine.get_load()
    assert not load.paused and not load.memory_released, load
    # a client that sends no content type (requests.post(url), httpx.post(url)) still may
    reply = httpx.post(server.url + "/pause_generation?mode=abort", timeout=30)
    assert reply.status_code == 200 and engine.get_load().paused
    assert engine.continue_generation().success


def test_logit_bias_is_bounded(server, engine):
    """Every step writes each logit_bias entry into each of the request's rows, converted on the scheduler thread: a
    whole-vocabulary bias (150k entries, a 3 MB body) cost ~60 ms a step per row, and n=256 rows of it stalled every
    client's step for seconds. The limit is named; at the limit the request runs."""
    import httpx

    from hotswap.sampling_params import MAX_LOGIT_BIAS

    many = {str(i): -1.0 for i in range(MAX_LOGIT_BIAS + 1)}
    for path, body in (("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 2, "logit_bias": many}}),
                       ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "logit_bias": many})):
        reply = httpx.post(server.url + path, json=body, timeout=30)
        assert reply.status_code == 400, reply.text[:300]
        assert f"logit_bias takes at most {MAX_LOGIT_BIAS} entries" in reply.json()["error"]["message"]
    vocab = engine.model_config.vocab_size
    full = {str(i): 0.5 for i in range(min(vocab, MAX_LOGIT_BIAS))}  # biases every id alike: greedy output unchanged
    sp = {"max_new_tokens": 4, "temperature": 0, "ignore_eos": True}
    plain = httpx.post(server.url + "/generate", json={"text": PROMPT, "sampling_params": sp}, timeout=30).json()
    biased = httpx.post(server.url + "/generate", json={"text": PROMPT, "sampling_params": {**sp, "logit_bias": full}}, timeout=30)
    assert biased.status_code == 200 and biased.json()["output_ids"] == plain["output_ids"]
    wait_idle(engine)


def test_stop_strings_are_bounded_in_total_length(server, engine):
    """After every token each stop string is searched for in the text's last len(stop) characters, on the scheduler
    thread: 1024 stop strings of 28k characters (a 29 MB body) made every other client's steps ~7x slower on the
    tiny model, and grow with the text. Their total length is bounded and named; at the bound the request runs."""
    import httpx

    from hotswap.sampling_params import MAX_STOP_CHARS

    sp = {"max_new_tokens": 3, "temperature": 0, "ignore_eos": True}
    over = ["q" * (MAX_STOP_CHARS // 4)] * 4 + ["z"]
    reply = httpx.post(server.url + "/generate", json={"text": PROMPT, "sampling_params": {**sp, "stop": over}}, timeout=30)
    assert reply.status_code == 400 and f"at most {MAX_STOP_CHARS} characters" in reply.json()["error"]["message"], reply.text[:300]
    reply = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "stop": over[:4] + ["z"]}, timeout=30)
    assert reply.status_code == 400 and "stop" in reply.json()["error"]["message"], reply.text[:300]
    reply = httpx.post(server.url + "/generate", json={"text": PROMPT, "sampling_params": {**sp, "stop": over[:4]}}, timeout=30)
    assert reply.status_code == 200 and reply.json()["meta_info"]["completion_tokens"] == 3
    wait_idle(engine)


def test_every_engine_error_crosses_the_front_end_pipe():
    """The front end process unpickles the engine's refusals; an error class whose __init__ takes more than its
    message did not unpickle (pickle rebuilds exceptions from args), and a reply that fails to unpickle stops the
    front end's reader: every request then fails and the front end exits."""
    import inspect
    import pickle

    from hotswap import errors

    classes = [c for c in vars(errors).values() if inspect.isclass(c) and issubclass(c, Exception) and c.__module__ == errors.__name__]
    assert errors.ConstrainedDecodingError in classes and errors.BatchRowError in classes
    for cls in classes:
        exc = cls("field", "refused") if "__init__" in vars(cls) else cls(f"{cls.__name__} refused")  # (what it names, message)
        back = pickle.loads(pickle.dumps(exc))
        assert type(back) is cls and str(back) == str(exc) and vars(back) == vars(exc), cls


def test_a_client_that_stops_reading_is_disconnected(server, engine):
    """A reply waits on flow control while the client reads nothing, and uvicorn bounds that wait nowhere: a client
    that opened a stream and never read held the connection and everything queued for it forever."""
    connections = server.server.server_state.connections  # uvicorn's open connections
    # each chunk repeats the output so far with its top logprobs: megabytes in all, more than the socket buffers hold
    body = json.dumps({"text": PROMPT, "stream": True, "return_logprob": True, "top_logprobs_num": 20,
                       "sampling_params": {"max_new_tokens": 480, "temperature": 0, "ignore_eos": True}}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect((server.host, server.port))
    try:
        sock.sendall(f"POST /generate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
                     .encode() + body)
        deadline = time.monotonic() + 30
        while not connections:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        while connections:  # the server gives up on the reader, whatever it still had to send
            assert time.monotonic() < deadline, "a client that reads nothing was never disconnected"
            time.sleep(0.05)
        got = b""
        sock.settimeout(10)
        try:
            while chunk := sock.recv(1 << 20):
                got += chunk
        except ConnectionResetError:
            pass
    finally:
        sock.close()
    assert got.startswith(b"HTTP/1.1 200") and not got.endswith(b"data: [DONE]\n\n")  # cut off, not finished
    wait_idle(engine)
    assert engine.check_invariants().success


def test_a_weight_version_name_is_bounded(server, engine, tiny_qwen3):
    """A version name rides on every output token and every streamed chunk (and every step's message to a front end
    process): a 30 MB name, accepted by any route that sets a version, made every client's replies megabytes per
    token. Each route refuses it by name before anything changes."""
    import httpx

    from hotswap.weights.session import MAX_VERSION_CHARS

    long = "v" * (MAX_VERSION_CHARS + 1)
    digest, version = engine.check_weights("checksum").digest, engine.weight_version
    reply = httpx.post(server.url + "/update_weight_version", json={"new_version": long}, timeout=30)
    assert reply.status_code == 400 and f"new_version has {len(long)} characters" in reply.json()["message"], reply.text[:300]
    reply = httpx.post(server.url + "/update_weights_from_disk", json={"model_path": str(tiny_qwen3), "weight_version": long}, timeout=30)
    assert reply.status_code == 400 and "weight_version has" in reply.json()["message"], reply.text[:300]
    assert engine.weight_version == version and engine.check_weights("checksum").digest == digest
    session = engine.begin_weight_update().session_id
    reply = httpx.post(server.url + "/end_weight_update", json={"weight_version": long, "session_id": session}, timeout=30)
    assert reply.status_code == 400 and "the session stays open" in reply.json()["message"], reply.text[:300]
    assert engine.end_weight_update(weight_version="v-ok", session_id=session).success
    assert engine.weight_version == "v-ok"
    assert engine.update_weight_version(version, abort_all_requests=False).success


def test_a_request_id_is_bounded(server, engine):
    """A client's rid rides on each of its outputs every step: the scheduler's message to a front end process, and
    each streamed chunk serialized on the event loop that every other stream (and, in one process, the scheduler's
    interpreter lock) shares. A 30 MB rid cost every client tens of milliseconds per step."""
    import httpx

    from hotswap.engine.request_prep import MAX_RID_CHARS

    sp = {"max_new_tokens": 2, "temperature": 0}
    reply = httpx.post(server.url + "/generate", json={"text": PROMPT, "rid": "r" * (MAX_RID_CHARS + 1), "sampling_params": sp}, timeout=30)
    assert reply.status_code == 400 and f"rid must be at most {MAX_RID_CHARS} characters" in reply.json()["error"]["message"], reply.text[:300]
    reply = httpx.post(server.url + "/generate", json={"text": [PROMPT, PROMPT], "rid": ["a", "b" * (MAX_RID_CHARS + 1)], "sampling_params": sp},
                       timeout=30)
    assert reply.status_code == 400 and "rid must be at most" in reply.json()["error"]["message"], reply.text[:300]
    rid = "r" * MAX_RID_CHARS
    reply = httpx.post(server.url + "/generate", json={"text": PROMPT, "rid": rid, "sampling_params": sp}, timeout=30)
    assert reply.status_code == 200 and reply.json()["meta_info"]["id"] == rid
    wait_idle(engine)
