"""Chaos: one engine driven as RL frameworks drive it, their calls randomly interleaved.

Client threads generate on every path (native /generate and /v1/completions over HTTP, streaming and not, the
Engine's sync and async-stream API) at temperature 1 with seeds, n in 1..4, random max_new_tokens (0 too) and
stop strings; an aborter aborts by rid (a prompt's rid with n > 1 aborts its samples) and everything; one
trainer thread runs the weight lifecycle between two policies A and B: updates from disk and from tensors
(alone, in begin/end sessions, inside pauses; some refused on purpose), pause in each mode (and vLLM's
/pause?mode=keep) then continue, release/resume of weights and KV cache, flush_cache, info routes.

Checked: every request ends in time with a valid finish reason; each sample's tokens are what the policy its
labels name samples for its seed (chaos_support.sample_problems); the info routes report the pause and
memory state the trainer made; refused updates change nothing; the checksum is always the last committed
policy's; at the end the engine is idle with every KV page free, nothing was logged as an internal error,
and it still serves the committed policy.

HOTSWAP_CHAOS_SEED, HOTSWAP_CHAOS_ROUNDS (trainer operations), HOTSWAP_CHAOS_CLIENTS and HOTSWAP_CHAOS_PAGES (KV pool)
run other, longer, busier or tighter schedules locally; HOTSWAP_CHAOS_DUMP=FILE writes every sample and the ledger there."""

from __future__ import annotations

import itertools
import logging
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
from chaos_support import (
    BASE_SEEDS,
    MAX_N,
    MAX_NEW,
    PROMPTS,
    REQUEST_TIMEOUT_S,
    ROUTES,
    AsyncRunner,
    Ledger,
    Sample,
    Spec,
    quiet_references,
    run_completions,
    run_completions_stream,
    run_engine,
    run_native,
    run_native_stream,
    sample_problems,
)
from trainer_support import checkpoint_tensors

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

SEED = int(os.environ.get("HOTSWAP_CHAOS_SEED", "20261205"))
ROUNDS = int(os.environ.get("HOTSWAP_CHAOS_ROUNDS", "24"))
CLIENTS = int(os.environ.get("HOTSWAP_CHAOS_CLIENTS", "3"))
NUM_PAGES = int(os.environ.get("HOTSWAP_CHAOS_PAGES", "32"))  # 128 tokens of KV: a few requests of ~30 tokens each force preemptions

pytestmark = pytest.mark.timeout(120 + 10 * ROUNDS)


@pytest.fixture(scope="module")
def policies(tiny_qwen3, tiny_qwen3_v2) -> dict[str, Path]:
    return {"A": tiny_qwen3, "B": tiny_qwen3_v2}


@pytest.fixture(scope="module")
def references(policies) -> dict[str, dict]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(policies["A"]))
    refs = {name: quiet_references(path, tok) for name, path in policies.items()}
    differ = sum(refs["A"][key].ids != refs["B"][key].ids for key in refs["A"])
    assert differ > len(refs["A"]) // 2, "the two policies must sample differently for most seeds"
    return refs


