"""A hostile client against every route the app registers: wrong JSON types for each known field, huge,
negative and non-finite numbers, oversized strings and lists, unknown fields, malformed and non-JSON bodies,
wrong content types. Each reply must be a 2xx or a 4xx that names the offending field (or the reason), never
a 5xx; afterwards the server still answers a greedy /generate exactly as before, and the weights (checksum),
weight_version, pause and memory state are what they were. Seeded and bounded, so a failure replays
(HOTSWAP_FUZZ_SEED / HOTSWAP_FUZZ_CASES run other seeds and more cases per route). Below it, one test per
defect the fuzz found, and the transport cases by hand: slow bodies, clients gone mid-body or mid-stream,
concurrent aborts of one rid."""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import random
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx
import pytest
from engine_support import SIX_STREAMS_BODY, close_with_reset, read_first_event, wait_idle

from hotswap import Engine
from hotswap.server.access import AccessPolicy
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

SEED = int(os.environ.get("HOTSWAP_FUZZ_SEED", "20261205"))
PER_ROUTE = int(os.environ.get("HOTSWAP_FUZZ_CASES", "20"))  # cases per POST route
PROMPT = "Alice likes 12 apples"
GREEDY = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
BIG_TEXT = "x" * (1 << 20)
BODY_TIMEOUT_S = 1.0  # the server's --body-timeout-s here
MAX_ERROR_BYTES = 4096  # a refusal says what was wrong; it never echoes a megabyte back
DEEP = json.loads("[" * 60 + "]" * 60)

# Routes that change state when they accept a body: after a 2xx the test puts the state back (the weights
# themselves must come out bit-identical whatever was accepted: the checksum is compared at the end).
STATEFUL = frozenset({"/pause_generation", "/continue_generation", "/pause", "/resume", "/sleep", "/wake_up", "/release_memory_occupation",
                      "/resume_memory_occupation", "/update_weight_version", "/begin_weight_update", "/end_weight_update",
                      "/areal_pause_generation", "/areal_continue_generation", "/areal_set_update_weight_meta",
                      # an update of no tensors is an update (SGLang's too): it names the new version
                      "/update_weights_from_tensor", "/update_weights_from_distributed",
                      # a body of unknown fields only is a valid start_profile (into the module's profile folder)
                      "/start_profile", "/freeze_gc"})


