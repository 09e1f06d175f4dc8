"""vLLM's RL control plane and token-in/token-out calls, replayed as prime-rl, SkyRL and AReaL's vLLM
backend make them (request bodies and reply parsing from their source), over a real loopback server.

Sources (commits in docs/framework_calls.md):
- prime-rl `src/prime_rl/utils/client.py` (`_pause_engines`, `update_weights`, `_resume_engines`, `_admin_post`)
- SkyRL `skyrl/backends/skyrl_train/inference_servers/remote_inference_client.py` (`RemoteInferenceClient`)
  and `engine_utils.py::get_vllm_sampling_params`
- AReaL `areal/engine/vllm_remote.py::VLLMBackend` against `areal/engine/vllm_ext/areal_vllm_server.py`
httpx stands in for SkyRL's aiohttp session: the same method, query parameters and JSON body.
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

PROMPT_IDS = [11, 42, 7, 99, 5, 23]


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4, max_queue_wait_s=30.0)
    yield eng
    eng.shutdown()



@pytest.fixture()
def http(server, engine):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    # every test leaves the engine serving: awake, not paused
    engine.wake_up()
    engine.resume()


def greedy_ids(http: httpx.Client, ids: list[int], n: int = 8) -> list[int]:
    r = http.post("/generate", json={"input_ids": ids, "sampling_params": {"max_new_tokens": n, "temperature": 0, "ignore_eos": True}})
    assert r.status_code == 200, r.text
    return r.json()["output_ids"]


def skyrl_call(http: httpx.Client, endpoint: str, json=None, method: str = "POST", params=None) -> dict:
    """SkyRL `RemoteInferenceClient._call_server`: status checked, body read only when there is one."""
    resp = http.request(method, endpoint, json=json, params=params)
    body = resp.json() if resp.headers.get("content-length", "0") != "0" else None
    if resp.status_code >= 400:
        detail = body.get("error", {}) if body else {}
        raise AssertionError(f"{endpoint} -> {resp.status_code}: {detail.get('message') if isinstance(detail, dict) else detail}")
    return {"status": resp.status_code, "body": body}


class _Background:
    """A long generation running in a thread, so a pause has something in flight."""

    def __init__(self, url: str, max_new_tokens: int = 300):
        self.result: dict | None = None
        body = {"input_ids": PROMPT_IDS, "sampling_params": {"max_new_tokens": max_new_tokens, "temperature": 0, "ignore_eos": True}}
        self.thread = threading.Thread(target=self._run, args=(url, body), daemon=True)
        self.thread.start()

    def _run(self, url: str, body: dict) -> None:
        self.result = httpx.post(url + "/generate", json=body, timeout=120).json()

    def join(self) -> dict:
        self.thread.join(timeout=120)
        assert self.result is not None, "the background generation did not return"
        return self.result


def wait_running(engine: Engine, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while engine.get_load().num_running == 0:
        assert time.monotonic() < deadline, "the request never started"
        time.sleep(0.01)


# ---- prime-rl ---------------------------------------------------------------------------------------


def test_prime_rl_filesystem_update_cycle(http, server, engine, tiny_qwen3, tiny_qwen3_v2):
    """prime-rl `utils/client.py::update_weights`: `_pause_engines` (POST /pause?mode=keep&clear_cache=false),
    POST /update_weights {"weight_dir"} (its server's filesystem route), `_resume_engines` (POST /resume), each
    through `_admin_post` (raise_for_status only). A request in flight is frozen by the keep pause and finishes after."""
    before = greedy_ids(http, PROMPT_IDS)
    bg = _Background(server.url)
    wait_running(engine)
    r = http.post("/pause", params={"mode": "keep", "clear_cache": "false"})
    r.raise_for_status()
    assert r.json() == {"status": "paused"}
    assert http.get("/is_paused").json() == {"is_paused": True}
    assert engine.get_load().num_running == 1  # frozen in place, not aborted
    r = http.post("/update_weights", json={"weight_dir": str(tiny_qwen3_v2)})
    r.raise_for_status()
    assert r.json()["status"] == "ok"
    r = http.post("/resume")
    r.raise_for_status()
    assert r.json() == {"status": "resumed"}
    out = bg.join()
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 300
    assert http.get("/is_paused").json() == {"is_paused": False}
    after = greedy_ids(http, PROMPT_IDS)
    assert after != before  # the new weights serve
    http.post("/update_weights", json={"weight_dir": str(tiny_qwen3)}).raise_for_status()
    assert greedy_ids(http, PROMPT_IDS) == before  # and the old ones come back bit for bit


def test_prime_rl_retries_are_idempotent(http):
    """prime-rl `_admin_post` retries /pause and /resume on transport errors: a second one answers success.
    Its server's GET /liveness answers {"status": "ok"} while the engine loop runs."""
    assert http.get("/liveness").json() == {"status": "ok"}
    for _ in range(2):
        assert http.post("/pause", params={"mode": "keep", "clear_cache": "false"}).json() == {"status": "paused"}
    for _ in range(2):
        assert http.post("/resume").json() == {"status": "resumed"}


def test_update_weights_refusals_change_nothing(http, tmp_path):
    """A missing folder, a folder without weights, and SkyRL's native `{update_info}` are refused by name."""
    before = greedy_ids(http, PROMPT_IDS)
    r = http.post("/update_weights", json={"weight_dir": str(tmp_path / "missing")})
    assert r.status_code == 400 and "weight_dir" in r.json()["error"]["message"]
    (tmp_path / "NCCL_READY").touch()  # prime-rl's NCCL mode marker: no checkpoint in the folder
    r = http.post("/update_weights", json={"weight_dir": str(tmp_path)})
    assert r.status_code == 400
    r = http.post("/update_weights", json={"update_info": {"names": ["x"], "dtype_names": ["bfloat16"], "shapes": [[1]], "packed": True}})
    assert r.status_code == 400 and "update_info" in r.json()["error"]["message"]
    r = http.post("/collective_rpc", json={"method": "skyrl_sleep_for_weight_sync", "kwargs": {}})
    assert r.status_code == 400 and "collective_rpc" in r.json()["error"]["message"]
    assert greedy_ids(http, PROMPT_IDS) == before


# ---- SkyRL ------------------------------------------------------------------------------------------


def skyrl_sampling_params(**overrides) -> dict:
    """`engine_utils.py::get_vllm_sampling_params` for a greedy config (its default `min_tokens: 1` included)."""
    sp = {"min_tokens": 1, "skip_special_tokens": True, "include_stop_str_in_output": True, "max_tokens": 8, "temperature": 0.0,
          "top_p": 1.0, "top_k": -1, "min_p": 0.0, "logprobs": 0, "stop": None, "ignore_eos": True}
    sp.update(overrides)
    return sp


def test_skyrl_generate_tokens(http):
    """SkyRL `RemoteInferenceClient._generate_single`: POST /inference/v1/generate {sampling_params, model,
    token_ids[, cache_salt]} with X-Session-ID; reads choices[0]["token_ids"], ["finish_reason"] and
    ["logprobs"]["content"][i]["logprob"]. Same tokens and logprobs as SGLang's /generate with the same min_tokens (whose
    eos mask holds under ignore_eos too, as in SGLang and vLLM; the logprobs are those of the masked distribution)."""
    payload = {"sampling_params": skyrl_sampling_params(), "model": "tiny", "token_ids": PROMPT_IDS, "cache_salt": "v3"}
    r = http.post("/inference/v1/generate", json=payload, headers={"X-Session-ID": "traj-1"})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    token_ids, stop_reason = choice["token_ids"], choice["finish_reason"]
    response_logprobs = [info["logprob"] for info in choice["logprobs"]["content"]]
    ref = http.post("/generate", json={"input_ids": PROMPT_IDS, "return_logprob": True,
                                       "sampling_params": {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True,
                                                           "min_new_tokens": 1}}).json()
    assert token_ids == ref["output_ids"] and stop_reason == "length"
    assert response_logprobs == pytest.approx([lp for lp, _, _ in ref["meta_info"]["output_token_logprobs"]], abs=1e-5)
    assert [c["token"] for c in choice["logprobs"]["content"]] == [f"token_id:{t}" for t in token_ids]


def test_skyrl_tinker_sample(http):
    """SkyRL `RemoteInferenceClient.sample`: {n, logprobs: 0, output_kind: 2, prompt_logprobs: None, seed,
    temperature, max_tokens, top_k, top_p, stop, stop_token_ids}; reads each choice's token_ids,
    logprobs.content[].logprob and finish_reason, and prompt_logprobs (None when not asked)."""
    sp = {"n": 2, "logprobs": 0, "output_kind": 2, "prompt_logprobs": None, "temperature": 1.0, "max_tokens": 6, "seed": 7,
          "top_k": 5, "top_p": 0.9, "stop": ["zzzz"], "stop_token_ids": [0]}
    r = http.post("/inference/v1/generate", json={"sampling_params": sp, "model": "tiny", "token_ids": PROMPT_IDS})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body.get("prompt_logprobs") is None
    seqs = [{"tokens": c["token_ids"], "logprobs": [lp["logprob"] for lp in c["logprobs"]["content"]], "stop_reason": c.get("finish_reason")}
            for c in body.get("choices", [])]
    assert len(seqs) == 2
    for seq in seqs:
        assert 1 <= len(seq["tokens"]) <= 6 and len(seq["logprobs"]) == len(seq["tokens"])
        assert seq["stop_reason"] in ("stop", "length")
    again = http.post("/inference/v1/generate", json={"sampling_params": sp, "model": "tiny", "token_ids": PROMPT_IDS}).json()
    assert [c["token_ids"] for c in again["choices"]] == [s["tokens"] for s in seqs]  # seeded


def test_generate_tokens_ignore_eos_still_stops_at_stop_token_ids(http):
    """vLLM's ignore_eos skips only EOS: a stop id still ends the request here (SGLang's ignore_eos, on the native
    routes, ignores stop ids too)."""
    first = greedy_ids(http, PROMPT_IDS, n=1)[0]
    sp = skyrl_sampling_params(ignore_eos=True, stop_token_ids=[first], max_tokens=6, min_tokens=0)
    r = http.post("/inference/v1/generate", json={"sampling_params": sp, "token_ids": PROMPT_IDS})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == [first] and r.json()["choices"][0]["finish_reason"] == "stop"
    native = http.post("/generate", json={"input_ids": PROMPT_IDS, "sampling_params": {
        "max_new_tokens": 6, "temperature": 0, "ignore_eos": True, "stop_token_ids": [first]}}).json()
    assert len(native["output_ids"]) == 6 and native["meta_info"]["finish_reason"]["type"] == "length"


def test_generate_tokens_min_tokens_holds_back_stop_ids(http):
    """vLLM's min_tokens (SkyRL sends 1 by default) is the engine's min_new_tokens: a stop id the greedy
    path would emit first cannot end the request before min_tokens tokens are out."""
    first = greedy_ids(http, PROMPT_IDS, n=1)[0]
    sp = skyrl_sampling_params(ignore_eos=False, stop_token_ids=[first], max_tokens=6, min_tokens=0)
    r = http.post("/inference/v1/generate", json={"sampling_params": sp, "token_ids": PROMPT_IDS})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["token_ids"] == [first] and r.json()["choices"][0]["finish_reason"] == "stop"
    r = http.post("/inference/v1/generate", json={"sampling_params": dict(sp, min_tokens=3), "token_ids": PROMPT_IDS})
    assert r.status_code == 200, r.text
    ids = r.json()["choices"][0]["token_ids"]
    assert len(ids) >= 3 and first not in ids[:3]


def test_prime_rl_prefill_logprobs(http):
    """prime-rl `client.py::prefill_logprobs`: {max_tokens: 1, temperature: 1.0, top_p: 1.0, prompt_logprobs: 1};
    reads prompt_logprobs[i] (None at 0, else the first value's logprob, the prompt token's). Equal to
    /generate's input_token_logprobs from logprob_start_len 0; the top-1 entry carries rank 1."""
    sp = {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "prompt_logprobs": 1}
    r = http.post("/inference/v1/generate", json={"model": "tiny", "token_ids": PROMPT_IDS, "sampling_params": sp})
    assert r.status_code == 200, r.text
    plp = r.json()["prompt_logprobs"]
    assert len(plp) == len(PROMPT_IDS) and plp[0] is None
    logprobs = [next(iter(entry.values()))["logprob"] for entry in plp[1:]]
    assert [int(next(iter(entry))) for entry in plp[1:]] == PROMPT_IDS[1:]
    for entry in plp[1:]:
        assert 1 <= len(entry) <= 2 and any(v["rank"] == 1 for v in entry.values())
    ref = http.post("/generate", json={"input_ids": PROMPT_IDS, "return_logprob": True, "logprob_start_len": 0,
                                       "sampling_params": {"max_new_tokens": 1}}).json()
    expected = [lp for lp, _, _ in ref["meta_info"]["input_token_logprobs"]]
    assert expected[0] is None and logprobs == pytest.approx(expected[1:], abs=1e-5)
    assert all(lp < 0 for lp in logprobs)
    # prompt_logprobs 0: the prompt token alone; and output logprobs stay absent unless asked
    r = http.post("/inference/v1/generate", json={"token_ids": PROMPT_IDS, "sampling_params": dict(sp, prompt_logprobs=0)})
    body = r.json()
    assert all(len(entry) == 1 for entry in body["prompt_logprobs"][1:]) and body["choices"][0]["logprobs"] is None
    assert [next(iter(e.values()))["logprob"] for e in body["prompt_logprobs"][1:]] == pytest.approx(expected[1:], abs=1e-5)


def test_generate_tokens_refuses_what_it_does_not_serve(http):
    """Fields hotswap does not implement are refused by name rather than ignored, as are out-of-range
    prompt_logprobs and penalties (the engine names them) and unknown fields."""
    for key, value in (("allowed_token_ids", [1, 2]), ("prompt_logprobs", 21), ("presence_penalty", 5.0), ("no_such_field", 1)):
        r = http.post("/inference/v1/generate", json={"sampling_params": skyrl_sampling_params(**{key: value}), "token_ids": PROMPT_IDS})
        assert r.status_code == 400 and key in r.json()["error"]["message"], (key, r.text)
    # any model name is served, as SGLang's server does (a framework's name for the policy need not be ours)
    r = http.post("/inference/v1/generate", json={"sampling_params": skyrl_sampling_params(), "token_ids": PROMPT_IDS, "model": "other"})
    assert r.status_code == 200


def test_skyrl_colocated_sleep_update_wake(http, engine, tiny_qwen3):
    """SkyRL colocated flow (`workers/worker_dispatch.py`): sleep(level=2) -> wake_up(["weights"]) ->
    weights arrive (here prime-rl's disk route) -> wake_up(["kv_cache"]); `reset_prefix_cache` with its JSON
    body; `get_world_size` (GET with a JSON body {}) reads ["world_size"]."""
    before = greedy_ids(http, PROMPT_IDS)
    assert skyrl_call(http, "/sleep", params={"level": "2"})["body"] is None
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}
    r = http.post("/generate", json={"input_ids": PROMPT_IDS, "sampling_params": {"max_new_tokens": 2}})
    assert r.status_code == 503
    skyrl_call(http, "/wake_up", params={"tags": ["weights"]})
    assert http.get("/is_sleeping").json() == {"is_sleeping": True}  # the KV cache still sleeps
    http.post("/update_weights", json={"weight_dir": str(tiny_qwen3)}).raise_for_status()  # level 2 discarded them
    skyrl_call(http, "/wake_up", params={"tags": ["kv_cache"]})
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}
    assert greedy_ids(http, PROMPT_IDS) == before
    skyrl_call(http, "/wake_up")  # awake already: a no-op, as vLLM
    assert skyrl_call(http, "/reset_prefix_cache", {"reset_running_requests": False})["body"] == {"success": True}
    assert skyrl_call(http, "/get_world_size", {}, method="GET")["body"]["world_size"] == 1