class InternalErrors(logging.Handler):
    """Records what the engine logs at ERROR: a handler, a batch or the loop failing is a defect here."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(f"{record.name}: {record.getMessage()} {record.exc_text or ''}")


@dataclass(kw_only=True)
class Run:
    samples: list[Sample] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)  # requests that did not end properly (errors, hangs)
    refused_503: int = 0
    aborts_sent: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    live: dict[str, float] = field(default_factory=dict)  # rid -> submitted (for the aborter)

    def fail(self, msg: str) -> None:
        with self.lock:
            self.failures.append(msg)


# ---- clients --------------------------------------------------------------------------------------------


def random_spec(rng: random.Random, route: str, rid: str, refs_a: dict) -> Spec:
    prompt = rng.randrange(len(PROMPTS))
    base = rng.choice(BASE_SEEDS)
    n = rng.choice((1, 1, 2, MAX_N))
    max_new = rng.choice((0, 1, 5, MAX_NEW, MAX_NEW, MAX_NEW))
    stop = None
    if rng.random() < 0.25:  # a plain piece of the text policy A would write, so some stops do match
        text = refs_a[(prompt, base)].text_of[MAX_NEW]
        pieces = [text[i : i + 2] for i in range(len(text) - 1) if text[i : i + 2].isascii() and text[i : i + 2].isalnum()]
        stop = [rng.choice(pieces)] if pieces else None
    return Spec(route=route, prompt=prompt, seed=base, n=n, max_new=max_new, stop=stop, rid=rid)


def client_loop(k: int, url: str, engine: Engine, runner: AsyncRunner, refs_a: dict, stop: threading.Event, run: Run) -> None:
    rng = random.Random(SEED * 1000 + k)
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        calls = {"native": lambda s: run_native(client, s), "native_stream": lambda s: run_native_stream(client, s),
                 "completions": lambda s: run_completions(client, s), "completions_stream": lambda s: run_completions_stream(client, s),
                 "engine": lambda s: run_engine(engine, s), "engine_async_stream": lambda s: runner.run(engine, s)}
        for j in itertools.count():
            if stop.is_set():
                return
            route = ROUTES[(k + j) % len(ROUTES)]
            spec = random_spec(rng, route, f"c{k}-{j}", refs_a)
            if route.startswith("completions"):
                spec.rid = f"completions-{k}-{j}"  # OpenAI routes name their own request ids; nobody aborts these by rid
            else:
                with run.lock:
                    run.live[spec.rid] = time.monotonic()
            try:
                got = calls[route](spec)
            except Exception as exc:  # noqa: BLE001 - a lost request is what the test looks for
                run.fail(f"{route} rid={spec.rid}: {type(exc).__name__}: {exc}")
                continue
            finally:
                with run.lock:
                    run.live.pop(spec.rid, None)
            with run.lock:
                if got == "503":
                    run.refused_503 += 1
                else:
                    run.samples.extend(got)


def aborter_loop(url: str, engine: Engine, stop: threading.Event, run: Run) -> None:
    """Aborts a live request by its rid now and then (HTTP or Engine), and rarely everything."""
    rng = random.Random(SEED + 17)
    with httpx.Client(base_url=url, timeout=REQUEST_TIMEOUT_S) as client:
        while not stop.wait(rng.uniform(0.1, 0.4)):
            with run.lock:
                live = sorted(run.live)
            if rng.random() < 0.08:
                target = {"abort_all": True}
            elif live:
                target = {"rid": rng.choice(live)}
            else:
                continue
            try:
                if rng.random() < 0.5:
                    r = client.post("/abort_request", json=target)
                    assert r.status_code == 200 and r.content == b"", (r.status_code, r.text)
                else:
                    engine.abort_request(**target)  # success False when it already finished: fine
            except Exception as exc:  # noqa: BLE001
                run.fail(f"abort {target}: {type(exc).__name__}: {exc}")
            run.aborts_sent += 1


# ---- the trainer ----------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Trainer:
    """One thread running the weight lifecycle; it alone pauses, updates and moves memory, so what it did is
    what the engine must report."""

    engine: Engine
    client: httpx.Client
    paths: dict[str, Path]
    tensors: dict[str, dict]
    checksums: dict[str, dict]
    ledger: Ledger
    rng: random.Random
    committed: str = "A"  # the policy the engine serves once no session or pause is open
    version: str = "default"
    paused: bool = False
    released: set[str] = field(default_factory=set)
    counter: itertools.count = field(default_factory=lambda: itertools.count(1))
    log: list[str] = field(default_factory=list)
    ops: dict[str, int] = field(default_factory=dict)

    # -- helpers

    def new_version(self, policy: str | None) -> str:
        v = f"{policy}-{next(self.counter)}"
        with self.ledger.lock:
            self.ledger.policy_of[v] = policy  # known before any output can carry it
        return v

    def other(self) -> str:
        return "B" if self.committed == "A" else "A"

    def post(self, path: str, body: dict | None = None, ok: bool | None = True) -> httpx.Response:
        r = self.client.post(path, json=body or {})
        if ok is not None:
            assert (r.status_code == 200) == ok, f"{path} {body}: {r.status_code} {r.text}"
        return r

    def check_state(self, where: str) -> None:
        """The info routes report what this thread did: pause, memory, version; the weights are the
        committed policy's whenever no update is open."""
        load = self.engine.get_load()
        assert load.paused == self.paused, f"{where}: get_load paused={load.paused}, trainer paused={self.paused}"
        assert sorted(load.memory_released) == sorted(self.released), f"{where}: released {load.memory_released} vs {sorted(self.released)}"
        assert load.weight_version == self.version, f"{where}: version {load.weight_version!r}, expected {self.version!r}"
        info = self.client.get("/get_weight_version").json()
        assert info["weight_version"] == self.version, f"{where}: /get_weight_version {info}"
        assert self.client.get("/is_paused").json() == {"is_paused": self.paused}, where
        assert self.client.get("/is_sleeping").json() == {"is_sleeping": bool(self.released)}, where
        if not self.paused and "weights" not in self.released:
            out = self.engine.check_weights("checksum")
            assert out.success, out.message
            assert out.checksums == self.checksums[self.committed], f"{where}: weights are not policy {self.committed}'s"

    def tensor_update(self, policy: str, *, version: str | None, bad: bool = False) -> bool:
        tensors = dict(self.tensors[policy])
        if bad:  # one tensor of the wrong shape: the whole update is refused
            name = self.rng.choice(sorted(tensors))
            tensors[name] = tensors[name].reshape(-1)[:-1]
        out = self.engine.update_weights_from_tensor(list(tensors.items()), weight_version=version)
        assert out.success != bad, out.message
        return out.success

    def disk_update(self, policy: str, *, version: str) -> None:
        abort = self.rng.random() < 0.25  # AReaL's abort_all_requests: in-flight requests end instead of draining
        if self.rng.random() < 0.5:
            self.post("/update_weights_from_disk", {"model_path": str(self.paths[policy]), "weight_version": version,
                                                    "abort_all_requests": abort})
        else:
            out = self.engine.update_weights_from_disk(str(self.paths[policy]), weight_version=version, abort_all_requests=abort)
            assert out.success, out.message

    def any_update(self, policy: str, version: str) -> None:
        if self.rng.random() < 0.5:
            self.disk_update(policy, version=version)
        else:
            self.tensor_update(policy, version=version)

    # -- operations

    def op_update(self) -> None:
        """A drained update (outside a pause): disk or tensors, or one refused on purpose."""
        target = self.other()
        if self.rng.random() < 0.25:
            version = self.new_version(target)
            self.tensor_update(target, version=version, bad=True)
            return  # refused: nothing changed (check_state says so)
        self.version = self.new_version(target)
        self.any_update(target, self.version)
        self.committed = target

    def op_session(self) -> None:
        """begin -> buckets -> end, as a bucketed trainer pushes; one bucket refused fails the whole session."""
        target = self.other()
        names = sorted(self.tensors[target])
        cut = sorted(self.rng.sample(range(1, len(names)), 2))
        buckets = [names[: cut[0]], names[cut[0] : cut[1]], names[cut[1] :]]
        bad = self.rng.randrange(len(buckets)) if self.rng.random() < 0.3 else None
        via_http = self.rng.random() < 0.5
        if via_http:
            self.post("/begin_weight_update")
        else:
            assert self.engine.begin_weight_update().success
        self.paused = True  # an open session holds generation
        self.check_state("session open")
        for i, bucket in enumerate(buckets):
            tensors = {n: self.tensors[target][n] for n in bucket}
            if i == bad:
                name = bucket[0]
                tensors[name] = tensors[name].reshape(-1)[:-1]
            out = self.engine.update_weights_from_tensor(list(tensors.items()))
            if bad is None or i < bad:
                assert out.success, out.message
            elif i == bad:
                assert not out.success and "shape" in out.message.lower(), out.message
            else:
                assert not out.success, "a bucket after a refused one is refused too"
        version = self.new_version(target)
        if via_http:
            r = self.post("/end_weight_update", {"weight_version": version}, ok=None)
            ok = r.status_code == 200
        else:
            ok = self.engine.end_weight_update(weight_version=version).success
        self.paused = False
        assert ok == (bad is None)
        if ok:
            self.version, self.committed = version, target

    def op_pause(self) -> None:
        """pause (abort / retract / in_place, or vLLM's keep) -> maybe an update inside -> continue."""
        mode = self.rng.choice(("abort", "retract", "in_place", "keep"))
        t0 = time.monotonic()
        if mode == "keep":
            r = self.client.post("/pause?mode=keep&clear_cache=false")
            assert r.status_code == 200 and r.json() == {"status": "paused"}, r.text
        else:
            r = self.post("/pause_generation", {"mode": mode})
            assert r.json()["status"] == "ok"
        self.paused = True
        self.check_state(f"paused ({mode})")
        time.sleep(self.rng.uniform(0.0, 0.2))
        updated = False
        if self.rng.random() < 0.7:
            target = self.other()
            if self.rng.random() < 0.2:
                self.tensor_update(target, version=self.new_version(target), bad=True)
            else:
                self.version = self.new_version(target)
                self.any_update(target, self.version)
                self.committed, updated = target, True
            self.check_state(f"updated inside the pause ({mode})")
        if self.rng.random() < 0.3:
            self.post("/pause_generation", {"mode": mode if mode != "keep" else "in_place"})  # a second pause: a no-op
        if mode == "keep":
            r = self.client.post("/resume")
            assert r.status_code == 200 and r.json() == {"status": "resumed"}, r.text
        else:
            self.post("/continue_generation")
        self.paused = False
        if updated and mode in ("retract", "in_place", "keep"):  # frozen or retracted requests continue on the new policy
            with self.ledger.lock:
                self.ledger.span_windows.append((t0, time.monotonic()))

    def op_memory(self) -> None:
        """AReaL's offload (pause -> release -> resume -> continue), verl's wake-up order (weights, update, kv
        cache), or a release while requests may run (refused unless idle)."""
        style = self.rng.choice(("areal", "verl", "unpaused", "vllm_sleep"))
        if style == "vllm_sleep":
            self.vllm_sleep()
            return
        tags = self.rng.choice((["weights"], ["kv_cache"], ["weights", "kv_cache"], None))
        want = set(tags or ("weights", "kv_cache", "cuda_graph"))
        if style == "unpaused":
            r = self.post("/release_memory_occupation", {"tags": tags}, ok=None)
            if r.status_code == 200:
                self.released |= want
                self.check_state("released while serving")
                time.sleep(self.rng.uniform(0.0, 0.1))
                self.post("/resume_memory_occupation", {"tags": tags})
                self.released -= want
            else:
                assert "request(s) are running" in r.json()["message"], r.text
            return
        self.post("/pause_generation", {"mode": "abort"})
        self.paused = True
        discard = style == "verl" and "weights" in want and self.rng.random() < 0.5
        if discard:  # the weights go without a host copy: the engine must not name them as either policy
            out = self.engine.release_memory_occupation(tags, keep_weights_on_host=False)
            assert out.success, out.message
            self.version += "+discarded"
            with self.ledger.lock:
                self.ledger.policy_of[self.version] = None
        else:
            self.post("/release_memory_occupation", {"tags": tags})
        self.released |= want
        self.check_state(f"released {sorted(want)}")
        if "weights" not in want and self.rng.random() < 0.5:  # an update needs the weights resident, not the KV cache
            target = self.other()
            self.version = self.new_version(target)
            self.any_update(target, self.version)
            self.committed = target
            self.check_state("updated with the KV cache released")
        if style == "verl" and "weights" in want:
            self.post("/resume_memory_occupation", {"tags": ["weights"]})
            self.released.discard("weights")
            if discard or self.rng.random() < 0.5:
                target = self.other() if self.rng.random() < 0.5 else self.committed
                self.version = self.new_version(target)
                self.any_update(target, self.version)
                self.committed = target
            self.check_state("weights resumed")
        rest = sorted(self.released)
        if rest:
            self.post("/resume_memory_occupation", {"tags": rest})
            self.released.clear()
        self.post("/continue_generation")
        self.paused = False

    def vllm_sleep(self) -> None:
        """SkyRL's colocated cycle: /sleep (in-flight requests aborted; level 2 drops the weights), then
        /wake_up of the weights, a weight load, /wake_up of the KV cache. Asleep, generation is refused (503)."""
        level = self.rng.choice((1, 2))
        r = self.client.post(f"/sleep?level={level}")
        assert r.status_code == 200, r.text
        self.released = {"weights", "kv_cache", "cuda_graph"}
        if level == 2:
            self.version += "+discarded"
            with self.ledger.lock:
                self.ledger.policy_of[self.version] = None
        self.check_state(f"asleep (level {level})")
        r = self.client.post("/wake_up?tags=weights")
        assert r.status_code == 200, r.text
        self.released.discard("weights")
        if level == 2 or self.rng.random() < 0.5:
            target = self.other() if self.rng.random() < 0.5 else self.committed
            self.version = self.new_version(target)
            r = self.client.post("/update_weights", json={"weight_dir": str(self.paths[target]), "weight_version": self.version})
            assert r.status_code == 200 and r.json()["status"] == "ok", r.text
            self.committed = target
        self.check_state("weights awake")
        r = self.client.post("/wake_up?tags=kv_cache")
        assert r.status_code == 200, r.text
        self.released.clear()

    def op_flush(self) -> None:
        r = self.client.get("/flush_cache")
        assert r.status_code in (200, 400), r.text

    def op_info(self) -> None:
        info = self.client.get("/get_server_info").json()
        assert info["weight_version"] == self.version and info["internal_states"][0]["paused"] == self.paused
        loads = self.client.get("/v1/loads").json()["loads"][0]
        assert loads["weight_version"] == self.version

    def op_relabel(self) -> None:
        """update_weight_version names the same weights anew (aborting in-flight requests, SGLang's default)."""
        self.version = self.new_version(self.committed)
        out = self.engine.update_weight_version(self.version, abort_all_requests=self.rng.random() < 0.5)
        assert out.success, out.message

    OPS = (("update", 4), ("session", 2), ("pause", 4), ("memory", 2), ("flush", 1), ("info", 1), ("relabel", 1))

    def run(self, rounds: int, stop: threading.Event) -> None:
        names, weights = zip(*self.OPS)
        for r in range(rounds):
            if stop.wait(self.rng.uniform(0.05, 0.25)):
                return
            op = self.rng.choices(names, weights)[0]
            self.log.append(op)
            self.ops[op] = self.ops.get(op, 0) + 1
            getattr(self, f"op_{op}")()
            self.check_state(f"after round {r} ({op})")