def base_bodies() -> dict[str, dict]:
    """A body for every POST route. Those that would change the weights or reach another host carry a value
    no single-field mutation repairs (a folder that does not exist, a rank outside its group), so each case
    on them must be refused; the others are valid, so a mutation the route accepts answers 2xx."""
    gen_sp = {**GREEDY, "top_k": 5, "top_p": 0.9, "min_p": 0.0, "seed": 3, "stop": ["zz"], "stop_token_ids": [7],
              "n": 1, "frequency_penalty": 0.0, "presence_penalty": 0.0, "repetition_penalty": 1.0, "min_new_tokens": 0,
              "logit_bias": {"5": 0.5}, "no_stop_trim": False, "skip_special_tokens": True}
    oai = {"model": "tiny", "max_tokens": 4, "temperature": 0, "top_p": 1.0, "n": 1, "stream": False, "stop": ["zz"], "seed": 1,
           "presence_penalty": 0.0, "frequency_penalty": 0.0, "logit_bias": {"5": 0.5}, "top_k": 5, "min_p": 0.0, "ignore_eos": True,
           "stop_token_ids": [7], "skip_special_tokens": True, "repetition_penalty": 1.0, "min_tokens": 0,
           "stream_options": {"include_usage": True}, "return_token_ids": True}
    missing = "/nonexistent/hotswap-fuzz-model"
    # rank 0 (the trainer's) of a group of 1: no single mutation makes it a join that would wait for a trainer
    group = {"master_address": "127.0.0.1", "master_port": 1, "rank_offset": 0, "world_size": 1, "group_name": "fuzz",
             "backend": "gloo", "timeout_s": 0.5}
    return {
        "/generate": {"text": PROMPT, "sampling_params": gen_sp, "return_logprob": True, "top_logprobs_num": 2, "logprob_start_len": 0,
                      "return_text_in_logprobs": True, "stream": False, "rid": None},
        "/v1/completions": {**oai, "prompt": PROMPT, "logprobs": 2, "echo": False, "prompt_logprobs": 1},
        "/v1/chat/completions": {**oai, "messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2,
                                 "chat_template_kwargs": {"enable_thinking": False}},
        "/inference/v1/generate": {"token_ids": [5, 6, 7], "sampling_params": {"max_tokens": 4, "temperature": 0, "top_k": 5, "logprobs": 1,
                                                                                 "prompt_logprobs": 1, "n": 1, "seed": 1, "stop_token_ids": [7]},
                                   "request_id": "fuzz"},
        "/tokenize": {"prompt": PROMPT, "add_special_tokens": True, "return_token_strs": True},
        "/v1/tokenize": {"messages": [{"role": "user", "content": "hi"}], "add_generation_prompt": True},
        "/detokenize": {"tokens": [5, 6, 7], "skip_special_tokens": False},
        "/v1/detokenize": {"tokens": [[5, 6], [7]]},
        "/abort_request": {"rid": "no-such-request", "abort_all": False},
        "/flush_cache": {},
        "/update_weights_from_disk": {"model_path": missing, "load_format": None, "weight_version": "v-fuzz", "flush_cache": True,
                                      "abort_all_requests": False},
        "/update_weights": {"weight_dir": missing, "weight_version": "v-fuzz"},
        "/areal_update_weights": {"model_path": missing, "load_format": "auto", "abort_all_requests": False},
        "/init_weights_update_group": group,
        "/areal_init_weights_update_group": {k: v for k, v in group.items() if k != "timeout_s"},
        "/destroy_weights_update_group": {"group_name": "no-such-group"},
        "/update_weights_from_distributed": {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "no-such-group",
                                             "flush_cache": True, "weight_version": "v-fuzz", "load_format": None},
        "/areal_set_update_weight_meta": {"names": ["model.norm.weight"], "dtypes": ["float32"], "shapes": [[64]], "group_name": "no-such-group"},
        "/areal_update_weights_xccl": {},
        "/update_weights_from_tensor": {"named_tensors": [{"name": "model.norm.weight", "kind": "shm", "shm_name": "not-the-engines-block",
                                                           "offset": 0, "dtype": "float32", "shape": [64]}],
                                        "load_format": None, "flush_cache": True, "weight_version": "v-fuzz"},
        "/update_weights_from_ipc": {"zmq_handles": {"GPU-0": "ipc:///nonexistent/hotswap-fuzz.sock"}, "flush_cache": True,
                                     "weight_version": "v-fuzz"},
        "/get_weights_by_name": {"name": "model.norm.weight", "truncate_size": 4},
        "/release_memory_occupation": {"tags": ["kv_cache"], "keep_weights_on_host": True},
        "/resume_memory_occupation": {"tags": ["kv_cache"]},
        "/weights_checker": {"action": "checksum", "skip_tensor_list": ["model.norm.weight"], "allow_quant_error": False},
        "/pause_generation": {"mode": "abort"},
        "/continue_generation": {},
        "/update_weight_version": {"new_version": "v-fuzz", "abort_all_requests": False},
        "/post_process_weights": {"restore_weights_before_load": True, "post_process_quantization": False},
        "/save_sharded_model": {"path": "/nonexistent/hotswap-fuzz-save", "pattern": None, "max_size": 1 << 20, "overwrite": False},
        "/save_remote_model": {"url": "s3://not-allowed/fuzz", "overwrite": False},
        "/begin_weight_update": {},
        "/end_weight_update": {"weight_version": None, "abort": True},
        "/pause": {}, "/resume": {}, "/sleep": {}, "/wake_up": {},
        "/reset_prefix_cache": {"reset_running_requests": False},
        "/init_weight_transfer_engine": {}, "/collective_rpc": {},
        "/areal_pause_generation": {}, "/areal_continue_generation": {},
        "/start_profile": {"output_dir": "/nonexistent/hotswap-fuzz-profile", "start_step": None, "num_steps": 2, "activities": ["CPU"],
                           "with_stack": False, "record_shapes": False, "profile_by_stage": False, "merge_profiles": False,
                           "profile_prefix": "fuzz"},
        "/stop_profile": {}, "/freeze_gc": {},
    }


# a second body for the routes whose fields come in more than one shape (token ids, batches, per-prompt lists)
ALTERNATES = {
    "/generate": {"input_ids": [[5, 6, 7], [8, 9]], "sampling_params": [{**GREEDY, "custom_params": {"return_top_p_token_ids": True}},
                                                                      {**GREEDY, "temperature": 0.7}],
                  "rid": ["alt-a", "alt-b"], "return_logprob": [True, False], "top_logprobs_num": [1, 0], "logprob_start_len": [1, 0],
                  "return_routed_experts": False, "routed_experts_start_len": 0, "image_data": None, "lora_path": None,
                  "custom_logit_processor": None, "stream": True},
    "/v1/completions": {"prompt": [[5, 6, 7], [8]], "max_tokens": 3, "echo": True, "logprobs": 1, "n": 2, "temperature": 0.5, "seed": 4,
                        "stream": True, "return_tokens_as_token_ids": True, "return_meta_info": True, "best_of": 2, "suffix": None,
                        "use_beam_search": False, "cache_salt": "s", "user": "u"},
    "/v1/chat/completions": {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": [{"type": "text", "text": "hi"}]},
                                          {"role": "assistant", "content": "he"}],
                             "max_completion_tokens": 3, "continue_final_message": True, "add_generation_prompt": False,
                             "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto",
                             "response_format": {"type": "text"}, "stream": True, "n": 2, "temperature": 0.5},
    "/tokenize": {"prompt": ["a", "b"], "add_special_tokens": False},
}


