"""Parity of the two ways the app is served: in a thread of the engine's own process (ServerThread, as most HTTP tests
drive it) and from two front end processes on one socket over a pipe to the engine (`hotswap serve`'s default, as
frameworks and hostile clients drive it). The same tiny checkpoint behind each; the same requests to each; status,
headers and JSON (shapes everywhere, values where they are deterministic) must agree. State a request changes
(weight version, model path, pause) must read the same from either front end process: a request is steered to one
worker by stopping the other (SIGSTOP) while it is sent on a fresh connection."""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from engine_support import make_engine
from frontend_support import launched, only_worker
from frontend_support import send as send_once

from hotswap.server.access import AccessPolicy
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

KEY, ADMIN = "user-key", "admin-key"
MAX_BODY = 64 << 10
KEYS = {"Authorization": f"Bearer {KEY}", "x-api-key": ADMIN}  # passes every route: the API key, and the admin key on admin routes
GREEDY = {"max_new_tokens": 6, "temperature": 0.0, "ignore_eos": True}
SAMPLED = {"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True, "seed": 5}
# what differs between any two calls (ids, clocks) or between two servers (their ports)
VOLATILE = {"id", "created", "e2e_latency", "ts_tic", "port", "host", "created_at", "response_id", "queue_time", "first_token_latency", "elapsed_s"}
DELTAS = VOLATILE | {"delta_output_ids", "delta_weight_versions", "delta_text"}


@pytest.fixture(scope="module")
def pair(tiny_qwen3):
    """(in-thread server url, front-end-processes group): each on its own engine of the same checkpoint, served as
    `hotswap serve` sets them up (host policy, keys, body limit)."""
    options = {"api_key": KEY, "admin_api_key": ADMIN, "policy": AccessPolicy(allowed_hosts=("127.0.0.1",)), "max_body_bytes": MAX_BODY}
    local_engine, remote_engine = make_engine(tiny_qwen3), make_engine(tiny_qwen3)
    try:
        with ServerThread(create_app(local_engine, **options)) as local, launched(remote_engine, **options) as group:
            yield local.url, group
    finally:
        local_engine.shutdown()
        remote_engine.shutdown()


def send(url: str, method: str, path: str, headers: dict | None = None, timeout: float = 30, **kw) -> httpx.Response:
    """One request on a fresh connection, with keys that pass every route."""
    return send_once(url, method, path, headers={**KEYS, **(headers or {})}, timeout=timeout, **kw)


def both(pair, method: str, path: str, worker: int | None = None, **kw) -> tuple[httpx.Response, httpx.Response]:
    local, group = pair
    a = send(local, method, path, **kw)
    with only_worker(group, worker) if worker is not None else contextlib.nullcontext():
        b = send(group.url, method, path, **kw)
    return a, b


def stripped(value, volatile=VOLATILE):
    """`value` without its volatile keys, tuples as lists (as JSON carries them)."""
    if isinstance(value, dict):
        return {k: stripped(v, volatile) for k, v in value.items() if k not in volatile}
    if isinstance(value, (list, tuple)):
        return [stripped(v, volatile) for v in value]
    return value


def shape(value):
    """Keys and types only."""
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, list):
        return [shape(v) for v in value[:1]]
    return type(value).__name__


def body_of(r: httpx.Response):
    if not r.content:
        return ""
    if r.headers.get("content-type", "").startswith("application/json"):
        return r.json()
    if r.headers.get("content-type", "").startswith("text/event-stream"):
        return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in r.text.splitlines() if line.startswith("data: ")]
    return r.text


def assert_same(a: httpx.Response, b: httpx.Response, *, values: bool = True, volatile=VOLATILE) -> None:
    """Same status, headers and body (values, or only keys and types)."""
    where = f"{a.request.method} {a.request.url.path}"
    assert a.status_code == b.status_code, (where, a.text, b.text)
    ha = {k: v for k, v in a.headers.items() if k not in ("date", "content-length")}
    hb = {k: v for k, v in b.headers.items() if k not in ("date", "content-length")}
    assert ha == hb, (where, ha, hb)
    x, y = stripped(body_of(a), volatile), stripped(body_of(b), volatile)
    assert shape(x) == shape(y), (where, x, y)
    if values:
        assert x == y, where


def streamed(r: httpx.Response) -> tuple[list[int], str, dict]:
    """A /generate stream's tokens and text put together (incremental or cumulative) and its last chunk."""
    events = [e for e in body_of(r) if e != "[DONE]"]
    return events[-1]["output_ids"], events[-1]["text"], events[-1]