# ---- the test -------------------------------------------------------------------------------------------


def test_interleaved_framework_calls_keep_every_invariant(policies, references):
    tensors = {name: checkpoint_tensors(path) for name, path in policies.items()}
    errors = InternalErrors()
    logging.getLogger("hotswap").addHandler(errors)
    run = Run()
    ledger = Ledger(policy_of={"default": "A"})
    stop = threading.Event()
    engine = Engine(str(policies["A"]), device="cpu", page_size=4, num_pages=NUM_PAGES)
    runner = AsyncRunner()
    try:
        checksums = {"A": engine.check_weights("checksum").checksums}
        with Engine(str(policies["B"]), device="cpu", page_size=4, num_pages=8) as other:
            checksums["B"] = other.check_weights("checksum").checksums
        with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=REQUEST_TIMEOUT_S) as http:
            trainer = Trainer(engine=engine, client=http, paths=policies, tensors=tensors, checksums=checksums, ledger=ledger,
                              rng=random.Random(SEED))
            threads = [threading.Thread(target=client_loop, args=(k, srv.url, engine, runner, references["A"], stop, run), daemon=True)
                       for k in range(CLIENTS)]
            threads.append(threading.Thread(target=aborter_loop, args=(srv.url, engine, stop, run), daemon=True))
            for t in threads:
                t.start()
            try:
                trainer.run(ROUNDS, stop)
            finally:
                stop.set()
                for t in threads:
                    t.join(REQUEST_TIMEOUT_S + 10)
            assert not any(t.is_alive() for t in threads), "a client hung past its request timeout"
            context = f"seed {SEED}, trainer ops {trainer.log}"
            assert not run.failures, f"{len(run.failures)} request(s) failed ({context}): {run.failures[:5]}"

            if os.environ.get("HOTSWAP_CHAOS_DUMP"):
                with open(os.environ["HOTSWAP_CHAOS_DUMP"], "w") as f:
                    for s in run.samples:
                        print(s.spec, s.k, s.ids, s.versions, s.version, s.finish, round(s.started, 3), round(s.ended, 3), file=f)
                    print("windows", ledger.span_windows, file=f)
                    print("policy_of", ledger.policy_of, file=f)
            problems = [p for s in run.samples for p in sample_problems(s, references, ledger, policies, set(engine.eos_token_ids))]
            assert not problems, f"{len(problems)} problem(s) ({context}):\n" + "\n".join(problems[:10])
            finished = [s for s in run.samples if s.finish["type"] != "abort" and s.ids]
            assert len(finished) >= 10 and {s.spec.route for s in finished} == set(ROUTES), (len(finished), context)

            # quiet again: idle, every page free after a flush, invariants hold, the committed policy serves
            trainer.check_state("at the end")
            load = engine.get_load()
            assert (load.num_running, load.num_waiting) == (0, 0), load
            assert engine.flush_cache().success
            load = engine.get_load()
            assert load.kv_pages_used == 0, f"{load.kv_pages_used} of {engine.capacity().num_pages} KV pages still used"
            assert load.num_preemptions > 0, "the KV pool never forced a preemption: the run lost part of its point"
            inv = engine.check_invariants()
            assert inv.success, inv.message
            assert engine.scheduler.dead is None and engine.scheduler.thread.is_alive()
            out = engine.generate(input_ids=PROMPTS[0], sampling_params={"max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": BASE_SEEDS[0]})
            assert out["output_ids"] == references[trainer.committed][(0, BASE_SEEDS[0])].ids, context
            assert ledger.policy_of[out["meta_info"]["weight_version"]] == trainer.committed
        assert not errors.records, f"the engine logged internal errors ({context}):\n" + "\n".join(errors.records[:5])
    finally:
        stop.set()
        logging.getLogger("hotswap").removeHandler(errors)
        runner.close()
        engine.shutdown()
