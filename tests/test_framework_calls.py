"""What the RL frameworks' newest code sends hotswap's SGLang routes and how it reads the replies, beyond
test_sglang_contract.py: each test replays a framework's requests (its source file named in the docstring,
docs/framework_calls.md section 5 has the details) and parses the reply as that source does."""

from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest
from engine_support import make_engine, wait_idle

from hotswap.engine.unserved import UNSERVED_GENERATE_FIELDS
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread
from hotswap.server.metrics import Metrics

PROMPT = list(range(3, 15))  # 12 token ids
LONG = {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    with make_engine(tiny_qwen3) as eng:
        yield eng


@pytest.fixture
def c(http, engine):
    """The module's server, left as found: generation continues and memory is resident after each test."""
    yield http
    http.post("/continue_generation", json={})
    http.post("/resume_memory_occupation", json={})
    http.post("/abort_request", json={"abort_all": True})
    wait_idle(engine)


def post_in_background(c: httpx.Client, path: str, body: dict) -> tuple[threading.Thread, dict]:
    results: dict = {}
    t = threading.Thread(target=lambda: results.setdefault("r", c.post(path, json=body)))
    t.start()
    return t, results


def wait_for(predicate, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what
        time.sleep(0.01)


def test_set_generate_fields_hotswap_does_not_serve_are_refused_by_name(c, engine):
    """verl `sglang_rollout/http_server_engine.py::HttpServerAdapter.generate` sends `token_ids_logprob` (None
    dropped); verl `async_sglang_server.py::generate` adds `bootstrap_host/port/room` in PD mode; SGLang's
    GenerateReqInput has more (session_params, return_hidden_states, input_embeds, video_data...). hotswap used
    to accept and silently ignore them (a reply without the logprobs asked for); set, each is now a 400 naming
    it, and at its unset value (what frameworks send by default) it passes."""
    body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}, "return_logprob": True}
    for field, value in (("token_ids_logprob", [5, 6]), ("bootstrap_room", 1234), ("session_params", {"id": "s1"}),
                         ("return_hidden_states", True), ("input_embeds", [[0.5] * 4]), ("video_data", ["v.mp4"]),
                         ("return_prompt_token_ids", True)):
        r = c.post("/generate", json={**body, field: value})
        assert r.status_code == 400, (field, r.text)
        assert r.json()["error"]["param"] == field and f"{field!r}" in r.json()["error"]["message"]
    r = c.post("/generate", json={**body, "data_parallel_rank": 1})
    assert r.status_code == 400 and "out of range [0, 1)" in r.json()["error"]["message"]
    unset = {field: None for field in UNSERVED_GENERATE_FIELDS} | {"return_hidden_states": False, "token_ids_logprob": [],
                                                                    "data_parallel_rank": 0, "routed_dp_rank": None}
    r = c.post("/generate", json={**body, **unset, "priority": 0, "log_metrics": True, "no_such_field": 1})
    assert r.status_code == 200, r.text
    meta = r.json()["meta_info"]
    assert [x[1] for x in meta["output_token_logprobs"]] == r.json()["output_ids"] and meta["completion_tokens"] == 2
    assert engine.get_load().num_running == 0