def hostile_values(rng: random.Random) -> list:
    """Values of every JSON type and the edges of each, plus the odd non-JSON numbers Python's json emits."""
    return [None, True, False, 0, 1, -1, -(2**63) - 1, 2**63, 2**64 + 1, 10**30, 1.5, -0.5, 1e308, -1e308,
            math.nan, math.inf, -math.inf, "", "x", "1", "true", "null", "\u0000\ud7ff\ufffd", rng.choice([BIG_TEXT, "y" * 5000]),
            [], [None], [1, "a"], [[[]]], ["x"] * 5000, list(range(-3, 3)), {}, {"a": 1}, {"": None}, DEEP, {"nested": {"deep": DEEP}}]


# each limit and its first value past it, for the fields that have one (tiny model: vocabulary 512, context 512)
EDGES = {"n": [256, 257], "top_logprobs_num": [20, 21, 512, 513], "logprobs": [20, 21], "top_logprobs": [20, 21], "prompt_logprobs": [20, 21],
         "top_k": [511, 512, 513, 2**63 - 1, 2**63], "max_new_tokens": [0, 505, 506, 600], "max_tokens": [0, 505, 506, 600],
         "max_completion_tokens": [0, 506, 600], "logprob_start_len": [-1, -2, 4, 5, 6], "seed": [2**63 - 1, 2**63], "min_new_tokens": [600],
         "min_tokens": [600], "token_ids": [[511], [512], [-1], [0] * 511, [0] * 512], "tokens": [[511], [512], [-1]],
         "stop": [["x"] * 20_000, ["\ufffd"]], "stop_token_ids": [[511], [512], [2**63]], "logit_bias": [{"511": 100}, {"512": 1}, {"-1": 1}],
         "temperature": [0, 100, 100.01, 1e-30], "top_p": [1e-30, 1, 1.000001], "min_p": [1, 1.000001], "repetition_penalty": [2, 2.0001, 1e-30],
         "truncate_size": [0, -1, 2**63], "max_size": [0, 1, 2**63], "rank_offset": [0, 2**31], "world_size": [2**31 - 1, 2**31]}

HOSTILE_QUERIES = ("level=%ff&mode=%00", "level=99999999999999999999", "level=-1", "mode=bogus", "tags=bogus&tags=" + "z" * 5000,
                   "include_dp=maybe", "clear_cache=2", "reset_running_requests=maybe", "timeout=-1e309", "name=" + "z" * 4000)

# routes whose fields interact: they also get cases that change two fields at once
PAIRED = frozenset({"/generate", "/v1/completions", "/v1/chat/completions", "/inference/v1/generate", "/tokenize", "/v1/tokenize"})

# raw bodies: (bytes, content-type); every one of them must be refused with a reason
RAW_BODIES = [
    (b"{", "application/json"), (b"not json", "application/json"), (b"\xff\xfe\x00{", "application/json"),
    (b'{"text": "\xff\xfe"}', "application/json"), (b'{"a": 1}{"b": 2}', "application/json"),
    (b"[" * 100_000 + b"]" * 100_000, "application/json"), (b'{"a":' * 5000 + b"1" + b"}" * 5000, "application/json"),
    (b"[1, 2, 3]", "application/json"), (b'"text"', "application/json"), (b"42", "application/json"), (b"null", "application/json"),
    (b"9" * 5000, "application/json"), (b'{"x": ' + b"9" * 5000 + b"}", "application/json"), (b'{"x": NaN, "y": -Infinity}', "application/json"),
    (b'{"a": 1}', "text/plain"), (b"a=1&b=2", "application/x-www-form-urlencoded"), (b'{"a": 1}', ""),
    (b"--b\r\nContent-Disposition: form-data; name=a\r\n\r\n1\r\n--b--", "multipart/form-data; boundary=b"),
]


@dataclass
class Case:
    route: str
    desc: str
    fields: tuple[str, ...]  # the field a mutation targets and those around it (a refusal names one of them, or the value)
    value: str | None  # the value given, when short enough to be named
    content: bytes
    content_type: str
    query: str = ""


def _paths(body, prefix=()):
    """Every (path, value) inside a body: keys of objects and indices of short lists."""
    for key, value in (body.items() if isinstance(body, dict) else enumerate(body[:3])):
        path = (*prefix, key)
        yield path
        if isinstance(value, (dict, list)) and value and len(path) < 4:
            yield from _paths(value, path)


def _set(body, path, value):
    body = json.loads(json.dumps(body))
    node = body
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return body


def _dumps(body) -> bytes:
    return json.dumps(body, allow_nan=True).encode()  # NaN/Infinity on purpose: Python clients send them


def _field_names(path) -> tuple[str, ...]:
    """The fields on a path, innermost first (logit_bias keys are token ids, not fields)."""
    return tuple(reversed([k for k in path if isinstance(k, str) and not k.isdigit()]))


