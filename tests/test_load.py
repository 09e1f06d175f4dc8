"""A/B load over real loopback HTTP against `hotswap serve` in its own process: concurrent streaming and
non-streaming clients on the native and OpenAI routes, a KV pool small enough to force preemption, and a
weight update from disk every ~0.5 s alternating two checkpoints with different random weights.

Every response must be one policy's greedy output and report that policy's version (per token too);
every request is answered within a bounded time; the server's resident memory stays flat."""

from __future__ import annotations

import itertools
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from engine_support import sse_events
from hf_reference import prompt_ids
from serve_support import free_port, serve_env, wait_healthy

from hotswap import Engine
from hotswap.testing.tiny_models import build_tiny_checkpoint

pytestmark = pytest.mark.timeout(180)

PAGE_SIZE, NUM_PAGES = 4, 40  # 160 tokens: six clients at ~50 tokens each cannot all fit
MAX_NEW = 32
GREEDY = {"max_new_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True}
PROMPTS = [prompt_ids(8000, 12) + prompt_ids(8100 + i, 6) for i in range(8)]  # a shared prefix, as in RL rollouts
CLIENTS = 6
LOAD_S = 12.0
UPDATE_EVERY_S = 0.5
REQUEST_TIMEOUT_S = 60.0  # any single request past this is a hang
RSS_GROWTH_LIMIT = 64 << 20


@dataclass(kw_only=True, slots=True)
class Reference:
    ids: list[list[int]]
    texts: list[str]


@dataclass(kw_only=True, slots=True)
class Answer:
    """What one response said: the policy is judged from its tokens (or text) and its version labels."""

    kind: str
    prompt: int
    ids: list[int] | None
    text: str
    versions: list[str]  # every version label the response carried (per token where it has them)


@dataclass(kw_only=True)
class Run:
    answers: list[Answer] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)  # weight_version -> "A" | "B"
    updates: int = 0
    rss: list[tuple[float, int]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


@pytest.fixture(scope="module")
def policies(tiny_qwen3, tmp_path_factory) -> dict[str, Path]:
    """Two checkpoints of one architecture and tokenizer with independent random weights."""
    return {"A": tiny_qwen3, "B": build_tiny_checkpoint(tmp_path_factory.mktemp("policy_b"), "qwen3", seed=7)}


@pytest.fixture(scope="module")
def references(policies) -> dict[str, Reference]:
    """Each policy's greedy outputs, computed offline by an engine with room to spare."""
    refs = {}
    for name, path in policies.items():
        with Engine(str(path), device="cpu", page_size=PAGE_SIZE) as engine:
            outs = engine.generate(input_ids=PROMPTS, sampling_params=GREEDY)
        refs[name] = Reference(ids=[o["output_ids"] for o in outs], texts=[o["text"] for o in outs])
    for i in range(len(PROMPTS)):  # every response must identify its policy
        assert refs["A"].ids[i] != refs["B"].ids[i] and refs["A"].texts[i] != refs["B"].texts[i]
    return refs


@pytest.fixture(scope="module")
def server(policies, tmp_path_factory):
    """`hotswap serve` on policy A in its own process; yields (url, pid)."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve_log") / "serve.log"
    env = serve_env(OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "hotswap.cli", "serve", "--model-path", str(policies["A"]), "--port", str(port), "--device", "cpu",
           "--page-size", str(PAGE_SIZE), "--num-pages", str(NUM_PAGES), "--served-model-name", "tiny", "--log-level", "warning",
           "--drain-timeout", "1"]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(proc, url, timeout=90, output=log_path.read_text)
        yield url, proc.pid
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)



# ---- one request per route ----------------------------------------------------------------------


def native(client: httpx.Client, i: int) -> Answer:
    r = client.post("/generate", json={"input_ids": PROMPTS[i], "sampling_params": GREEDY})
    assert r.status_code == 200, r.text
    out = r.json()
    meta = out["meta_info"]
    versions = meta.get("weight_versions") or [meta["weight_version"]] * len(out["output_ids"])
    return Answer(kind="native", prompt=i, ids=out["output_ids"], text=out["text"], versions=[*versions, meta["weight_version"]])


def native_stream(client: httpx.Client, i: int) -> Answer:
    with client.stream("POST", "/generate", json={"input_ids": PROMPTS[i], "sampling_params": GREEDY, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r.iter_lines())
    ids = [t for e in events for t in e["delta_output_ids"]]
    per_token = [v for e in events for v in e["delta_weight_versions"]]
    assert len(per_token) == len(ids), "every streamed token carries its weight version"
    assert ids == events[-1]["output_ids"]
    labels = [e["meta_info"]["weight_version"] for e in events]
    return Answer(kind="native_stream", prompt=i, ids=ids, text=events[-1]["text"], versions=per_token + labels)


def completion(client: httpx.Client, i: int) -> Answer:
    r = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPTS[i], "max_tokens": MAX_NEW, "temperature": 0,
                                             "ignore_eos": True})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["choices"][0]["finish_reason"] == "length"
    meta = out["metadata"]
    assert len(meta["weight_versions"]) == 1
    return Answer(kind="openai", prompt=i, ids=None, text=out["choices"][0]["text"],
                  versions=[meta["weight_version"], *meta["weight_versions"][0]])


def completion_stream(client: httpx.Client, i: int) -> Answer:
    body = {"model": "tiny", "prompt": PROMPTS[i], "max_tokens": MAX_NEW, "temperature": 0, "ignore_eos": True, "stream": True}
    with client.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200, r.read()
        events = sse_events(r.iter_lines())
    choices = [c for e in events for c in e["choices"]]
    assert [c["finish_reason"] for c in choices if c["finish_reason"]] == ["length"]
    assert all("metadata" in e for e in events if e["choices"]), "every streamed chunk reports its weight version"
    versions = [v for e in events if e.get("metadata") for v in (e["metadata"]["weight_version"], *e["metadata"]["weight_versions"][0])]
    return Answer(kind="openai_stream", prompt=i, ids=None, text="".join(c["text"] for c in choices), versions=versions)


ROUTES = (native, native_stream, completion, completion_stream)


# ---- the run ------------------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def client_loop(url: str, k: int, stop: threading.Event, run: Run) -> None:
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for n in itertools.count():
            if stop.is_set():
                return
            route, i = ROUTES[(k + n) % len(ROUTES)], (k * 3 + n) % len(PROMPTS)
            try:
                answer = route(client, i)
            except Exception as exc:  # a failed or timed-out request is a lost one
                with run.lock:
                    run.errors.append(f"{route.__name__} prompt {i}: {type(exc).__name__}: {exc}")
                continue
            with run.lock:
                run.answers.append(answer)


def updater_loop(url: str, policies: dict[str, Path], stop: threading.Event, run: Run) -> None:
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        for n in itertools.count(1):
            if stop.wait(UPDATE_EVERY_S):
                return
            policy = "B" if n % 2 else "A"
            version = f"{policy}-{n}"
            with run.lock:
                run.versions[version] = policy  # known before any response can carry it
            try:
                r = client.post("/update_weights_from_disk", json={"model_path": str(policies[policy]), "weight_version": version})
                assert r.status_code == 200 and r.json()["success"], r.text
            except Exception as exc:
                with run.lock:
                    run.errors.append(f"update to {version}: {type(exc).__name__}: {exc}")
                return
            run.updates += 1


def rss_loop(pid: int, stop: threading.Event, run: Run) -> None:
    t0 = time.monotonic()
    while not stop.wait(0.2):
        run.rss.append((time.monotonic() - t0, rss_bytes(pid)))


def test_ab_updates_under_streaming_load_serve_one_policy_per_response(server, policies, references):
    url, pid = server
    run = Run()
    with httpx.Client(base_url=url, timeout=10) as c:
        run.versions[c.get("/get_weight_version").json()["weight_version"]] = "A"
        for route in ROUTES:  # warm every path once before memory is measured
            run.answers.append(route(c, 0))
    stop, rss_stop = threading.Event(), threading.Event()
    threads = [threading.Thread(target=client_loop, args=(url, k, stop, run)) for k in range(CLIENTS)]
    threads.append(threading.Thread(target=updater_loop, args=(url, policies, stop, run)))
    sampler = threading.Thread(target=rss_loop, args=(pid, rss_stop, run))
    for t in [*threads, sampler]:
        t.start()
    time.sleep(LOAD_S)
    stop.set()
    for t in threads:
        t.join(timeout=REQUEST_TIMEOUT_S + 10)
    rss_stop.set()
    sampler.join(timeout=5)
    assert not any(t.is_alive() for t in threads), "a client or the updater hung past its request timeout"

    assert not run.errors, f"{len(run.errors)} request(s) lost, e.g. {run.errors[:5]}"
    assert run.updates >= 5, f"only {run.updates} updates ran"
    served = {"A": 0, "B": 0}
    for a in run.answers:
        unknown = set(a.versions) - set(run.versions)
        assert not unknown, f"{a.kind} prompt {a.prompt} reports unknown versions {unknown}"
        policies_seen = {run.versions[v] for v in a.versions}
        assert len(set(a.versions)) == 1, f"{a.kind} prompt {a.prompt} reports several versions {sorted(set(a.versions))}"
        policy = policies_seen.pop()
        ref = references[policy]
        if a.ids is not None:
            assert a.ids == ref.ids[a.prompt], f"{a.kind} prompt {a.prompt} labelled {a.versions[0]} is not {policy}'s greedy output"
        assert a.text == ref.texts[a.prompt], f"{a.kind} prompt {a.prompt} labelled {a.versions[0]} is not {policy}'s greedy text"
        served[policy] += 1
    assert len(run.answers) >= 4 * CLIENTS and min(served.values()) > 0, (len(run.answers), served)
    assert {a.kind for a in run.answers} == {"native", "native_stream", "openai", "openai_stream"}

    with httpx.Client(base_url=url, timeout=10) as c:
        load = c.get("/get_load").json()[0]
    assert (load["num_running"], load["num_waiting"]) == (0, 0)
    assert load["num_preemptions"] > 0, "the pool never forced a preemption: the test lost its point"

    # memory: after the first third (warm-up: allocator pools, the rollback arena), growth stays bounded
    warm = [b for t, b in run.rss if t >= LOAD_S / 3]
    assert len(warm) >= 5
    growth = max(warm) - warm[0]
    assert growth < RSS_GROWTH_LIMIT, f"server RSS grew {growth >> 20} MiB under steady load (from {warm[0] >> 20} MiB)"