def test_sleep_level_1_keeps_weights(http):
    """AReaL `VLLMBackend` offload/onload: POST /sleep {} (no level: vLLM's 1), then POST /wake_up?tags=..;
    level 1 keeps the weights on the host, so they come back unchanged."""
    before = greedy_ids(http, PROMPT_IDS)
    assert http.post("/sleep", json={}).status_code == 200
    assert http.post("/sleep", json={}).status_code == 200  # asleep already: a no-op
    assert http.post("/wake_up?tags=weights&tags=kv_cache", json={}).status_code == 200
    assert greedy_ids(http, PROMPT_IDS) == before
    r = http.post("/sleep", params={"level": "3"})
    assert r.status_code == 400 and "level" in r.json()["error"]["message"]
    r = http.post("/wake_up", params={"tags": "cuda"})
    assert r.status_code == 400 and "cuda" in r.json()["error"]["message"]
    assert http.get("/is_sleeping").json() == {"is_sleeping": False}


def test_pause_modes(http, server, engine):
    """SkyRL `RemoteInferenceClient.pause(mode)` sends ?mode=abort|wait|keep&clear_cache=..: abort ends the
    request in flight (partial tokens, finish 'abort'); wait lets it finish first, then holds new ones."""
    bg = _Background(server.url)
    wait_running(engine)
    skyrl_call(http, "/pause", params={"mode": "abort", "clear_cache": "true"})
    out = bg.join()
    assert out["meta_info"]["finish_reason"]["type"] == "abort" and len(out["output_ids"]) < 300
    skyrl_call(http, "/resume")

    bg = _Background(server.url, max_new_tokens=120)
    wait_running(engine)
    skyrl_call(http, "/pause", params={"mode": "wait", "clear_cache": "false"})
    assert engine.get_load().num_running == 0  # neither frozen (keep) ...
    out = bg.join()  # ... nor aborted: it finished whole before the pause answered
    assert out["meta_info"]["finish_reason"]["type"] == "length" and len(out["output_ids"]) == 120
    assert http.get("/is_paused").json() == {"is_paused": True}
    skyrl_call(http, "/resume")

    r = http.post("/pause", params={"mode": "freeze"})
    assert r.status_code == 400 and "freeze" in r.json()["error"]["message"]
    assert http.get("/is_paused").json() == {"is_paused": False}


