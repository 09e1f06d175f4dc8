"""A draining server (first SIGTERM) still answers: new requests and /health get 503 while a running stream
finishes; a second signal ends the stream (abort) and stops the server at once."""

import json
import signal
import threading
import time

import httpx
import uvicorn

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.frontend_process import make_draining_server
from hotswap.server.launch import bind_socket


def test_draining_server_answers_503_then_a_second_signal_stops_it(tiny_qwen3, monkeypatch):
    monkeypatch.setenv("SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN", "1")  # a context far past the model's
    engine = Engine(str(tiny_qwen3), device="cpu", page_size=4, max_context_len=200_000)
    sock = bind_socket("127.0.0.1", 0)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    app = create_app(engine)
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=60)
    server = make_draining_server(config, app.state.hotswap, drain_timeout=60.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    lines: list[str] = []

    def stream():
        body = {"input_ids": [1, 2, 3], "stream": True, "sampling_params": {"max_new_tokens": 100_000, "ignore_eos": True}}
        with httpx.stream("POST", url + "/generate", json=body, timeout=30) as r:
            lines.extend(x for x in r.iter_lines() if x)

    try:
        while not server.started:
            time.sleep(0.01)
        client = threading.Thread(target=stream, daemon=True)
        client.start()
        while engine.get_load().num_running < 1:
            time.sleep(0.02)
        server.handle_exit(signal.SIGTERM, None)  # what uvicorn's handler calls on the first SIGTERM
        time.sleep(0.5)
        assert httpx.get(url + "/health", timeout=5).status_code == 503
        late = httpx.post(url + "/generate", json={"input_ids": [1], "sampling_params": {"max_new_tokens": 1}}, timeout=5)
        assert late.status_code == 503 and "shutting down" in late.text
        assert client.is_alive()  # the running stream goes on while the server drains
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)  # a second signal: now
        thread.join(10)
        client.join(10)
        assert not thread.is_alive() and time.monotonic() - t0 < 10
        assert lines[-1] == "data: [DONE]"
        assert json.loads(lines[-2][len("data: "):])["meta_info"]["finish_reason"]["type"] == "abort"
    finally:
        server.should_exit = server.force_exit = True
        thread.join(10)
        sock.close()
        engine.shutdown()


def test_a_drain_ends_by_itself_once_running_requests_finish(tiny_qwen3):
    engine = Engine(str(tiny_qwen3), device="cpu", page_size=4)
    sock = bind_socket("127.0.0.1", 0)
    app = create_app(engine)
    server = make_draining_server(uvicorn.Config(app, log_level="warning", lifespan="off"), app.state.hotswap, drain_timeout=60.0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.01)
        t0 = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)  # nothing runs: the server stops well before the drain timeout
        thread.join(10)
        assert not thread.is_alive() and time.monotonic() - t0 < 5
    finally:
        server.should_exit = server.force_exit = True
        thread.join(10)
        sock.close()
        engine.shutdown()