def cases_for(route: str, base: dict, rng: random.Random, per_route: int) -> list[Case]:
    values = hostile_values(rng)
    paths = list(_paths(base))
    out = []

    def pick(path):
        edges = EDGES.get(_field_names(path)[0] if _field_names(path) else "", [])
        return rng.choice(edges) if edges and rng.random() < 0.5 else rng.choice(values)

    for _ in range(per_route):
        kind = rng.random()
        if paths and route in PAIRED and kind < 0.2:  # two fields at once: limits interact (min_new_tokens masks stop ids)
            first, second = rng.sample(paths, 2)
            if first[: len(second)] == second or second[: len(first)] == first:
                continue
            a, b = pick(first), pick(second)
            out.append(Case(route, f"{'.'.join(map(str, first))} = {str(a)[:30]!r}, {'.'.join(map(str, second))} = {str(b)[:30]!r}",
                            _field_names(first) + _field_names(second), None, _dumps(_set(_set(base, first, a), second, b)),
                            "application/json"))
        elif paths and kind < 0.7:
            path = rng.choice(paths)
            value = pick(path)
            shown = value if isinstance(value, str) and 0 < len(value) < 40 else None
            out.append(Case(route, f"{'.'.join(map(str, path))} = {str(value)[:40]!r}", _field_names(path), shown,
                            _dumps(_set(base, path, value)), "application/json"))
        elif kind < 0.75:  # the query parameters vLLM's routes read (mode, level, tags, ...)
            out.append(Case(route, "hostile query", (), None, _dumps(base), "application/json", rng.choice(HOSTILE_QUERIES)))
        elif kind < 0.8:
            body = {**base, rng.choice(["zz_unknown", "__proto__", "", "x" * 300]): rng.choice(values)}
            out.append(Case(route, "unknown field", (), None, _dumps(body), "application/json"))
        else:
            content, ctype = rng.choice(RAW_BODIES)
            out.append(Case(route, f"raw {content[:30]!r} as {ctype or 'none'}", (), None, content, ctype))
    return out


# ---- fixtures -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, num_pages=96) as eng:
        yield eng


@pytest.fixture(scope="module")
def server(engine, tmp_path_factory):
    saved = os.environ.get("SGLANG_TORCH_PROFILER_DIR")
    os.environ["SGLANG_TORCH_PROFILER_DIR"] = str(tmp_path_factory.mktemp("fuzz_profiles"))  # start_profile's default folder
    try:
        with ServerThread(create_app(engine, served_model_name="tiny", body_timeout_s=BODY_TIMEOUT_S)) as srv:
            yield srv
    finally:
        if saved is None:
            del os.environ["SGLANG_TORCH_PROFILER_DIR"]
        else:
            os.environ["SGLANG_TORCH_PROFILER_DIR"] = saved



def engine_state(engine) -> tuple:
    load = engine.get_load()
    return load.weight_version, load.paused, tuple(load.memory_released), engine.scheduler.profiler.run is not None


def restore(engine, state: tuple) -> None:
    """Put back what an accepted stateful request changed (pause, released memory, version, a profile, the collector)."""
    version, paused, released, profiling = state
    gc.unfreeze()
    if engine.scheduler.profiler.run is not None and not profiling:
        assert engine.stop_profile().success
    load = engine.get_load()
    if load.memory_released and not released:
        assert engine.resume_memory_occupation(list(load.memory_released)).success
    engine.end_weight_update(abort=True)  # closes a session a /begin_weight_update opened (a no-op otherwise)
    if load.paused and not paused:
        assert engine.continue_generation().success
    if engine.weight_version != version:
        assert engine.update_weight_version(version, abort_all_requests=False).success


def error_text(reply: httpx.Response) -> str:
    """The reason of a refusal, whatever its shape: OpenAI's {error: {message, param}}, SGLang's
    {success: false, message}, AReaL's, vLLM's."""
    try:
        body = reply.json()
    except ValueError:
        return ""
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        err = body["error"]
        return f"{err.get('message') or ''} [param={err.get('param')}]"
    if isinstance(body, dict):
        return str(body.get("message") or body.get("detail") or "")
    return ""


# what a refusal may call a field instead of its own name: the prompt (token ids), a memory tag, a group
ALIASES = {"token_ids": ("prompt",), "input_ids": ("prompt",), "text": ("prompt",), "tags": ("tag", "released"), "group_name": ("group",),
           "name": ("parameter",), "shm_name": ("block",), "role": ("prompt",), "content": ("prompt",), "sampling_params": ("sampling parameter",)}


def names(text: str, case: Case) -> bool:
    low = text.lower()
    return (any(field.lower() in low or any(alias in low for alias in ALIASES.get(field, ())) for field in case.fields)
            or (case.value is not None and case.value.lower() in low))


# ---- the fuzz ------------------------------------------------------------------------------------------