def test_areal_two_step_pause_offload_and_a_request_sent_meanwhile(c, engine):
    """AReaL `areal/engine/sglang_remote.py::get_pause_requests` pauses twice (`{}`: SGLang's abort, then
    `{"mode": "in_place"}`), `rl_trainer.py` then offloads `{"tags": ["kv_cache"]}` and `{"tags": ["weights"]}`,
    later `/resume_memory_occupation {}` and `/continue_generation {}`. The request in flight ends abort with its
    tokens (AReaL re-sends prompt + tokens, `parse_generation_response`). A request that arrives meanwhile waits
    behind the pause as SGLang's tokenizer-manager gate holds every generate, and runs after the continue;
    hotswap used to answer it 503 at once because memory was released."""
    t, first = post_in_background(c, "/generate", {"input_ids": PROMPT, "sampling_params": LONG, "return_logprob": True})
    wait_for(lambda: engine.get_load().num_running == 1, "the first request never ran")
    assert c.post("/pause_generation", json={}).json()["status"] == "ok"
    assert c.post("/pause_generation", json={"mode": "in_place"}).json()["status"] == "ok"
    t.join(30)
    meta = first["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and not meta["finish_reason"].get("message", "").startswith("Abort before prefill")
    tokens = [x[1] for x in meta["output_token_logprobs"]]
    assert 0 < len(tokens) == meta["completion_tokens"] < LONG["max_new_tokens"]
    for tags in (["kv_cache"], ["weights"]):
        assert c.post("/release_memory_occupation", json={"tags": tags}).status_code == 200
    again = {"input_ids": PROMPT + tokens, "sampling_params": {**LONG, "max_new_tokens": 3}, "return_logprob": True}
    t, second = post_in_background(c, "/generate", again)
    wait_for(lambda: engine.get_load().num_waiting == 1, "the request sent while paused never queued")
    time.sleep(0.3)
    assert "r" not in second, second["r"].text  # waits, not refused
    assert c.post("/resume_memory_occupation", json={}).status_code == 200
    assert c.post("/continue_generation", json={}).json()["status"] == "ok"
    t.join(30)
    assert second["r"].status_code == 200, second["r"].text
    assert second["r"].json()["meta_info"]["finish_reason"] == {"type": "length", "length": 3}
    # not paused: a request while memory is released is still refused at once (nothing would ever run it)
    assert c.post("/release_memory_occupation", json={"tags": ["kv_cache"]}).status_code == 200
    assert c.post("/generate", json=again).status_code == 503


def test_a_second_pause_still_aborts_or_retracts(c, engine):
    """SGLang's `tokenizer_manager.py::pause_generation` aborts every request on each abort-mode pause (and the
    scheduler retracts on each retract-mode one), paused already or not: a pause(abort) after a pause(in_place)
    ends the frozen request with its tokens. hotswap answered the second pause as a no-op and left it frozen."""
    t, out = post_in_background(c, "/generate", {"input_ids": PROMPT, "sampling_params": LONG, "rid": "frozen"})
    wait_for(lambda: engine.get_load().num_running == 1, "the request never ran")
    assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    assert c.post("/pause_generation", json={"mode": "retract"}).json()["status"] == "ok"
    assert engine.get_load().num_running == 0 and engine.get_load().num_waiting == 1  # retracted: it will recompute
    r = c.post("/pause_generation", json={"mode": "abort"})
    assert r.status_code == 200 and "aborted 1 request" in r.json()["message"]
    t.join(30)
    meta = out["r"].json()["meta_info"]
    assert meta["id"] == "frozen" and meta["finish_reason"]["type"] == "abort" and meta["completion_tokens"] > 0
    assert "no-op" in c.post("/pause_generation", json={"mode": "abort"}).json()["message"]  # nothing left to abort


def test_prompt_logprob_scoring_as_teachers_ask_for_it(c):
    """Three newest scoring calls, parsed as their code parses them:
    verl `async_sglang_server.py::generate` for the distillation teacher (`teacher_manager.py`: max_tokens 1,
    temperature 1.0, prompt_logprobs K) sends logprob_start_len 0 and top_logprobs_num K, and
    `_extract_prompt_logprobs_sglang` needs len(input_token_logprobs) == prompt length, entry 0's logprob None,
    exactly K (logprob, id, text) entries at every later position; slime `rollout/on_policy_distillation.py` sends
    max_new_tokens 0 with logprob_start_len 0 and reads `input_token_logprobs[1:]`; AReaL
    `sglang_remote.py::build_score_request` sends logprob_start_len len - target - 1, temperature 0,
    top_logprobs_num 0 and `parse_score_response` takes the last `target` logprobs. SGLang sets no limit on
    top_logprobs_num; hotswap refused anything above 20, so verl's teacher (topk 32 by default) failed."""
    k = 32  # verl's distillation.yaml topk (its dataclass default is 128); hotswap capped top_logprobs_num at 20
    verl = {"rid": "teacher-1", "input_ids": PROMPT, "return_logprob": True, "image_data": None, "logprob_start_len": 0,
            "top_logprobs_num": k, "sampling_params": {"temperature": 1.0, "max_new_tokens": 1}}
    out = c.post("/generate", json=verl).json()
    meta = out["meta_info"]
    assert len(meta["input_token_logprobs"]) == len(PROMPT) and meta["input_token_logprobs"][0][0] is None
    assert [tid for _, tid, _ in meta["input_token_logprobs"]] == PROMPT
    for position in range(1, len(PROMPT)):
        top = meta["input_top_logprobs"][position]
        assert len(top) == k and all(isinstance(lp, float) for lp, _, _ in top)
        assert [lp for lp, _, _ in top] == sorted((lp for lp, _, _ in top), reverse=True)
    assert len(meta["output_token_logprobs"]) == len(out["output_ids"]) == 1
    scored = [lp for lp, _, _ in meta["input_token_logprobs"][1:]]

    slime = {"input_ids": PROMPT, "sampling_params": {"temperature": 0.6, "max_new_tokens": 0, "skip_special_tokens": False},
             "return_logprob": True, "logprob_start_len": 0}
    out = c.post("/generate", json=slime).json()
    assert out["output_ids"] == [] and out["meta_info"]["finish_reason"]["type"] == "length"
    teacher = [item[0] for item in out["meta_info"]["input_token_logprobs"][1:]]
    assert teacher == pytest.approx(scored, abs=1e-5)  # prompt logprobs do not depend on the temperature

    target = 4
    areal = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 1, "temperature": 0.0}, "return_logprob": True,
             "logprob_start_len": max(0, len(PROMPT) - target - 1), "top_logprobs_num": 0, "stream": False}
    meta = c.post("/generate", json=areal).json()["meta_info"]
    all_logprobs = [float(x[0]) for x in meta["input_token_logprobs"][1:]]  # AReaL floats them all; [0] may be None
    assert len(meta["input_token_logprobs"]) >= target and all_logprobs[-target:] == pytest.approx(scored[-target:], abs=1e-5)