# ---- generation ------------------------------------------------------------------------------------------------------------

GENERATE_CASES = {
    "greedy": {"text": "Alice likes", "sampling_params": GREEDY},
    "sampled_seed": {"text": "Alice likes", "sampling_params": SAMPLED},
    "logprobs_topk_text": {"text": "Alice likes", "sampling_params": GREEDY, "return_logprob": True, "top_logprobs_num": 3,
                           "return_text_in_logprobs": True, "logprob_start_len": 0},
    "batch": {"text": ["Alice likes", "Bob"], "sampling_params": GREEDY, "return_logprob": [True, False]},
    "n2": {"input_ids": [1, 2, 3], "sampling_params": {**SAMPLED, "n": 2}},
    "rid": {"text": "Bob", "sampling_params": GREEDY, "rid": "parity-rid"},
}


@pytest.mark.parametrize("case", GENERATE_CASES)
def test_generate(pair, case):
    assert_same(*both(pair, "POST", "/generate", json=GENERATE_CASES[case]))


@pytest.mark.parametrize("interval", [None, 3])
def test_generate_stream(pair, interval):
    params = GREEDY if interval is None else {**GREEDY, "stream_interval": interval}
    body = {"text": ["Alice likes", "Bob"], "sampling_params": params, "stream": True, "return_logprob": True}
    a, b = both(pair, "POST", "/generate", json=body)
    assert a.status_code == b.status_code == 200 and a.headers["content-type"] == b.headers["content-type"]
    ea, eb = body_of(a), body_of(b)
    assert ea[-1] == eb[-1] == "[DONE]"
    for index in (0, 1):
        last = [[e for e in events[:-1] if e["index"] == index][-1] for events in (ea, eb)]
        # a busy front end coalesces a stream's tokens into fewer chunks: each chunk's deltas are timing, the totals are not
        assert stripped(last[0], DELTAS) == stripped(last[1], DELTAS)


OPENAI_CASES = {
    "completion": ("/v1/completions", {"model": "m", "prompt": "Alice likes", "max_tokens": 5, "temperature": 0, "logprobs": 2, "n": 1}),
    "completion_n2": ("/v1/completions", {"model": "m", "prompt": ["Alice", "Bob"], "max_tokens": 4, "temperature": 1, "seed": 3, "n": 2}),
    "chat": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0,
                                      "logprobs": True, "top_logprobs": 2}),
    "chat_n2": ("/v1/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2, "seed": 9}),
}


@pytest.mark.parametrize("case", OPENAI_CASES)
@pytest.mark.parametrize("stream", [False, True])
def test_openai(pair, case, stream):
    path, body = OPENAI_CASES[case]
    body = {**body, "stream": stream, **({"stream_options": {"include_usage": True}} if stream else {})}
    a, b = both(pair, "POST", path, json=body)
    if not stream:
        assert_same(a, b)
        return
    assert a.status_code == b.status_code == 200 and a.headers["content-type"] == b.headers["content-type"]
    ea, eb = body_of(a), body_of(b)
    assert [e for e in ea if e == "[DONE]"] == [e for e in eb if e == "[DONE]"] == ["[DONE]"]
    assert stripped(ea[-2]) == stripped(eb[-2])  # the usage chunk

    def text(events) -> dict:
        got: dict = {}
        for e in events:
            for c in e.get("choices", []) if isinstance(e, dict) else []:
                piece = c.get("text") if "text" in c else (c.get("delta") or {}).get("content")
                got[c["index"]] = got.get(c["index"], "") + (piece or "")
        return got

    assert text(ea) == text(eb)


# ---- refusals ---------------------------------------------------------------------------------------------------------------