def test_every_route_survives_hostile_bodies(server, http, engine):
    app_routes = {}
    for r in server.server.config.app.routes:
        for method in getattr(r, "methods", None) or ():
            app_routes.setdefault(r.path, set()).add(method)
    bases = base_bodies()
    post_routes = sorted(path for path, methods in app_routes.items() if "POST" in methods)
    assert set(post_routes) <= set(bases), f"give these new routes a base body here: {sorted(set(post_routes) - set(bases))}"

    baseline = http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY}).json()
    state0 = engine_state(engine)
    digest0 = engine.check_weights("checksum").digest
    rng = random.Random(SEED)
    failures: list[str] = []

    def check_alive(after: str) -> None:
        wait_idle(engine)
        again = http.post("/generate", json={"text": PROMPT, "sampling_params": GREEDY})
        if again.status_code != 200 or again.json()["output_ids"] != baseline["output_ids"]:
            failures.append(f"after {after}: /generate answers {again.status_code} {again.text[:200]}")

    for route in post_routes:
        cases: list[tuple[Case, tuple]] = []
        t_route = time.monotonic()
        for base in [bases[route]] + ([ALTERNATES[route]] if route in ALTERNATES else []):
            ref = http.post(route, json=base)
            ref_key = (ref.status_code, error_text(ref))
            if route in STATEFUL and ref.is_success:
                restore(engine, state0)
            cases.extend((case, ref_key) for case in cases_for(route, base, rng, per_route=PER_ROUTE))
        for case, ref_key in cases:
            try:
                headers = {"content-type": case.content_type} if case.content_type else {}
                reply = http.post(f"{route}?{case.query}" if case.query else route, content=case.content, headers=headers)
            except httpx.TransportError as exc:  # no reply in 30 s, or the server dropped the connection
                failures.append(f"{route} [{case.desc}]: no reply: {type(exc).__name__}: {exc}")
                continue
            label = f"{route} [{case.desc}] -> {reply.status_code}"
            if reply.status_code >= 500:
                failures.append(f"{label}: {reply.text[:300]}")
            elif reply.status_code >= 400:
                text = error_text(reply)
                if len(reply.content) > MAX_ERROR_BYTES:
                    failures.append(f"{label}: a {len(reply.content)}-byte refusal (it echoes the hostile value back)")
                elif not text.strip():
                    failures.append(f"{label}: refusal without a reason: {reply.text[:200]!r}")
                elif case.fields and (reply.status_code, text) != ref_key and not names(text, case):
                    failures.append(f"{label}: refusal does not name {case.fields[0]!r}: {text[:300]}")
            elif reply.headers.get("content-type", "").startswith("application/json"):
                try:
                    reply.json()
                except ValueError:
                    failures.append(f"{label}: a 2xx reply that is not JSON: {reply.text[:200]!r}")
            now = engine_state(engine)
            if now != state0:
                if reply.is_success and route in STATEFUL:
                    restore(engine, state0)
                else:
                    failures.append(f"{label}: state changed {state0} -> {now}")
                    restore(engine, state0)
        check_alive(route)
        if os.environ.get("HOTSWAP_FUZZ_TIMING"):
            print(f"{route}: {time.monotonic() - t_route:.2f} s")

    # the same kind of cases, 48 at once from 8 clients: refusals and generations interleave in the engine
    crowd = [c for route in post_routes if route not in STATEFUL for c in cases_for(route, bases[route], rng, per_route=2)]
    rng.shuffle(crowd)

    def send(case: Case) -> str | None:
        headers = {"content-type": case.content_type} if case.content_type else {}
        try:
            reply = httpx.post(server.url + case.route + (f"?{case.query}" if case.query else ""), content=case.content, headers=headers,
                               timeout=60)
        except httpx.TransportError as exc:
            return f"{case.route} [{case.desc}] concurrently: no reply: {type(exc).__name__}: {exc}"
        return f"{case.route} [{case.desc}] concurrently -> {reply.status_code}: {reply.text[:200]}" if reply.status_code >= 500 else None

    with ThreadPoolExecutor(8) as pool:
        failures.extend(f for f in pool.map(send, crowd[:48]) if f)
    if engine_state(engine) != state0:
        failures.append(f"concurrent cases changed the state {state0} -> {engine_state(engine)}")
        restore(engine, state0)
    check_alive("concurrent cases")

    # GET routes with hostile query strings
    for path, methods in sorted(app_routes.items()):
        if "GET" not in methods:
            continue
        url = path.replace("{model_id:path}", "tiny")
        for query in HOSTILE_QUERIES:
            reply = http.get(f"{url}?{query}")
            if reply.status_code >= 500 and not (reply.status_code == 503 and path in ("/health", "/health_generate")):
                failures.append(f"GET {url}?{query[:40]} -> {reply.status_code}: {reply.text[:300]}")
    restore(engine, state0)  # SGLang's GET forms of /start_profile and /freeze_gc act (on an empty body)
    check_alive("GET routes")

    assert engine_state(engine) == state0
    assert engine.check_weights("checksum").digest == digest0
    assert engine.check_invariants().success
    assert not failures, f"{len(failures)} hostile request(s) misbehaved:\n" + "\n".join(failures)