def test_e2e_latency_histogram_sums_over_front_ends():
    """`sglang:e2e_request_latency_seconds` (SGLang's buckets, metrics/collector.py) counts each finished request's
    meta_info e2e_latency; a scrape through one of several front end processes shows their sum."""
    parser = pytest.importorskip("prometheus_client.parser")
    one, two = Metrics(), Metrics()
    one.observe_generation("/generate", [{"meta_info": {"e2e_latency": 0.15, "finish_reason": {"type": "length"}}}])
    two.observe_generation("/generate", [{"meta_info": {"e2e_latency": 3.0}}, {"meta_info": {}}])  # the last: no latency
    one.absorb(two.snapshot())
    samples = {(s.name, s.labels.get("le")): s.value for f in parser.text_string_to_metric_families(one.render(model_name="m"))
               for s in f.samples if f.name == "sglang:e2e_request_latency_seconds"}
    assert samples[("sglang:e2e_request_latency_seconds_count", None)] == 2
    assert samples[("sglang:e2e_request_latency_seconds_sum", None)] == pytest.approx(3.15)
    assert [samples[("sglang:e2e_request_latency_seconds_bucket", le)] for le in ("0.1", "0.2", "2.0", "4.0", "+Inf")] == [0, 1, 1, 2, 2]