def test_tokenize_detokenize(http, engine):
    """SkyRL `tokenize`/`detokenize`: POST /tokenize {model, prompt, add_special_tokens} -> ["tokens"],
    POST /detokenize {model, tokens} -> ["prompt"]; SGLang's /v1/tokenize takes a list and /v1/detokenize
    replies {text}; vLLM's chat form takes messages."""
    tok = engine.tokenizer
    text = "Alice likes 12 apples"
    r = http.post("/tokenize", json={"model": "tiny", "prompt": text, "add_special_tokens": True}).json()
    assert r["tokens"] == tok.encode(text, add_special_tokens=True) and r["count"] == len(r["tokens"]) and r["max_model_len"] > 0
    back = http.post("/detokenize", json={"model": "tiny", "tokens": r["tokens"]}).json()
    assert back["prompt"] == tok.decode(r["tokens"])
    many = http.post("/v1/tokenize", json={"prompt": [text, "hi"], "add_special_tokens": False}).json()
    assert many["tokens"] == [tok.encode(t, add_special_tokens=False) for t in (text, "hi")] and many["count"] == [len(x) for x in many["tokens"]]
    assert http.post("/v1/detokenize", json={"tokens": many["tokens"]}).json()["text"] == [text, "hi"]
    msgs = [{"role": "user", "content": "hello"}]
    chat = http.post("/tokenize", json={"messages": msgs, "return_token_strs": True}).json()
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat["tokens"] == tok.encode(rendered, add_special_tokens=False) and len(chat["token_strs"]) == chat["count"]
    r = http.post("/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and "vocabulary" in r.json()["error"]["message"]


# ---- AReaL's vLLM backend ---------------------------------------------------------------------------


def test_areal_vllm_completions_with_token_ids(http):
    """AReaL `VLLMBackend.build_generation_request`: POST /v1/completions {prompt: ids, top_p, top_k,
    max_tokens, temperature, stop_token_ids, ignore_eos, skip_special_tokens, return_tokens_as_token_ids: true,
    logprobs: 0, use_beam_search: false, stream: false}; `parse_generation_response` maps
    choices[0].logprobs.tokens ("token_id:N") -> N beside token_logprobs."""
    payload = {"prompt": PROMPT_IDS, "top_p": 1.0, "top_k": -1, "max_tokens": 8, "temperature": 0.0, "stop_token_ids": [],
               "ignore_eos": True, "skip_special_tokens": True, "return_tokens_as_token_ids": True, "logprobs": 0,
               "use_beam_search": False, "stream": False}
    r = http.post("/v1/completions", json=payload)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    ids = [int(t.split(":")[1]) for t in choice["logprobs"]["tokens"]]
    assert ids == greedy_ids(http, PROMPT_IDS) and len(choice["logprobs"]["token_logprobs"]) == 8
    assert choice["finish_reason"] == "length"
    r = http.post("/v1/completions", json={**payload, "use_beam_search": True})
    assert r.status_code == 400 and "use_beam_search" in r.text


def test_areal_vllm_chat_token_ids(http):
    """AReaL's image path: POST /v1/chat/completions {messages, ..., logprobs: true, return_tokens_as_token_ids}
    reads ["logprobs"]["content"][i]["token"] ("token_id:N") and ["logprob"]."""
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
            "logprobs": True, "return_tokens_as_token_ids": True, "top_logprobs": 2}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert all(c["token"].startswith("token_id:") and all(t["token"].startswith("token_id:") for t in c["top_logprobs"]) for c in content)
    prompt = http.post("/tokenize", json={"messages": body["messages"]}).json()["tokens"]
    assert [int(c["token"].split(":")[1]) for c in content] == greedy_ids(http, prompt, 6)