# ---- the defects the fuzz found, one by one -----------------------------------------------------------


@pytest.mark.parametrize("route, field", [("/update_weights_from_disk", "model_path"), ("/update_weights", "weight_dir"),
                                          ("/areal_update_weights", "model_path")])
def test_an_unusable_path_is_refused_by_name(http, engine, route, field):
    """A folder name longer than the file system allows made stat() raise: a 500 with a traceback."""
    reply = http.post(route, json={field: "m" * 5000})
    assert reply.status_code == 400, reply.text[:300]
    assert field in error_text(reply) and "usable path" in error_text(reply)
    assert len(reply.content) < MAX_ERROR_BYTES


@pytest.mark.parametrize("route", ["/reset_prefix_cache", "/update_weights"])
def test_optional_json_bodies_refuse_deep_nesting(http, route):
    """vLLM's routes with an optional body parsed it with json.loads, whose RecursionError was a 500."""
    reply = http.post(route, content=b"[" * 100_000 + b"]" * 100_000, headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "malformed JSON" in error_text(reply), reply.text[:300]
    reply = http.post(route, content=b"[1]", headers={"content-type": "application/json"})
    assert reply.status_code == 400 and "object" in error_text(reply)


def test_a_descriptor_name_that_is_not_a_string_is_refused_by_name(http, engine):
    """The remembered-call cache hashed each descriptor's name: a dict there raised TypeError in the scheduler."""
    digest = engine.check_weights("checksum").digest
    bad = {"name": {"a": 1}, "kind": "shm", "shm_name": "x", "offset": 0, "dtype": "float32", "shape": [64]}
    reply = http.post("/update_weights_from_tensor", json={"named_tensors": [bad, {**bad, "name": ["model.norm.weight"]}]})
    assert reply.status_code == 400 and "name must be a non-empty string" in reply.json()["message"], reply.text
    assert engine.check_weights("checksum").digest == digest


@pytest.mark.parametrize("field, value", [("master_port", 70000), ("master_port", 0), ("world_size", 2**40), ("timeout_s", 1e308),
                                          ("timeout_s", "Infinity")])
def test_group_join_arguments_out_of_range_are_refused_before_joining(http, field, value):
    """A world size past 32 bits reached torch (TypeError after the join started), an infinite timeout overflowed
    timedelta, a port past 65535 was dialled: each is refused up front, by name, at once."""
    body = {"master_address": "127.0.0.1", "master_port": 29999, "rank_offset": 1, "world_size": 2, "group_name": "bounds",
            "backend": "gloo", "timeout_s": 0.5, field: value}
    start = time.monotonic()
    reply = http.post("/init_weights_update_group", content=_dumps(body).replace(b'"Infinity"', b"Infinity"),
                      headers={"content-type": "application/json"})
    assert reply.status_code == 400 and field in reply.json()["message"], reply.text
    assert time.monotonic() - start < 2.0
    assert http.post("/destroy_weights_update_group", json={"group_name": "bounds"}).status_code == 400  # nothing was joined


@pytest.mark.parametrize("field", ["max_tokens", "min_tokens"])
def test_vllm_generate_names_vllm_fields(http, field):
    """/inference/v1/generate renames max_tokens and min_tokens for the engine, whose refusal named its own fields."""
    reply = http.post("/inference/v1/generate", json={"token_ids": [5, 6], "sampling_params": {field: "many"}})
    assert reply.status_code == 400 and error_text(reply).startswith(f"{field} must be"), reply.text


@pytest.mark.parametrize("body, field", [({"max_completion_tokens": 600}, "max_completion_tokens"), ({"max_tokens": 600}, "max_tokens"),
                                         ({"min_tokens": -1}, "min_tokens")])
def test_openai_chat_names_the_field_it_was_sent(http, body, field):
    """A context overflow from max_completion_tokens was reported as max_tokens; a negative min_tokens as the
    engine's min_new_tokens."""
    reply = http.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **body})
    assert reply.status_code == 400 and field in error_text(reply), reply.text
    assert reply.json()["error"]["param"] in (field, "min_tokens")


@pytest.mark.parametrize("route, body", [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "min_tokens": 5}),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 4, "min_tokens": 5}),
    ("/inference/v1/generate", {"token_ids": [5, 6], "sampling_params": {"max_tokens": 4, "min_tokens": 5}}),
    ("/generate", {"text": "hi", "sampling_params": {"max_new_tokens": 4, "min_new_tokens": 5}})])
def test_min_tokens_above_max_tokens_is_refused_under_the_routes_names(http, route, body):
    """SGLang's and vLLM's rule (min at most max), named as each route's body names the fields."""
    reply = http.post(route, json=body)
    want = "min_new_tokens" if route == "/generate" else "min_tokens"
    assert reply.status_code == 400 and f"{want} (5) must be at most" in error_text(reply), reply.text