def test_metrics_under_sglang_and_vllm_names(c, engine):
    """miles `dashboard/sglang_scraper.py::_ingest` keeps `sglang:*` samples (":" read as "_") such as
    num_running_reqs, num_queue_reqs, token_usage, prompt_tokens_total, num_requests_total; prime-rl
    `orchestrator/inference_metrics.py::parse_prometheus_text` + `build_load_sample` read `vllm:*` families per
    `engine` label: num_requests_running, num_requests_waiting, kv_cache_usage_perc, num_preemptions_total and
    the KV capacity from `vllm:cache_config_info`'s labels. hotswap exported only `hotswap_*` names, so both saw
    an idle, capacity-less engine."""
    parser = pytest.importorskip("prometheus_client.parser")
    assert c.post("/generate", json={"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}}).status_code == 200
    t, _ = post_in_background(c, "/generate", {"input_ids": PROMPT, "sampling_params": LONG})
    wait_for(lambda: engine.get_load().num_running == 1, "the request never ran")
    assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    text = c.get("/metrics").text

    miles = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            miles[sample.name.replace(":", "_")] = sample.value
    assert miles["sglang_num_running_reqs"] == 1 and miles["sglang_num_queue_reqs"] == 0
    assert 0 < miles["sglang_token_usage"] < 1 and miles["sglang_num_requests_total"] >= 1
    assert miles["sglang_prompt_tokens_total"] >= len(PROMPT) and miles["sglang_generation_tokens_total"] >= 2
    # its whitelist's latency families: SGLang's e2e histogram, observed once per finished request
    assert miles["sglang_e2e_request_latency_seconds_count"] == miles["sglang_num_requests_total"]
    assert 0 < miles["sglang_e2e_request_latency_seconds_sum"] < 60 * miles["sglang_num_requests_total"]

    gauges, counters, cache_config = {}, {}, {}
    for family in parser.text_string_to_metric_families(text):
        if not family.name.startswith("vllm:"):
            continue
        for sample in family.samples:
            assert sample.labels.get("engine", "0") == "0"
            if family.name == "vllm:cache_config_info":
                cache_config.update(sample.labels)
            elif family.type == "gauge":
                gauges[sample.name.removeprefix("vllm:")] = sample.value
            elif family.type == "counter":
                counters[sample.name.removeprefix("vllm:")] = sample.value
    capacity = engine.capacity()
    assert gauges["num_requests_running"] == 1 and gauges["num_requests_waiting"] == 0 and 0 < gauges["kv_cache_usage_perc"] < 1
    assert counters["num_preemptions_total"] == 0 and counters["prompt_tokens_total"] >= len(PROMPT)
    assert int(cache_config["kv_cache_size_tokens"]) == int(cache_config["num_gpu_blocks"]) * int(cache_config["block_size"])
    assert int(cache_config["block_size"]) == capacity.page_size and int(cache_config["kv_cache_size_tokens"]) == capacity.max_total_tokens
    c.post("/abort_request", json={"abort_all": True})
    t.join(30)


def test_prime_rl_renderer_rollout_turns(c, engine):
    """prime-rl's training rollouts go through verifiers `v1/clients/train.py::TrainClient.get_response` and
    `renderers/client.py::generate`: GET /v1/models (the card whose id is the model gives max_model_len), then POST
    /inference/v1/generate {model, token_ids, sampling_params} where sampling_params merges verifiers' extra_body
    into the sampling knobs: prime-rl's `orchestrator/envs.py::_sampling` puts the policy version there as
    `cache_salt`, prime-rl's `configs/orchestrator.py::resolve_env_config` adds `top_k: -1`, `min_p: 0.0` and
    `return_token_ids: true` to every policy env's extra_body, and a bridged multi-turn turn adds
    `routed_experts_prompt_start`; renderers sets logprobs=1, stop_token_ids and skip_special_tokens False. vLLM's
    SamplingParams ignores keys it lacks; hotswap answered 400 "unknown sampling parameter(s): cache_salt", then
    (return_token_ids), so every turn failed. A bad value is still refused by name."""
    card = next(card for card in c.get("/v1/models").json()["data"] if card["id"] == "tiny")
    assert isinstance(card["max_model_len"], int) and card["max_model_len"] > len(PROMPT)
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 4, "logprobs": 1, "top_k": -1, "min_p": 0.0, "return_token_ids": True,
                "cache_salt": "policy-3", "stop_token_ids": engine.eos_token_ids, "skip_special_tokens": False}
    first = c.post("/inference/v1/generate", json={"model": "tiny", "token_ids": PROMPT, "sampling_params": sampling})
    assert first.status_code == 200, first.text
    choice = (first.json().get("choices") or [{}])[0]
    completion_ids = choice.get("token_ids") or []
    completion_logprobs = [float(x.get("logprob") or 0.0) for x in (choice.get("logprobs") or {}).get("content") or []]
    assert len(completion_ids) == len(completion_logprobs) > 0 and choice["finish_reason"] in ("stop", "length")
    assert first.json()["request_id"]
    bridged = PROMPT + completion_ids + [7, 8]
    turn = {**sampling, "routed_experts_prompt_start": len(PROMPT) + len(completion_ids) - 1}
    r = c.post("/inference/v1/generate", json={"model": "tiny", "token_ids": bridged, "sampling_params": turn})
    assert r.status_code == 200, r.text
    for key, bad in (("cache_salt", 3), ("routed_experts_prompt_start", -1)):
        r = c.post("/inference/v1/generate", json={"model": "tiny", "token_ids": PROMPT, "sampling_params": {**sampling, key: bad}})
        assert r.status_code == 400 and r.json()["error"]["param"] == key


def test_health_generate_is_healthy_while_the_batch_is_full(tiny_qwen3, tmp_path):
    """slime `utils/health_monitor.py` (and miles) GET /health_generate every 30 s during rollouts and kill the
    engine when it does not answer 200 within the timeout. SGLang (`http_server.py::health_generate`) answers
    200 once the scheduler outputs anything after the probe was sent, so a saturated engine whose probe
    queues behind a full batch is healthy. hotswap waited for its probe to finish (up to 20 s, then 503):
    here the only slot is taken by a long request and the probe cannot be admitted."""
    long_context = tmp_path / "long"
    shutil.copytree(tiny_qwen3, long_context)
    config = json.loads((long_context / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 16
    (long_context / "config.json").write_text(json.dumps(config))
    with make_engine(long_context, num_pages=1 << 15, max_running_requests=1) as eng, ServerThread(create_app(eng)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as client:
        assert client.get("/health_generate").status_code == 200  # idle: the probe itself runs
        body = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 60_000, "temperature": 0, "ignore_eos": True}, "rid": "long"}
        t, out = post_in_background(client, "/generate", body)
        wait_for(lambda: eng.get_load().num_running == 1, "the long request never ran")
        start = time.monotonic()
        r = client.get("/health_generate", timeout=30)
        assert r.status_code == 200 and time.monotonic() - start < 5
        wait_for(lambda: eng.get_load().num_waiting == 0, "the probe was not withdrawn")
        assert eng.get_load().num_running == 1  # the long request goes on
        client.post("/abort_request", json={"rid": "long"})
        t.join(30)
        assert out["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"


def test_miles_session_chat_turn_with_its_own_prompt_ids(c, engine):
    """miles `rollout/session/core.py::prepare_chat_request` forwards an agent's chat body to SGLang's
    /v1/chat/completions with its token-in/token-out prompt as `input_ids` (SGLang's protocol.py: "bypasses chat
    template tokenization entirely"), logprobs true, return_meta_info true, no_stop_trim false;
    `extract_completion` needs choice.meta_info.output_token_logprobs with one (logprob, id, text) per
    completion token and message.content not None. hotswap ignored input_ids and rendered the messages, so the
    session's tokens and the engine's disagreed. SGLang's chat fields hotswap does not serve (lora_path, set by
    miles with LoRA on; session_params, return_hidden_states...) are refused by name instead of dropped."""
    body = {"model": "tiny", "messages": [{"role": "user", "content": "what is the answer?"}], "input_ids": PROMPT,
            "logprobs": True, "return_meta_info": True, "no_stop_trim": False, "max_tokens": 5, "temperature": 0,
            "chat_template_kwargs": {"enable_thinking": False}}
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    response = r.json()
    choice = response.get("choices", [{}])[0]
    meta_info = choice.get("meta_info")
    assert isinstance(meta_info, dict) and "output_token_logprobs" in meta_info and choice["message"]["content"] is not None
    assert len(meta_info["output_token_logprobs"]) == meta_info["completion_tokens"] == 5
    completion_token_ids = [t[1] for t in meta_info["output_token_logprobs"]]
    assert meta_info["prompt_tokens"] == response["usage"]["prompt_tokens"] == len(PROMPT)
    same = engine.generate(input_ids=PROMPT, sampling_params={"max_new_tokens": 5, "temperature": 0})
    assert completion_token_ids == same["output_ids"]  # the prompt was PROMPT, not the rendered messages
    for field, value in (("lora_path", "miles-lora"), ("session_params", {"id": "s"}), ("return_hidden_states", True)):
        r = c.post("/v1/chat/completions", json={**body, field: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == field, r.text
    r = c.post("/v1/chat/completions", json={**body, "lora_path": None, "return_hidden_states": False, "parallel_tool_calls": True})
    assert r.status_code == 200, r.text


def test_get_load_is_sglangs_per_rank_list(c, engine):
    """sgl-model-gateway, the router slime and miles put in front of the engines (`sglang_router`), polls
    GET /get_load and reads it as SGLang's legacy shim answers it (`http_server.py::get_load`): a JSON array
    with one entry per DP rank, `num_tokens` (used tokens plus pending prefill tokens: what it balances on),
    `num_reqs`, `num_waiting_reqs`. hotswap answered its own LoadOutput dict, which the router cannot read;
    /v1/loads' `num_total_tokens` held the KV capacity instead of used + pending tokens (SGLang's
    GetLoadsReqOutput). hotswap's fields stay beside SGLang's in the entry."""
    assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    t, out = post_in_background(c, "/generate", {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 2}})
    wait_for(lambda: engine.get_load().num_waiting == 1, "the request never queued")
    rows = c.get("/get_load").json()
    assert isinstance(rows, list) and len(rows) == 1
    row = rows[0]
    assert row["dp_rank"] == 0 and row["num_reqs"] == 1 and row["num_waiting_reqs"] == 1
    assert row["num_pending_tokens"] == len(PROMPT) and row["num_tokens"] >= len(PROMPT)
    assert sum(e.get("num_tokens") for e in rows) == row["num_tokens"] and isinstance(row["ts_tic"], float)
    assert row["num_waiting"] == 1 and row["paused"] is True  # hotswap's own fields, beside SGLang's
    entry = c.get("/v1/loads", params={"include": "core"}).json()["loads"][0]
    assert entry["num_total_tokens"] == entry["num_used_tokens"] + len(PROMPT) < entry["max_total_num_tokens"]
    assert c.post("/continue_generation", json={}).status_code == 200
    t.join(30)
    assert out["r"].status_code == 200
    wait_idle(engine)
    row = c.get("/get_load").json()[0]
    assert row["num_reqs"] == row["num_pending_tokens"] == 0


def test_sampling_seed_is_the_request_seed_on_every_path(c, engine):
    """AReaL `sglang_remote.py::build_generation_request` (and its v2 `sglang/bridge.py`) sends SGLang's
    `sampling_params.sampling_seed` when the generation config has a seed. Over HTTP it was read as `seed`; the
    in-process Engine refused it ("unknown sampling parameter(s): sampling_seed"). Now both read it in one place."""
    sp = {"max_new_tokens": 6, "temperature": 1.0, "sampling_seed": 1234}
    first = engine.generate(input_ids=PROMPT, sampling_params=sp)["output_ids"]
    assert engine.generate(input_ids=PROMPT, sampling_params={**sp, "sampling_seed": None, "seed": 1234})["output_ids"] == first
    assert engine.generate(input_ids=PROMPT, sampling_params={**sp, "seed": None})["output_ids"] == first
    r = c.post("/generate", json={"input_ids": PROMPT, "sampling_params": sp})
    assert r.status_code == 200 and r.json()["output_ids"] == first


def test_skyrl_resets_the_prefix_cache_with_running_requests(c, engine):
    """SkyRL `workers/fsdp/fsdp_worker.py` (and `megatron_worker.py`) broadcast weights inside a keep-pause
    (`worker_dispatch.py`: POST /pause?mode=keep&clear_cache=false ... /resume) and, when the prefix cache must go
    (synchronous training, or fully async with clear_kv_cache_on_weight_sync), POST /reset_prefix_cache
    {"reset_running_requests": true}; `remote_inference_client.py::_call_server` raises on a non-2xx. vLLM then
    preempts the running requests (recomputed later) and resets the cache; hotswap answered 409. Now the frozen
    request gives its pages back, is recomputed after /resume and ends as an uninterrupted run does."""
    body = {"model": "tiny", "token_ids": PROMPT, "sampling_params": {"max_tokens": 300, "temperature": 0, "ignore_eos": True, "logprobs": 1}}
    alone = c.post("/inference/v1/generate", json=body).json()["choices"][0]["token_ids"]
    t, out = post_in_background(c, "/inference/v1/generate", body)
    wait_for(lambda: engine.get_load().num_running == 1, "the request never ran")
    r = c.post("/pause", params={"mode": "keep", "clear_cache": "false"})
    assert r.status_code == 200 and r.json() == {"status": "paused"}
    r = c.post("/reset_prefix_cache", json={"reset_running_requests": True})
    assert r.status_code == 200 and r.json() == {"success": True}, r.text
    load = engine.get_load()
    assert (load.num_running, load.num_waiting) == (0, 1)  # retracted: no pages held, recomputed on resume
    assert c.post("/resume").json() == {"status": "resumed"}
    t.join(60)
    choice = out["r"].json()["choices"][0]
    assert choice["finish_reason"] == "length" and choice["token_ids"] == alone
    assert [x["logprob"] for x in choice["logprobs"]["content"]] and engine.reset_prefix_cache() is True
