"""Whole call sequences of the RL frameworks' newest code (docs/framework_calls.md section 12), replayed over HTTP
with each framework's payloads and read back as its code reads them: the order, the concurrency and the retries are
the framework's, not one call at a time."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import httpx
from engine_support import generate_in_background, make_engine, wait_idle
from safetensors.torch import load_file
from test_sglang_payloads import file_system_sharing, flattened_bucket, serialize, sglang_names  # noqa: F401

PROMPT = list(range(3, 15))
GREEDY = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}


def greedy_ids(client: httpx.Client) -> list[int]:
    r = client.post("/generate", json={"input_ids": PROMPT, "sampling_params": GREEDY})
    r.raise_for_status()
    return r.json()["output_ids"]


def miles_flush_cache(client: httpx.Client) -> int:
    """miles `sglang_engine.py::flush_cache`: GET /flush_cache until 200, at most 60 tries a second apart, else
    TimeoutError (the trainer step fails). Returns the tries it took."""
    for attempt in range(1, 61):
        if client.get("/flush_cache").status_code == 200:
            return attempt
        time.sleep(1)
    raise TimeoutError("Timeout while flushing cache")


def miles_make_request(client: httpx.Client, endpoint: str, payload: dict | None = None) -> dict:
    """miles `sglang_engine.py::_make_request`: POST json=payload or {}, raise_for_status, response.json()."""
    r = client.post(f"/{endpoint}", json=payload or {})
    r.raise_for_status()
    return r.json()


def test_miles_fsdp_colocated_update_with_a_request_in_flight(served, tiny_qwen3_v2, sglang_names):  # noqa: F811
    """miles `backends/fsdp_utils/update_weight_utils.py::UpdateWeight.update_weights` with `UpdateWeightFromTensor`:
    `pause_generation` (miles' default mode "retract") and `flush_cache` sent together, `begin_weight_update
    {selector}`, then per dtype bucket `update_weights_from_tensor {serialized_named_tensors, load_format:
    "flattened_bucket", flush_cache: false, selector, weight_version}` each followed by a `flush_cache` (GET,
    retried), then `end_weight_update {}` and `continue_generation {}`; `get_weight_version` reads `/model_info`
    first, and `update_weight_version {new_version, abort_all_requests: false}` renames the weights. A request
    running when the pause came is retracted, recomputed under the new weights after continue, and finishes."""
    eng, c = served
    with make_engine(tiny_qwen3_v2) as ref:
        want = ref.generate(input_ids=PROMPT, sampling_params=GREEDY)["output_ids"]
    long = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True},
            "return_logprob": True}
    rollout, results = generate_in_background(eng, c, long)

    flushed: dict = {}  # miles ray.get()s the pause and the flush futures together: the flush may come first
    flusher = threading.Thread(target=lambda: flushed.setdefault("tries", miles_flush_cache(c)))
    flusher.start()
    c.post("/pause_generation", json={"mode": "retract"}).raise_for_status()
    flusher.join()
    assert flushed["tries"] <= 2, "a flush after a retract pause must succeed"
    assert miles_make_request(c, "begin_weight_update", {"selector": "all"})["success"] is True

    new = {}
    for shard in sorted(Path(tiny_qwen3_v2).glob("*.safetensors")):
        new.update(load_file(shard))
    names = sorted(new)
    for part in (names[: len(names) // 2], names[len(names) // 2:]):  # buckets bounded by update_weight_buffer_size
        payload = serialize(flattened_bucket([(n, new[n]) for n in part]), output_str=True)
        reply = miles_make_request(c, "update_weights_from_tensor", {"serialized_named_tensors": [payload],
                                                                      "load_format": "flattened_bucket", "flush_cache": False,
                                                                      "selector": "all", "weight_version": "1"})
        assert reply.get("success", True), reply.get("error_message") or reply.get("message")
        assert miles_flush_cache(c) == 1  # inside the open session, with the retracted request waiting
    assert miles_make_request(c, "end_weight_update", {})["success"] is True
    c.post("/continue_generation", json={}).raise_for_status()

    rollout.join(timeout=60)
    assert not rollout.is_alive()
    out = results["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 400
    assert out["meta_info"]["weight_version"] == "1"
    assert [tid for _, tid, _ in out["meta_info"]["output_token_logprobs"]] == out["output_ids"]
    assert c.get("/model_info").json()["weight_version"] == "1"  # miles' get_weight_version: /model_info first
    assert greedy_ids(c) == want

    reply = miles_make_request(c, "update_weight_version", {"new_version": "2", "abort_all_requests": False})
    assert reply["success"] is True and reply["new_version"] == "2"
    assert c.get("/model_info").json()["weight_version"] == "2"
    wait_idle(eng)


def slime_agent_sampling_params(body: dict, max_context_tokens: int, prompt_len: int) -> dict:
    """slime `agent/adapters/common.py::_sampling_params` over the rollout's defaults (`rollout/sglang_rollout.py::
    GenerateState.sampling_params`, given to `open_session` as sampling_defaults by `examples/coding_agent_rl`), for
    an Anthropic body (`max_token_keys = ("max_tokens",)`, `stop_keys = ("stop_sequences",)`), then
    `call_sglang_generate`'s context cap."""
    sp = {"skip_special_tokens": False, "spaces_between_special_tokens": False, "no_stop_trim": True, "temperature": 1.0,
          "top_p": 1.0, "top_k": -1, "max_new_tokens": 400, "stop": None, "stop_token_ids": None}
    if body.get("max_tokens") is not None:
        sp["max_new_tokens"] = min(int(sp["max_new_tokens"]), int(body["max_tokens"]))
    for key in ("temperature", "top_p", "top_k"):
        if key in body:
            sp[key] = body[key]
    if body.get("stop_sequences"):
        sp["stop"] = body["stop_sequences"]
    sp["max_new_tokens"] = min(int(sp["max_new_tokens"]), max_context_tokens - prompt_len)
    return sp


def test_slime_agent_adapter_turns_a_cut_turn_and_the_offload_after_it(served):
    """slime `agent/adapters/common.py::call_sglang_generate` (the Anthropic / OpenAI proxy its coding-agent recipe
    runs Claude Code or Codex against): each turn POSTs `/generate {rid, input_ids, sampling_params, return_logprob:
    true}` with an `X-SMG-Routing-Key` header and reads `output_token_logprobs` (`x[1]` ids, `float(x[0])`) and
    `finish_reason.type`; a turn whose client goes away is aborted with `/abort_request {rid}` (fire and forget, the
    request may be gone already), and the recipe's comment says why: an in-flight /generate would make the next
    `release_memory_occupation` fail. slime's release is `flush_cache` (GET, retried) then `POST
    /release_memory_occupation {}` (every tag); `ray/rollout.py::onload_weights` then `onload_kv` resume `["weights"]`,
    then `["kv_cache", "cuda_graph"]`."""
    eng, c = served
    body = {"max_tokens": 6, "temperature": 0.0, "top_k": None, "stop_sequences": ["\n\nHuman:"]}
    rid = "turn-1"
    r = c.post("/generate", headers={"X-SMG-Routing-Key": "sid-1"},
               json={"rid": rid, "input_ids": PROMPT, "sampling_params": slime_agent_sampling_params(body, 512, len(PROMPT)),
                     "return_logprob": True})
    assert r.status_code == 200, r.text
    meta = r.json().get("meta_info") or {}
    ids = [x[1] for x in meta.get("output_token_logprobs") or []]
    assert ids == r.json()["output_ids"] and len(ids) == 6 and all(isinstance(float(x[0]), float) for x in meta["output_token_logprobs"])
    assert ((meta.get("finish_reason") or {}).get("type", "stop") or "stop") == "length"
    assert ids == greedy_ids(c)[:6]

    long = {"max_tokens": 400, "temperature": 1.0}
    with httpx.Client(base_url=str(c.base_url), timeout=httpx.Timeout(60, read=0.2)) as impatient:
        try:  # the agent's client gives up on the turn (400 tokens take seconds here; either way what follows holds)
            impatient.post("/generate", json={"rid": "turn-2", "input_ids": PROMPT, "return_logprob": True,
                                              "sampling_params": slime_agent_sampling_params(long, 4096, len(PROMPT)) | {"ignore_eos": True}})
        except httpx.ReadTimeout:
            pass
    assert c.post("/abort_request", json={"rid": "turn-2"}).status_code == 200
    assert c.post("/abort_request", json={"rid": "turn-2"}).status_code == 200  # again: gone already, still 200
    assert miles_flush_cache(c) <= 2  # slime's flush_cache has the same 60 x 1 s loop
    assert miles_make_request(c, "release_memory_occupation")["success"] is True
    assert miles_make_request(c, "resume_memory_occupation", {"tags": ["weights"]})["success"] is True
    assert miles_make_request(c, "resume_memory_occupation", {"tags": ["kv_cache", "cuda_graph"]})["success"] is True
    assert greedy_ids(c)[:6] == ids
    wait_idle(eng)


def test_miles_megatron_update_names_its_version_inside_the_open_session(served, tiny_qwen3_v2, sglang_names):  # noqa: F811
    """miles `update_weight_from_distributed/mixin.py`: `_pause_and_prepare_engines` pauses in
    `--pause-generation-mode` (the fully-async recipe runs `in_place`: "retract can deadlock flush_cache"), flushes only
    when the mode is not in_place, and opens `begin_weight_update {selector}`; the buckets carry no weight_version;
    `_finalize_and_resume_engines` sends `update_weight_version {new_version, abort_all_requests: false}` while the
    session is still open, then `end_weight_update {}` and `continue_generation {}`. The request frozen in place goes
    on after continue; its tokens from then on are labelled with the version named inside the session."""
    eng, c = served
    new = {}
    for shard in sorted(Path(tiny_qwen3_v2).glob("*.safetensors")):
        new.update(load_file(shard))
    results: dict = {}
    long = {"input_ids": PROMPT, "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
    rollout = threading.Thread(target=lambda: results.setdefault("r", c.post("/generate", json=long)))
    rollout.start()
    deadline = time.monotonic() + 20
    while (load := eng.get_load()).num_running < 1 or load.num_steps < 2:  # decoding (a fresh engine: step 1 was its prefill)
        assert time.monotonic() < deadline, "the rollout request never started decoding"
        time.sleep(0.01)

    c.post("/pause_generation", json={"mode": "in_place"}).raise_for_status()
    assert miles_make_request(c, "begin_weight_update", {"selector": "all"})["success"] is True
    payload = serialize(flattened_bucket(sorted(new.items())), output_str=True)
    reply = miles_make_request(c, "update_weights_from_tensor", {"serialized_named_tensors": [payload], "load_format": "flattened_bucket",
                                                                  "flush_cache": False, "selector": "all"})
    assert reply["success"] is True
    reply = miles_make_request(c, "update_weight_version", {"new_version": "3", "abort_all_requests": False})
    assert reply["success"] is True and reply["new_version"] == "3"
    assert eng.get_load().num_running == 1  # abort_all_requests false: the frozen request is still there
    assert miles_make_request(c, "end_weight_update", {})["success"] is True
    c.post("/continue_generation", json={}).raise_for_status()

    rollout.join(timeout=60)
    assert not rollout.is_alive()
    meta = results["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "length" and meta["weight_version"] == "3"
    versions = meta["weight_versions"]  # per output token: the old policy's, then "3" from the continue on
    assert len(versions) == 400 and versions[-1] == "3" and versions[0] != "3"
    assert versions == sorted(versions, key=lambda v: v == "3")
    assert c.get("/model_info").json()["weight_version"] == "3"
    wait_idle(eng)