def test_areal_vllm_control_routes(http, tiny_qwen3, tiny_qwen3_v2):
    """AReaL `VLLMBackend`: /areal_pause_generation {} (aborts, clears the cache), /areal_update_weights
    {model_path} (disk), /areal_continue_generation {}; replies {success, message}, 400 on failure."""
    before = greedy_ids(http, PROMPT_IDS)
    assert http.post("/areal_pause_generation", json={}).json()["success"] is True
    r = http.post("/areal_update_weights", json={"model_path": str(tiny_qwen3_v2)})
    assert r.status_code == 200 and r.json()["success"] is True
    assert http.post("/areal_continue_generation", json={}).json()["success"] is True
    assert greedy_ids(http, PROMPT_IDS) != before
    r = http.post("/areal_update_weights_xccl", json={})
    assert r.status_code == 400 and r.json()["success"] is False and "areal_set_update_weight_meta" in r.json()["message"]
    assert http.post("/areal_update_weights", json={"model_path": str(tiny_qwen3)}).json()["success"] is True
    assert greedy_ids(http, PROMPT_IDS) == before


def _areal_trainer(port: int, checkpoint: str, go, done) -> None:
    """AReaL's trainer side of the xccl update (`areal/engine/fsdp_engine.py::_update_weights_from_distributed`,
    here on gloo): rank 0 of the group, one broadcast per tensor in the announced order."""
    from datetime import timedelta

    import torch.distributed as dist
    from trainer_support import checkpoint_tensors

    from hotswap.wire.process_group import destroy_custom_process_group, init_custom_process_group

    pg = init_custom_process_group(backend="gloo", init_method=f"tcp://127.0.0.1:{port}", world_size=2, rank=0,
                                   group_name="areal_xccl", timeout=timedelta(seconds=60))
    go.wait(60)
    for tensor in checkpoint_tensors(checkpoint).values():
        dist.broadcast(tensor.contiguous(), src=0, group=pg)
    done.wait(60)
    destroy_custom_process_group(pg)