REFUSALS = {
    "bad_value": ("POST", "/generate", {"json": {"text": "a", "sampling_params": {"max_new_tokens": -1}}}),
    "bad_temperature": ("POST", "/generate", {"json": {"text": "a", "sampling_params": {"temperature": "hot"}}}),
    "unserved_generate": ("POST", "/generate", {"json": {"text": "a", "return_hidden_states": True}}),
    "unserved_openai": ("POST", "/v1/completions", {"json": {"model": "m", "prompt": "a", "stop_regex": "x"}}),
    "no_prompt": ("POST", "/generate", {"json": {"sampling_params": GREEDY}}),
    "invalid_json": ("POST", "/generate", {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
    "oversize": ("POST", "/generate", {"json": {"text": "a" * (MAX_BODY + 10)}}),
    "bad_chat_role": ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": [{"role": "robot", "content": "x"}]}}),
    "bad_n": ("POST", "/v1/completions", {"json": {"model": "m", "prompt": "a", "n": 0}}),
    "long_prompt": ("POST", "/generate", {"json": {"input_ids": list(range(5000)), "sampling_params": GREEDY}}),
    "bad_token_id": ("POST", "/generate", {"json": {"input_ids": [10**9], "sampling_params": GREEDY}}),
    "no_route": ("GET", "/no/such/route", {}),
    "wrong_method": ("GET", "/generate", {}),
    "flush_bad_timeout": ("POST", "/flush_cache?timeout=-1", {}),
    "abort_bad_body": ("POST", "/abort_request", {"content": b"[1]", "headers": {"Content-Type": "application/json"}}),
    "disk_bad_path": ("POST", "/update_weights_from_disk", {"json": {"model_path": "/definitely/missing"}}),
    "weights_by_bad_name": ("GET", "/get_weights_by_name?name=no.such.weight", {}),
    "release_bad_tag": ("POST", "/release_memory_occupation", {"json": {"tags": ["nope"]}}),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals(pair, case):
    method, path, kw = REFUSALS[case]
    a, b = both(pair, method, path, **kw)
    assert a.status_code >= 400
    assert_same(a, b)


# ---- access: keys, cross-site, Host ------------------------------------------------------------------------------------------

ACCESS = {
    "no_key_generate": ("POST", "/generate", {"Authorization": "", "x-api-key": ""}),
    "user_key_on_admin_route": ("POST", "/flush_cache", {"x-api-key": ""}),
    "admin_key_on_user_route": ("GET", "/get_model_info", {"Authorization": f"Bearer {ADMIN}", "x-api-key": ""}),
    "probe_without_key": ("GET", "/health", {"Authorization": "", "x-api-key": ""}),
    "metrics_without_key": ("GET", "/metrics", {"Authorization": "", "x-api-key": ""}),
    "cross_origin": ("POST", "/flush_cache", {"Origin": "https://evil.example"}),
    "origin_null": ("POST", "/flush_cache", {"Origin": "null"}),
    "cross_site_get": ("GET", "/get_weights_by_name?name=model.norm.weight", {"Sec-Fetch-Site": "cross-site"}),
    "form_post": ("POST", "/generate", {"Content-Type": "application/x-www-form-urlencoded"}),
    "text_post": ("POST", "/update_weight_version", {"Content-Type": "text/plain"}),
    "foreign_host": ("GET", "/get_weight_version", {"Host": "attacker.example"}),
    "foreign_host_probe": ("GET", "/health", {"Host": "lb.example"}),
    "localhost_host": ("GET", "/get_weight_version", {"Host": "localhost"}),
    "preflight": ("OPTIONS", "/generate", {"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"}),
    "head_health": ("HEAD", "/health", {}),
}


@pytest.mark.parametrize("case", ACCESS)
def test_access(pair, case):
    method, path, headers = ACCESS[case]
    kw = {"content": b'{"text": "a"}'} if method == "POST" else {}
    assert_same(*both(pair, method, path, headers=headers, **kw), values=case not in ("probe_without_key", "metrics_without_key"))


# ---- status routes -----------------------------------------------------------------------------------------------------------

STATUS = ["/health", "/health_generate", "/get_model_info", "/model_info", "/get_weight_version", "/weight_version", "/v1/models",
          "/get_ipc_token", "/is_paused", "/get_world_size"]


@pytest.mark.parametrize("path", STATUS)
def test_status_routes(pair, path):
    volatile = VOLATILE | {"ipc_token", "shm_prefix"}
    assert_same(*both(pair, "GET", path), volatile=volatile)  # the ipc token is each engine's own


def test_server_info_and_load(pair):
    """Same keys and types; the values that are the engine's settings agree."""
    for path in ("/get_server_info", "/server_info", "/get_load", "/v1/loads"):
        a, b = both(pair, "GET", path)
        assert_same(a, b, values=False)
    a, b = both(pair, "GET", "/get_server_info")
    x, y = a.json(), b.json()
    differ = {k for k in x if x[k] != y.get(k)} - {"port", "host", "internal_states", "ipc_token"}
    assert differ == set(), {k: (x[k], y.get(k)) for k in differ}


def test_metrics_lines(pair):
    a, b = both(pair, "GET", "/metrics")
    assert a.status_code == b.status_code == 200 and a.headers["content-type"] == b.headers["content-type"]
    names = [{line.split("{")[0].split(" ")[0] for line in r.text.splitlines() if line and not line.startswith("#")} for r in (a, b)]
    assert names[0] == names[1]


@pytest.mark.parametrize("path, body", [("/tokenize", {"prompt": "Alice likes"}), ("/detokenize", {"tokens": [1, 2, 3]}),
                                        ("/v1/tokenize", {"prompt": "Alice likes"})])
def test_tokenizer_routes(pair, path, body):
    assert_same(*both(pair, "POST", path, json=body))


def test_control_routes(pair):
    for method, path, kw in (("POST", "/flush_cache", {}), ("GET", "/flush_cache", {}), ("POST", "/flush_cache?timeout=0.5", {}),
                             ("POST", "/abort_request", {"json": {"rid": "nobody"}}), ("POST", "/abort_request", {"json": {"abort_all": True}}),
                             ("GET", "/get_weights_by_name?name=model.norm.weight&truncate_size=3", {})):
        assert_same(*both(pair, method, path, **kw))


# ---- state shared by both workers --------------------------------------------------------------------------------------------


def test_state_reads_the_same_from_either_worker(pair, tiny_qwen3_v2):
    """Each change through one worker, then the reads through the other (and the in-thread server after the same change)."""
    for change, reads in (
        (("POST", "/update_weight_version", {"json": {"new_version": "v7"}}), ["/get_weight_version", "/get_model_info"]),
        (("POST", "/pause_generation", {"json": {"mode": "retract"}}), ["/is_paused", "/get_load", "/health_generate"]),
        (("POST", "/continue_generation", {"json": {}}), ["/is_paused"]),
        (("POST", "/release_memory_occupation", {"json": {}}), ["/is_sleeping", "/health_generate", "POST /generate"]),
        (("POST", "/resume_memory_occupation", {"json": {}}), ["/is_sleeping"]),
        (("POST", "/update_weights_from_disk", {"json": {"model_path": str(tiny_qwen3_v2), "weight_version": "v8"}}),
         ["/get_weight_version", "/get_model_info", "/v1/models", "/get_server_info"]),
    ):
        method, path, kw = change
        for worker in (0, 1):
            a, b = both(pair, method, path, worker=worker, **kw)
            assert_same(a, b)
            for read in reads:
                if read == "POST /generate":  # refused while memory is released, as the in-thread server refuses it
                    assert_same(*both(pair, "POST", "/generate", worker=1 - worker, json=GENERATE_CASES["greedy"]))
                    continue
                x, y = both(pair, "GET", read, worker=1 - worker)
                if read == "/health_generate":
                    assert_same(x, y)
                    continue
                assert x.status_code == y.status_code == 200, (read, y.text)
                assert_same(x, y, values=read in ("/get_weight_version", "/is_paused", "/is_sleeping"))
                if read in ("/get_model_info", "/get_server_info"):
                    assert y.json()["weight_version"] == x.json()["weight_version"]
                    assert (y.json()["model_path"] == str(tiny_qwen3_v2)) == (x.json()["model_path"] == str(tiny_qwen3_v2)), read
                if read == "/v1/models":
                    assert (y.json()["data"][0]["id"] == str(tiny_qwen3_v2)) == (x.json()["data"][0]["id"] == str(tiny_qwen3_v2))


def test_greedy_after_the_update_agrees(pair):
    assert_same(*both(pair, "POST", "/generate", json=GENERATE_CASES["greedy"]))


@contextlib.contextmanager
def held_by_worker0(url: str, on: Callable[[int], contextlib.AbstractContextManager], rid: str):
    """Pause (in place) and admit a request `rid` through worker 0; yields (its body, its reply holder: "r" once it
    ends). On leaving, through worker 1, abort it and continue, then wait for its reply (through worker 0)."""
    body = {"text": "Alice", "sampling_params": {**GREEDY, "max_new_tokens": 50}, "rid": rid}
    result: dict = {}
    with on(0):
        assert send(url, "POST", "/pause_generation", json={"mode": "in_place"}).status_code == 200
        client = httpx.Client(base_url=url, timeout=60, headers=KEYS)
        t = threading.Thread(target=lambda: result.update(r=client.post("/generate", json=body)))
        t.start()
        deadline = time.monotonic() + 20
        while send(url, "GET", "/get_load").json()[0]["num_reqs"] == 0:
            assert time.monotonic() < deadline
            time.sleep(0.02)
    try:
        yield body, result
    finally:
        with on(1):
            send(url, "POST", "/abort_request", json={"rid": rid})
            send(url, "POST", "/continue_generation", json={})
        t.join(30)
        client.close()


def abort_elsewhere(url: str, on: Callable[[int], contextlib.AbstractContextManager]) -> tuple[dict, dict]:
    """A request held by worker 0; through worker 1 read the load and abort it by rid: (the load read while it waited,
    its reply)."""
    with held_by_worker0(url, on, "held-one") as (_, result), on(1):
        load = send(url, "GET", "/get_load").json()[0]
        assert send(url, "POST", "/abort_request", json={"rid": "held-one"}).status_code == 200
    return load, result["r"]


def test_abort_of_a_request_another_worker_admitted(pair):
    """A request admitted by worker 0 counts in worker 1's /get_load and is aborted through worker 1 by its rid, as
    the in-thread server does it."""
    local, group = pair
    load_a, a = abort_elsewhere(local, lambda i: contextlib.nullcontext())
    load_b, b = abort_elsewhere(group.url, lambda i: only_worker(group, i))
    assert_same(a, b)
    assert a.json()["meta_info"]["finish_reason"]["type"] == "abort"
    keys = ("num_reqs", "num_waiting_reqs", "num_running", "num_waiting", "paused")
    assert {k: load_a.get(k) for k in keys} == {k: load_b.get(k) for k in keys}


def duplicate_elsewhere(url: str, on: Callable[[int], contextlib.AbstractContextManager]) -> tuple[httpx.Response, httpx.Response]:
    """A request "dup" held by worker 0; send rid "dup" again through worker 1 (the same prompt, streamed and not): (the
    second call's replies)."""
    with held_by_worker0(url, on, "dup") as (body, result):
        with on(1):
            # a bound on the wait, not a timing: a duplicate taken as a new request would wait for the pause to end
            again = send(url, "POST", "/generate", json=body, timeout=10)
            again_stream = send(url, "POST", "/generate", json={**body, "stream": True}, timeout=10)
            load = send(url, "GET", "/get_load").json()[0]
    assert load["num_reqs"] == 1  # the duplicate did not queue beside the first
    assert result["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
    return again, again_stream


def test_a_rid_running_on_one_worker_is_a_duplicate_on_the_other(pair):
    """SGLang refuses a rid that is already running (400, naming it); a rid admitted by worker 0 is running for worker 1
    too, as it is for the one app in a thread."""
    local, group = pair
    a = duplicate_elsewhere(local, lambda i: contextlib.nullcontext())
    b = duplicate_elsewhere(group.url, lambda i: only_worker(group, i))
    for x, y in zip(a, b):
        assert_same(x, y)
    assert a[0].status_code == 400 and "duplicate request id" in a[0].json()["error"]["message"]


def wait_reqs(url: str, count: int) -> dict:
    deadline = time.monotonic() + 20
    while (load := send(url, "GET", "/get_load").json()[0])["num_reqs"] != count:
        assert time.monotonic() < deadline, (url, load)
        time.sleep(0.02)
    return load


def leave_a_stream(url: str, on: Callable[[int], contextlib.AbstractContextManager]) -> tuple[int, str]:
    """Pause (in place), open a stream through worker 0 and hang up once its response has started; through worker 1
    too the request is gone from the load, and the same rid runs again (status of that, its finish reason)."""
    body = {"text": "Alice", "sampling_params": {**GREEDY, "max_new_tokens": 4}, "rid": "left", "stream": True}
    with on(0):
        assert send(url, "POST", "/pause_generation", json={"mode": "in_place"}).status_code == 200
        with httpx.Client(base_url=url, timeout=30, headers=KEYS) as c, c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
        wait_reqs(url, 0)  # worker 0 saw the hang-up and aborted it (worker 0 runs meanwhile: it is the one to notice)
    with on(1):
        assert wait_reqs(url, 0)["num_waiting"] == 0
        assert send(url, "POST", "/continue_generation", json={}).status_code == 200
        again = send(url, "POST", "/generate", json={**body, "stream": False})
    return again.status_code, again.json()["meta_info"]["finish_reason"]["type"]


def test_a_client_that_hangs_up_frees_its_request_for_every_worker(pair):
    local, group = pair
    assert leave_a_stream(local, lambda i: contextlib.nullcontext()) == leave_a_stream(group.url, lambda i: only_worker(group, i)) == (200, "length")
