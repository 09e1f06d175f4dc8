"""Helpers for the chaos test: what each policy would sample on a quiet engine, one client request on any of
the six generation paths read back into one shape, and the checks every finished sample must pass.

A sample's tokens are judged against the policy its weight-version labels name: one policy throughout (the
usual case) must be a prefix of that policy's quiet output for the same prompt and seed; a request that was
frozen or retracted across an update (pause in_place / keep / retract, then continue) may switch policy once
per such window, and each of its tokens is then checked teacher-forced (HF logits + the engine's seeded
Gumbel noise) under the policy its label names."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field

import httpx
import torch
from engine_support import sse_events
from hf_reference import hf_model, prompt_ids
from transformers import DynamicCache

from hotswap import Engine
from hotswap.runner.sampler import gumbel_noise

MAX_NEW = 14
PROMPTS = [prompt_ids(9100, 10) + prompt_ids(9200 + i, 2 + 3 * i) for i in range(5)]  # a shared prefix, as in RL rollouts
BASE_SEEDS = (11, 500, 7000)  # a request samples seeds base .. base + n - 1
MAX_N = 4
REQUEST_TIMEOUT_S = 60.0  # a request answered later than this is a hang
ROUTES = ("native", "native_stream", "completions", "completions_stream", "engine", "engine_async_stream")


@dataclass(kw_only=True, slots=True)
class Reference:
    ids: list[int]
    logprobs: list[float]
    text_of: dict[int, str]  # tokens -> decoded text of ids[:tokens]


def quiet_references(path, tokenizer) -> dict[tuple[int, int], Reference]:
    """(prompt index, seed) -> what `path`'s weights sample at temperature 1 on an engine with room to spare."""
    refs = {}
    with Engine(str(path), device="cpu", page_size=4) as engine:
        for base in BASE_SEEDS:
            for k in range(MAX_N):
                outs = engine.generate(input_ids=PROMPTS, sampling_params={"max_new_tokens": MAX_NEW, "temperature": 1.0, "seed": base + k},
                                       return_logprob=True)
                for i, out in enumerate(outs):
                    ids = out["output_ids"]
                    refs[(i, base + k)] = Reference(ids=ids, logprobs=[lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]],
                                                    text_of={j: tokenizer.decode(ids[:j]) for j in range(len(ids) + 1)})
    return refs


@dataclass(kw_only=True, slots=True)
class Spec:
    """One client call: prompt x n samples with seeds seed .. seed + n - 1."""

    route: str
    prompt: int
    seed: int
    n: int
    max_new: int
    stop: list[str] | None
    rid: str


@dataclass(kw_only=True, slots=True)
class Sample:
    spec: Spec
    k: int
    ids: list[int]
    logprobs: list[float] | None
    versions: list[str]  # one label per token
    version: str  # meta_info.weight_version
    finish: dict
    started: float
    ended: float

    @property
    def seed(self) -> int:
        return self.spec.seed + self.k



def _from_meta(spec: Spec, k: int, ids: list[int], meta: dict, versions: list[str] | None, t0: float) -> Sample:
    per_token = meta.get("weight_versions")
    if versions is None:
        versions = list(per_token) if per_token else [meta["weight_version"]] * len(ids)
    logprobs = [lp for lp, _, _ in meta["output_token_logprobs"]] if "output_token_logprobs" in meta else None
    return Sample(spec=spec, k=k, ids=list(ids), logprobs=logprobs, versions=versions, version=meta["weight_version"],
                  finish=meta["finish_reason"], started=t0, ended=time.monotonic())


def _native_body(spec: Spec, stream: bool) -> dict:
    sp = {"max_new_tokens": spec.max_new, "temperature": 1.0, "seed": spec.seed, "n": spec.n}
    if spec.stop:
        sp["stop"] = spec.stop
    return {"input_ids": PROMPTS[spec.prompt], "sampling_params": sp, "return_logprob": True, "rid": spec.rid, "stream": stream}


def _index(out: dict, spec: Spec) -> int:
    return out.get("index", 0) if spec.n > 1 else 0