def test_areal_vllm_xccl_update(http, tiny_qwen3, tiny_qwen3_v2):
    """AReaL `VLLMBackend`: /areal_init_weights_update_group {master_address, master_port: str, rank_offset,
    world_size, backend, group_name}, then per bucket /areal_set_update_weight_meta {names, dtypes, shapes,
    group_name} and /areal_update_weights_xccl {} while the trainer broadcasts."""
    import multiprocessing as mp

    from trainer_support import checkpoint_tensors

    from hotswap.trainer import free_port

    before = greedy_ids(http, PROMPT_IDS)
    v2 = checkpoint_tensors(tiny_qwen3_v2)
    ctx = mp.get_context("spawn")
    go, done, port = ctx.Event(), ctx.Event(), free_port()
    trainer = ctx.Process(target=_areal_trainer, args=(port, str(tiny_qwen3_v2), go, done), daemon=True)
    trainer.start()
    try:
        r = http.post("/areal_init_weights_update_group", json={"master_address": "127.0.0.1", "master_port": str(port), "rank_offset": 1,
                                                                "world_size": 2, "backend": "gloo", "group_name": "areal_xccl"})
        assert r.status_code == 200 and r.json()["success"], r.text
        meta = {"names": list(v2), "dtypes": [str(t.dtype).split("torch.")[1] for t in v2.values()],
                "shapes": [list(t.shape) for t in v2.values()], "group_name": "areal_xccl"}
        assert http.post("/areal_set_update_weight_meta", json=meta).json()["success"]
        http.post("/areal_pause_generation", json={}).raise_for_status()
        go.set()
        r = http.post("/areal_update_weights_xccl", json={})
        assert r.status_code == 200 and r.json()["success"], r.text
        http.post("/areal_continue_generation", json={}).raise_for_status()
        assert greedy_ids(http, PROMPT_IDS) != before
        assert http.post("/destroy_weights_update_group", json={"group_name": "areal_xccl"}).json()["success"]
    finally:
        done.set()
        trainer.join(timeout=30)
        if trainer.is_alive():
            trainer.kill()
    assert http.post("/areal_update_weights", json={"model_path": str(tiny_qwen3)}).json()["success"]
    assert greedy_ids(http, PROMPT_IDS) == before


