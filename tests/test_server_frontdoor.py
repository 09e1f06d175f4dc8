"""What the HTTP door refuses, and how: out-of-range values name their field (400) on every path, bodies
over the limit get 413, a client's chat template never runs, generation that cannot run answers 503 with
the reason, and OpenAI replies carry the weight versions of their tokens (streamed chunks included)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from engine_support import wait_idle

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT = "Alice likes 12 apples"
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4, max_queue_wait_s=1.0)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with ServerThread(create_app(engine, served_model_name="tiny", max_body_bytes=64 << 10)) as srv:
        yield srv



def events(response: httpx.Response) -> list[dict]:
    out = []
    for line in response.iter_lines():
        if line.startswith("data: ") and line != "data: [DONE]":
            out.append(json.loads(line[len("data: "):]))
    return out


@pytest.mark.parametrize(("body", "named"), [
    ({"sampling_params": dict(GREEDY, seed=2**63)}, "seed"),
    ({"sampling_params": dict(GREEDY, top_k=2**63)}, "top_k"),
    ({"sampling_params": GREEDY, "top_logprobs_num": 10**6, "return_logprob": True}, "top_logprobs_num"),
    ({"sampling_params": dict(GREEDY, n=50_000)}, "n"),
])
@pytest.mark.parametrize("stream", [False, True])
def test_out_of_range_values_get_400_naming_the_field_and_cost_no_one_else(http, engine, body, named, stream):
    r = http.post("/generate", json={"text": PROMPT, "stream": stream, **body})
    assert r.status_code == 400, r.text
    assert named in r.json()["error"]["message"]
    assert http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}).json()["meta_info"]["completion_tokens"] == 6
    wait_idle(engine)


def test_bodies_over_the_limit_get_413(http, server):
    big = {"text": "x" * (100 << 10), "sampling_params": GREEDY}
    r = http.post("/generate", json=big)
    assert r.status_code == 413 and "body" in r.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit holds on the bytes as they stream in
        payload = json.dumps(big).encode()
        for i in range(0, len(payload), 8192):
            yield payload[i: i + 8192]

    r = httpx.post(server.url + "/v1/completions", content=chunks(), headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}).status_code == 200


def test_a_client_chat_template_is_refused(http):
    evil = "{% for i in range(10**9) %}x{% endfor %}"
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "chat_template_kwargs": {"chat_template": evil}})
    assert r.status_code == 400 and "chat_template" in r.json()["error"]["message"]
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
                                                 "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


def test_generate_while_memory_is_released_answers_503_at_once(http, engine):
    assert http.post("/release_memory_occupation", json={}).status_code == 200
    try:
        start = time.monotonic()
        for path, body in (("/generate", {"text": PROMPT, "sampling_params": GREEDY}),
                           ("/generate", {"text": PROMPT, "sampling_params": GREEDY, "stream": True}),
                           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 3}),
                           ("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, "stream": True})):
            r = http.post(path, json=body)
            assert r.status_code == 503, (path, body, r.text)
            assert "memory is released" in r.json()["error"]["message"]
        assert time.monotonic() - start < 5
    finally:
        assert http.post("/resume_memory_occupation", json={}).status_code == 200
    assert http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}).status_code == 200


def test_generate_while_paused_queues_for_a_bounded_time(http, engine):
    assert http.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        start = time.monotonic()
        r = http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY})
        assert r.status_code == 503 and "max_queue_wait_s" in r.json()["error"]["message"]
        assert 0.9 < time.monotonic() - start < 5
        with http.stream("POST", "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3,
                                                                "stream": True}) as s:
            if s.status_code == 503:  # refused within the server's first-chunk wait: the status says it
                s.read()
                error = s.json()["error"]
            else:  # the stream had started (role chunk): the refusal comes in-band
                got = events(s)
                assert s.status_code == 200 and got[0]["choices"][0]["delta"]["role"] == "assistant"
                error = got[-1]["error"]
        assert "max_queue_wait_s" in error["message"] and error["code"] == 503
    finally:
        assert http.post("/continue_generation").status_code == 200
    wait_idle(engine)


def test_openai_replies_carry_weight_versions(http, engine):
    assert http.post("/update_weight_version", json={"new_version": "v7"}).status_code == 200
    r = http.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "n": 2, "temperature": 0}).json()
    assert r["metadata"]["weight_version"] == "v7"
    assert r["metadata"]["weight_versions"] == [["v7"], ["v7"]]
    for path, body in (("/v1/completions", {"prompt": PROMPT, "max_tokens": 4, "stream": True}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True})):
        with http.stream("POST", path, json=body) as s:
            chunks = [c for c in events(s) if c.get("choices")]
        token_chunks = [c for c in chunks if "metadata" in c]
        assert token_chunks, chunks
        assert all(c["metadata"]["weight_versions"] == [["v7"]] and c["metadata"]["weight_version"] == "v7" for c in token_chunks)
    r = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}).json()
    assert r["metadata"]["weight_versions"] == [["v7"]]


@pytest.mark.parametrize(("path", "body"), [
    ("/generate", lambda text: {"text": text, "sampling_params": GREEDY}),
    ("/v1/chat/completions", lambda text: {"messages": [{"role": "user", "content": text}], "max_tokens": 4}),
])
def test_a_huge_prompt_is_tokenized_while_a_small_stream_keeps_flowing(engine, path, body):
    """Tokenizing (and templating) a 2 MB prompt takes seconds: it runs beside the event loop and the
    scheduler, so a small streaming request sent meanwhile gets every chunk promptly and finishes first."""
    huge = ("Alice likes 12 apples and Bob sees 3 cats. " * 60_000)[: 2 << 20]
    with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=60) as http:
        answered: dict[str, float] = {}

        def send_huge() -> None:
            r = http.post(path, json=body(huge))
            answered["at"] = time.monotonic()
            answered["status"] = r.status_code
            answered["message"] = r.json()["error"]["message"]

        worker = threading.Thread(target=send_huge)
        worker.start()
        time.sleep(0.5)  # the body is in; tokenization is under way
        arrivals, tokens = [], 0
        with http.stream("POST", "/generate", json={"text": PROMPT, "stream": True,
                                                    "sampling_params": {"max_new_tokens": 48, "temperature": 0, "ignore_eos": True}}) as s:
            start = time.monotonic()
            for line in s.iter_lines():
                if line.startswith("data: "):
                    arrivals.append(time.monotonic())
                    if line != "data: [DONE]":
                        tokens += len(json.loads(line[len("data: "):])["delta_output_ids"])
        worker.join(timeout=60)
        assert not worker.is_alive()
    assert "at" in answered and answered["at"] > arrivals[-1], "the huge prompt was done before the stream ended: nothing overlapped"
    assert answered["status"] == 400 and "context" in answered["message"], answered
    assert tokens == 48
    gaps = [b - a for a, b in zip([start, *arrivals], arrivals)]
    assert max(gaps) < 0.5, f"the stream stalled {max(gaps):.2f} s while the huge prompt was tokenized"
    wait_idle(engine)