def run_native(client: httpx.Client, spec: Spec) -> list[Sample] | str:
    t0 = time.monotonic()
    r = client.post("/generate", json=_native_body(spec, False))
    if r.status_code == 503:
        return "503"
    assert r.status_code == 200, r.text
    outs = r.json() if spec.n > 1 else [r.json()]
    return [_from_meta(spec, _index(o, spec), o["output_ids"], o["meta_info"], None, t0) for o in outs]


def _collect_stream(spec: Spec, events: list[dict], t0: float) -> list[Sample]:
    ids: dict[int, list[int]] = {}
    versions: dict[int, list[str]] = {}
    finals: dict[int, dict] = {}
    for e in events:
        i = _index(e, spec)
        assert i not in finals, f"output after the finished one for sample {i}"
        ids.setdefault(i, []).extend(e["delta_output_ids"])
        versions.setdefault(i, []).extend(e["delta_weight_versions"])
        assert len(ids[i]) == len(versions[i]), "every streamed token carries its weight version"
        if e["meta_info"]["finish_reason"] is not None:
            finals[i] = e
    assert sorted(finals) == list(range(spec.n)), f"samples finished: {sorted(finals)} of {spec.n}"
    out = []
    for i, e in finals.items():
        assert ids[i] == e["output_ids"], "streamed deltas add up to the final output"
        out.append(_from_meta(spec, i, e["output_ids"], e["meta_info"], versions[i], t0))
    return out


def _stream_events(client: httpx.Client, route: str, body: dict) -> list[dict] | str:
    """A streamed POST's JSON events, or "503" (generation unavailable: memory released)."""
    with client.stream("POST", route, json=body) as r:
        if r.status_code == 503:
            return "503"
        assert r.status_code == 200, r.read()
        return sse_events(r.iter_lines())


def run_native_stream(client: httpx.Client, spec: Spec) -> list[Sample] | str:
    t0 = time.monotonic()
    events = _stream_events(client, "/generate", _native_body(spec, True))
    return events if events == "503" else _collect_stream(spec, events, t0)


def _completions_body(spec: Spec, stream: bool) -> dict:
    body = {"model": "tiny", "prompt": PROMPTS[spec.prompt], "max_tokens": spec.max_new, "temperature": 1.0, "seed": spec.seed, "n": spec.n,
            "logprobs": 0, "return_meta_info": True, "return_token_ids": True, "stream": stream}
    if spec.stop:
        body["stop"] = spec.stop
    return body


def run_completions(client: httpx.Client, spec: Spec) -> list[Sample] | str:
    t0 = time.monotonic()
    r = client.post("/v1/completions", json=_completions_body(spec, False))
    if r.status_code == 503:
        return "503"
    assert r.status_code == 200, r.text
    out = r.json()
    assert len(out["choices"]) == spec.n
    samples = []
    for c in out["choices"]:
        meta = c["meta_info"]
        assert c["token_ids"] == meta["output_ids"]
        samples.append(_from_meta(spec, c["index"], meta["output_ids"], meta, None, t0))
    return samples


def run_completions_stream(client: httpx.Client, spec: Spec) -> list[Sample] | str:
    t0 = time.monotonic()
    events = _stream_events(client, "/v1/completions", _completions_body(spec, True))
    if events == "503":
        return events
    ids: dict[int, list[int]] = {}
    finals: dict[int, dict] = {}
    for e in events:
        for c in e["choices"]:
            i = c["index"]
            assert i not in finals, f"a chunk after the finished one for choice {i}"
            ids.setdefault(i, []).extend(c.get("token_ids") or [])
            if c["finish_reason"] is not None:
                finals[i] = c["meta_info"]
    assert sorted(finals) == list(range(spec.n)), f"choices finished: {sorted(finals)} of {spec.n}"
    out = []
    for i, meta in finals.items():
        assert ids[i] == meta["output_ids"], "streamed token ids add up to the final output"
        out.append(_from_meta(spec, i, meta["output_ids"], meta, None, t0))
    return out


def _engine_kwargs(spec: Spec) -> dict:
    sp = {"max_new_tokens": spec.max_new, "temperature": 1.0, "seed": spec.seed, "n": spec.n}
    if spec.stop:
        sp["stop"] = spec.stop
    return {"input_ids": PROMPTS[spec.prompt], "sampling_params": sp, "return_logprob": True, "rid": spec.rid}