# ---- chat replies that keep multi-turn RL token-in/token-out ----------------------------------------


def test_chat_token_ids_and_meta_info(http):
    """vLLM's return_token_ids (response prompt_token_ids, choice token_ids) and SGLang-style meta_info per
    choice (output ids, per-token logprobs, weight version); streamed token_ids add up to the same ids."""
    body = {"messages": [{"role": "user", "content": "hello"}], "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
            "logprobs": True, "return_token_ids": True, "return_meta_info": True}
    r = http.post("/v1/chat/completions", json=body).json()
    prompt = http.post("/tokenize", json={"messages": body["messages"]}).json()["tokens"]
    choice = r["choices"][0]
    assert r["prompt_token_ids"] == prompt
    assert choice["token_ids"] == choice["meta_info"]["output_ids"] == greedy_ids(http, prompt, 6)
    meta = choice["meta_info"]
    assert [tid for _, tid, _ in meta["output_token_logprobs"]] == choice["token_ids"]
    assert meta["weight_version"] and meta["prompt_tokens"] == len(prompt) and meta["completion_tokens"] == 6
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: ") and line != "data: [DONE]"]
    assert events[0]["prompt_token_ids"] == prompt
    streamed = [t for e in events for c in e["choices"] for t in c.get("token_ids", [])]
    assert streamed == choice["token_ids"]
    assert [c["meta_info"]["output_ids"] for e in events for c in e["choices"] if "meta_info" in c] == [choice["token_ids"]]