@pytest.mark.parametrize("bad_id", [512, 2**63 - 1, 2**63 + 5])
def test_stop_token_ids_outside_the_vocabulary_are_refused(http, engine, bad_id):
    """With min_new_tokens the stop ids index the logits (they are masked): an id past the vocabulary failed the
    whole batch in the scheduler ('internal error' abort; on a GPU an out-of-bounds index)."""
    sp = {"max_new_tokens": 4, "temperature": 0, "min_new_tokens": 3, "stop_token_ids": [7, bad_id]}
    reply = http.post("/generate", json={"text": PROMPT, "sampling_params": sp})
    assert reply.status_code == 400 and "stop_token_ids" in error_text(reply), reply.text[:300]
    reply = http.post("/inference/v1/generate", json={"token_ids": [5, 6], "sampling_params": {"max_tokens": 2, "min_tokens": 1,
                                                                                                "stop_token_ids": [bad_id]}})
    assert reply.status_code == 400 and "stop_token_ids" in error_text(reply), reply.text[:300]
    assert engine.check_invariants().success


def test_stop_lists_are_bounded(http):
    """Every stop string is searched for after every token on the scheduler thread: 200k of them (a 2 MB body)
    stalled every request for seconds per hundred tokens."""
    base = {"text": PROMPT, "sampling_params": {**GREEDY, "stop": [f"zq{i}" for i in range(1024)]}}
    assert http.post("/generate", json=base).status_code == 200
    for key, many in (("stop", [f"zq{i}" for i in range(1025)]), ("stop_token_ids", [7] * 1025)):
        reply = http.post("/generate", json={"text": PROMPT, "sampling_params": {**GREEDY, key: many}})
        assert reply.status_code == 400 and "at most 1024" in error_text(reply), reply.text[:300]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("bad_id", [-1, 512, 2**64])
def test_echo_of_out_of_vocabulary_token_ids_is_refused(http, engine, stream, bad_id):
    """/v1/completions decoded an echoed token-id prompt before the engine had checked its ids: the tokenizer's
    OverflowError was a 500 (and the connection was dropped)."""
    reply = http.post("/v1/completions", json={"prompt": [[5, bad_id]], "echo": True, "max_tokens": 2, "stream": stream})
    assert reply.status_code == 400 and "prompt 0 holds token ids outside the vocabulary" in error_text(reply), reply.text[:300]
    ok = http.post("/v1/completions", json={"prompt": [[5, 6]], "echo": True, "max_tokens": 2, "temperature": 0})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"].startswith(engine.tokenizer.decode([5, 6]))


@pytest.mark.parametrize("route, body", [
    ("/generate", {"text": "hi", "sampling_params": {"temperature": BIG_TEXT}}),
    ("/destroy_weights_update_group", {"group_name": BIG_TEXT}),
    ("/get_weights_by_name", {"name": BIG_TEXT}),
    ("/generate", {"text": "hi", "sampling_params": {"spaces_between_special_tokens": BIG_TEXT}}),
    ("/end_weight_update", {"session_id": BIG_TEXT}),
    ("/update_weights_from_disk", {"model_path": "/", "session_id": BIG_TEXT}),
    ("/get_weights_by_name", {"name": "model.norm.weight", "truncate_size": -(10**4200)}),
])
def test_refusals_do_not_echo_the_hostile_value(http, route, body):
    """Refusals quoted the client's value whole: a 1 MB group name came back as a 1 MB error."""
    reply = http.post(route, json=body)
    assert 400 <= reply.status_code < 500 and error_text(reply)
    assert len(reply.content) < MAX_ERROR_BYTES, f"{len(reply.content)}-byte refusal"


# ---- transport: slow bodies, closed connections, aborts ---------------------------------------------------


def _raw(server, head: bytes) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=10)
    sock.sendall(head)
    return sock


def _request_head(path: str, length: int) -> bytes:
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {length}\r\n\r\n").encode()


@pytest.mark.parametrize("path", ["/generate", "/abort_request", "/update_weights_from_disk"])
def test_a_body_that_trickles_in_is_refused_with_408(server, engine, path):
    """A client that sends its body a byte at a time held its connection and handler forever (no read bound)."""
    body = json.dumps({"text": PROMPT, "rid": "slow", "model_path": "/nonexistent"}).encode()
    sock = _raw(server, _request_head(path, len(body)))
    start = time.monotonic()
    try:
        reply = b""
        for byte in body:  # one byte every 50 ms: the whole body would take longer than the limit
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                break
            sock.settimeout(0.05)
            try:
                reply = sock.recv(4096)
            except TimeoutError:
                continue
            if reply:
                break
        sock.settimeout(10)
        while b"\r\n\r\n" not in reply:
            reply += sock.recv(4096)
    finally:
        sock.close()
    assert reply.startswith(b"HTTP/1.1 408"), reply[:200]
    assert BODY_TIMEOUT_S - 0.1 < time.monotonic() - start < BODY_TIMEOUT_S + 3
    wait_idle(engine)