def run_engine(engine: Engine, spec: Spec) -> list[Sample] | str:
    from hotswap.errors import EngineUnavailableError

    t0 = time.monotonic()
    try:
        result = engine.generate(**_engine_kwargs(spec))
    except EngineUnavailableError:
        return "503"
    outs = result if spec.n > 1 else [result]
    return [_from_meta(spec, _index(o, spec), o["output_ids"], o["meta_info"], None, t0) for o in outs]


class AsyncRunner:
    """An event loop in its own thread for Engine.async_generate(stream=True) calls."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="chaos-async", daemon=True)
        self.thread.start()

    def run(self, engine: Engine, spec: Spec) -> list[Sample] | str:
        return asyncio.run_coroutine_threadsafe(self._run(engine, spec), self.loop).result(timeout=REQUEST_TIMEOUT_S)

    async def _run(self, engine: Engine, spec: Spec) -> list[Sample] | str:
        from hotswap.errors import EngineUnavailableError

        t0 = time.monotonic()
        events = []
        try:
            async for chunk in await engine.async_generate(stream=True, **_engine_kwargs(spec)):
                events.append(chunk)
        except EngineUnavailableError:
            return "503"
        return _collect_stream(spec, events, t0)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


# ---- the checks ---------------------------------------------------------------------------------------


@dataclass(kw_only=True)
class Ledger:
    """What the trainer did, for judging the samples: version label -> policy, and the windows in which a
    request may switch policy (generation frozen or retracted while an update committed)."""

    policy_of: dict[str, str | None] = field(default_factory=dict)  # None: weights no policy names (discarded)
    span_windows: list[tuple[float, float]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def runs(labels: list[str]) -> list[str]:
    return [v for j, v in enumerate(labels) if j == 0 or labels[j - 1] != v]


def _kept_kv_logprobs(paths: dict[str, object], seq: list[int], first: int, policies: list[str]) -> torch.Tensor:
    """log_softmax of the logits at positions first-1 .. when each position's KV and logits come from the policy
    that labels the token it samples (a request frozen in place keeps its KV across the update)."""
    owner = [policies[0]] * (first - 1) + policies  # positions before the first sampling one: the prefill's policy
    cache, out = DynamicCache(), []  # one cache both policies append to (same architecture)
    q = 0
    while q < len(owner):
        r = q
        while r < len(owner) and owner[r] == owner[q]:
            r += 1
        out.append(hf_model(str(paths[owner[q]]))(torch.tensor([seq[q:r]]), cache=cache, use_cache=True).logits[0].float())
        q = r
    return torch.log_softmax(torch.cat(out), -1)[first - 1 :]


@torch.no_grad()
def teacher_forced_problems(paths: dict[str, object], sample: Sample, policies: list[str]) -> list[str]:
    """Each token of a sample that switched policy, against the policy its label names, plus the engine's Gumbel
    noise for (seed, step): it must be that policy's pick (within float noise) with that logprob, computed either
    on KV recomputed by that policy (retract, or a preemption after the switch) or on the KV kept from before the
    switch (pause in place / keep)."""
    prompt = PROMPTS[sample.spec.prompt]
    seq = prompt + sample.ids
    recomputed = {name: torch.log_softmax(hf_model(str(paths[name]))(torch.tensor([seq])).logits[0].float(), -1)[len(prompt) - 1 :]
                  for name in set(policies)}
    kept = _kept_kv_logprobs(paths, seq[:-1], len(prompt), policies)
    problems = []
    for j, (tok, name) in enumerate(zip(sample.ids, policies)):
        noise = gumbel_noise(torch.tensor([sample.seed]), torch.tensor([j]), kept.shape[1])[0]
        fits = []
        for lp in (recomputed[name][j], kept[j]):
            scores = lp + noise
            picked = bool(scores[tok] >= scores.max() - 1e-4)
            same_lp = sample.logprobs is None or math.isclose(sample.logprobs[j], float(lp[tok]), abs_tol=2e-3)
            fits.append(picked and same_lp)
        if not any(fits):
            problems.append(f"token {j} ({tok}, logprob {sample.logprobs[j] if sample.logprobs else None}) is not policy {name}'s sample, "
                            f"on recomputed KV (pick {int((recomputed[name][j] + noise).argmax())}, lp {float(recomputed[name][j][tok]):.4f}) "
                            f"or on kept KV (pick {int((kept[j] + noise).argmax())}, lp {float(kept[j][tok]):.4f})")
    return problems


def sample_problems(sample: Sample, refs: dict[str, dict], ledger: Ledger, paths: dict, eos_ids: set[int]) -> list[str]:
    """Everything wrong with one finished sample (empty when it is right)."""
    spec, ids, fin = sample.spec, sample.ids, sample.finish
    where = f"{spec.route} rid={spec.rid} sample {sample.k} (prompt {spec.prompt}, seed {sample.seed}, max_new {spec.max_new}, stop {spec.stop})"
    out = []
    kind = fin.get("type") if isinstance(fin, dict) else None
    if kind not in ("length", "stop", "abort"):
        return [f"{where}: bad finish_reason {fin!r}"]
    if sample.ended - sample.started > REQUEST_TIMEOUT_S:
        out.append(f"{where}: took {sample.ended - sample.started:.1f} s")
    if len(sample.versions) != len(ids):
        return [*out, f"{where}: {len(ids)} tokens but {len(sample.versions)} version labels"]
    if len(ids) > spec.max_new:
        out.append(f"{where}: {len(ids)} tokens past max_new_tokens {spec.max_new}")
    if kind == "length" and len(ids) != spec.max_new:
        out.append(f"{where}: finish length after {len(ids)} of {spec.max_new} tokens")
    if kind == "stop":
        matched = fin.get("matched")
        if isinstance(matched, int):
            if not ids or ids[-1] != matched or matched not in eos_ids:
                out.append(f"{where}: stop on token {matched!r} that is not its last token / an eos")
        elif not (spec.stop and matched in spec.stop):
            out.append(f"{where}: stop on {matched!r}, not one of its stop strings")
    if kind == "abort" and not isinstance(fin.get("message"), str):
        out.append(f"{where}: abort without a message")
    with ledger.lock:
        policy_of = dict(ledger.policy_of)
        windows = list(ledger.span_windows)
    unknown = [v for v in set(sample.versions) | {sample.version} if v not in policy_of]
    if unknown:
        return [*out, f"{where}: unknown weight versions {unknown}"]
    if ids and sample.version != sample.versions[-1]:
        out.append(f"{where}: meta_info weight_version {sample.version!r} but its last token came from {sample.versions[-1]!r}")
    policies = [policy_of[v] for v in sample.versions]
    if None in policies:
        return [*out, f"{where}: tokens from weights no policy names ({sample.versions})"]
    switches = max(0, len(runs(policies)) - 1)
    if switches:
        spans = sum(1 for a, b in windows if a < sample.ended and b > sample.started)
        if switches > spans:
            out.append(f"{where}: mixes policies {runs(policies)} ({runs(sample.versions)}) with {spans} pause-and-update window(s) in its life")
        out += [f"{where}: {p}" for p in teacher_forced_problems(paths, sample, policies)]
        return out
    if not ids:  # it computed nothing: any version the engine held meanwhile is a true label
        return out
    ref = refs[policies[0]][(spec.prompt, sample.seed)]
    if ids != ref.ids[: len(ids)]:
        others = [name for name in refs if name != policies[0] and refs[name][(spec.prompt, sample.seed)].ids[: len(ids)] == ids]
        out.append(f"{where}: labelled {sample.versions[0]} but is not policy {policies[0]}'s output"
                   f"{f' (it is policy {others[0]}s)' if others else ''}:\n  got {ids}\n  ref {ref.ids}")
        return out
    if sample.logprobs is not None and any(not math.isclose(a, b, abs_tol=1e-3) for a, b in zip(sample.logprobs, ref.logprobs)):
        out.append(f"{where}: logprobs differ from policy {policies[0]}'s")
    if kind == "stop" and isinstance(fin.get("matched"), str) and fin["matched"] not in ref.text_of[len(ids)]:
        out.append(f"{where}: stopped on {fin['matched']!r}, absent from its text {ref.text_of[len(ids)]!r}")
    if kind == "length" and spec.stop and any(s in ref.text_of[len(ids) - 1] for s in spec.stop):
        out.append(f"{where}: ran past a stop string in {ref.text_of[len(ids) - 1]!r}")
    return out