def test_completion_token_ids(http):
    """Completions with return_token_ids: each choice carries prompt_token_ids and token_ids (vLLM)."""
    r = http.post("/v1/completions", json={"prompt": PROMPT_IDS, "max_tokens": 5, "temperature": 0, "ignore_eos": True,
                                           "return_token_ids": True}).json()
    assert r["choices"][0]["prompt_token_ids"] == PROMPT_IDS and r["choices"][0]["token_ids"] == greedy_ids(http, PROMPT_IDS, 5)


def test_openrlhf_actor_calls_in_process(engine):
    """OpenRLHF `trainer/ray/vllm_engine.py::LLMRayActor` calls vLLM's engine in process: `sleep(level)`,
    `wake_up(tags)` one tag at a time, `reset_prefix_cache()`, `pause_generation()` / `resume_generation()`
    (keep mode); hotswap.Engine answers the same names."""
    greedy = {"max_new_tokens": 8, "temperature": 0, "ignore_eos": True}
    before = engine.generate(input_ids=PROMPT_IDS, sampling_params=greedy)["output_ids"]
    assert engine.sleep(level=1).success and engine.is_sleeping()
    assert not engine.sleep(level=1, mode="later").success  # a bad mode is refused even when asleep
    for tag in ("weights", "kv_cache"):
        assert engine.wake_up([tag]).success
    assert not engine.is_sleeping()
    assert engine.reset_prefix_cache() is True
    assert engine.pause("keep").success and engine.is_paused()
    assert engine.resume().success and not engine.is_paused()
    assert engine.generate(input_ids=PROMPT_IDS, sampling_params=greedy)["output_ids"] == before