def test_a_client_gone_mid_body_is_a_disconnect_not_a_server_error(server, http, engine, caplog):
    """Closing the connection before the body was in raised starlette's ClientDisconnect out of every route: an
    'unhandled error' traceback and a 500 in the request counters."""
    metrics = server.server.config.app.state.hotswap.metrics
    before = metrics.disconnects
    caplog.set_level(logging.ERROR)
    for path in ("/generate", "/v1/completions", "/update_weights_from_disk"):
        sock = _raw(server, _request_head(path, 200) + b'{"text": "abc')
        time.sleep(0.1)
        sock.close()
    deadline = time.monotonic() + 30
    while metrics.disconnects < before + 3:
        assert time.monotonic() < deadline, f"disconnects {metrics.disconnects - before} of 3"
        time.sleep(0.02)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
    assert not [k for k, n in metrics.http_requests.items() if k[2] >= 500 and n]
    wait_idle(engine)


def test_a_reset_mid_stream_aborts_every_fanned_out_request_and_frees_the_cache(server, http, engine):
    """An SSE stream of 2 prompts x n=3 whose client resets the connection after the first chunk: all six
    engine requests are aborted and their pages come back (the prefix cache then flushes to an empty pool)."""
    sock = _raw(server, _request_head("/v1/completions", len(SIX_STREAMS_BODY)) + SIX_STREAMS_BODY)
    read_first_event(sock)
    assert engine.get_load().num_running + engine.get_load().num_waiting == 6
    close_with_reset(sock)
    wait_idle(engine)
    assert engine.flush_cache().success
    assert engine.get_load().kv_pages_used == 0
    assert engine.check_invariants().success


def test_concurrent_aborts_of_one_rid(server, http, engine):
    """Eight clients abort the same running request at once (and one aborts all): it ends once, with
    finish reason abort and its tokens so far; the rid is free again afterwards and the engine is clean."""
    result: dict = {}
    body = {"text": PROMPT, "rid": "shared-rid", "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
    runner = threading.Thread(target=lambda: result.update(reply=httpx.post(server.url + "/generate", json=body, timeout=60)))
    runner.start()
    deadline = time.monotonic() + 10
    while engine.get_load().num_running == 0:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    assert http.post("/generate", json=body).status_code == 400  # the rid is taken while it runs
    go = threading.Barrier(9)
    statuses: list[int] = []

    def abort(payload: dict) -> None:
        go.wait()
        statuses.append(httpx.post(server.url + "/abort_request", json=payload, timeout=30).status_code)

    aborters = [threading.Thread(target=abort, args=({"rid": "shared-rid"},)) for _ in range(8)]
    aborters.append(threading.Thread(target=abort, args=({"abort_all": True},)))
    for t in aborters:
        t.start()
    for t in aborters:
        t.join(30)
    runner.join(30)
    assert statuses == [200] * 9
    out = result["reply"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "abort"
    assert 0 < len(out["output_ids"]) < 400
    wait_idle(engine)
    assert engine.check_invariants().success
    again = http.post("/generate", json={**body, "sampling_params": GREEDY})
    assert again.status_code == 200 and again.json()["meta_info"]["id"] == "shared-rid"


def test_small_replies_are_not_held_back_by_nagle(server):
    """The listening socket was made with proto 0, so asyncio left Nagle on for every connection: a reply written
    as headers then body waited ~40 ms for the client's delayed ACK (each non-streaming reply, each SSE chunk)."""
    sock = socket.create_connection((server.host, server.port), timeout=10)
    gaps = []
    try:
        for _ in range(7):
            sock.sendall(b"GET /v1/models HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            start, data = time.perf_counter(), b""
            while not data.endswith(b"}"):
                data += sock.recv(65536)
            gaps.append(time.perf_counter() - start)
    finally:
        sock.close()
    assert sorted(gaps)[3] < 0.02, f"replies took {[round(g * 1000, 1) for g in gaps]} ms"


def test_access_refusals_do_not_echo_the_hostile_value(engine, tmp_path):
    """The access policy quoted a refused Host, Origin or Content-Type header or save path whole (a save path may be
    as long as the body limit)."""
    policy = AccessPolicy(save_roots=(str(tmp_path),))
    with ServerThread(create_app(engine, served_model_name="tiny", policy=policy)) as srv, \
            httpx.Client(base_url=srv.url, timeout=30) as client:
        replies = [client.get("/get_model_info", headers={"Host": "h" * 10000}),
                   client.get("/get_model_info", headers={"Origin": "https://" + "o" * 10000}),
                   client.post("/save_sharded_model", json={"path": "/" + BIG_TEXT}),
                   client.post("/flush_cache", content=b"{}", headers={"Content-Type": "text/" + "c" * 10000})]
    for reply in replies:
        assert reply.status_code in (403, 415) and error_text(reply), reply.text[:300]
        assert len(reply.content) < MAX_ERROR_BYTES, f"{len(reply.content)}-byte refusal"