# ---- access policy and API key ----------------------------------------------------------------------


def test_control_routes_follow_the_access_policy(engine, http):
    """State-changing routes take JSON bodies only and need the API key when one is set."""
    r = http.post("/pause", content=b"mode=abort", headers={"content-type": "text/plain"})
    assert r.status_code == 415
    assert http.get("/is_paused").json() == {"is_paused": False}
    with ServerThread(create_app(engine, api_key="sekret")) as srv:
        assert httpx.post(srv.url + "/sleep", params={"level": "1"}).status_code == 401
        assert httpx.post(srv.url + "/update_weights", json={"weight_dir": "/"}).status_code == 401
        assert httpx.get(srv.url + "/is_sleeping").status_code == 401
        assert httpx.get(srv.url + "/is_sleeping", headers={"Authorization": "Bearer sekret"}).json() == {"is_sleeping": False}


def test_allow_auto_truncate_holds_on_the_vllm_route_as_on_the_openai_one(tiny_qwen3):
    """--allow-auto-truncate cut a max_tokens past the context to fit on /v1/completions and /generate, while
    /inference/v1/generate still refused it (400): the routes disagreed on one limit."""
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, max_context_len=64, allow_auto_truncate=True) as eng, \
            ServerThread(create_app(eng, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=60) as client:
        ids = [5] * (eng.max_context_len - 3)
        vllm = client.post("/inference/v1/generate", json={"token_ids": ids, "sampling_params": {"max_tokens": 8, "temperature": 0,
                                                                                                  "ignore_eos": True}})
        openai = client.post("/v1/completions", json={"prompt": ids, "max_tokens": 8, "temperature": 0, "ignore_eos": True})
    assert openai.status_code == 200 and openai.json()["usage"]["completion_tokens"] == 3, openai.text[:300]
    assert vllm.status_code == 200, vllm.text[:300]
    assert len(vllm.json()["choices"][0]["token_ids"]) == 3 and vllm.json()["choices"][0]["finish_reason"] == "length"


def test_a_prompt_past_the_context_is_refused_as_on_the_openai_route(http, engine):
    """/inference/v1/generate without max_tokens turned a prompt longer than the context into max_new_tokens
    -3 and a refusal naming that engine field; it gets the OpenAI routes' refusal of the prompt itself."""
    ids = [5] * (engine.max_context_len + 3)
    vllm = http.post("/inference/v1/generate", json={"token_ids": ids, "sampling_params": {"temperature": 0}})
    openai = http.post("/v1/completions", json={"prompt": ids, "max_tokens": None, "temperature": 0})
    for reply in (vllm, openai):
        err = reply.json()["error"]
        assert reply.status_code == 400 and "this server takes at most" in err["message"] and err["param"] == "prompt", reply.text[:300]
