"""SGLang's engine contract as the RL frameworks use it: each test replays a framework's request (from its
source, named in the docstring; docs/framework_calls.md has the details) and parses the reply as that
source does. Tiny CPU models; CPU tensors are shared the way a colocated CPU trainer must share them."""

from __future__ import annotations

import base64
import dataclasses
import inspect
import json
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from engine_support import generate_in_background
from hf_reference import hf_greedy
from safetensors.torch import load_file
from test_sglang_payloads import LocalSerializedTensor, file_system_sharing, flattened_bucket, serialize, sglang_names  # noqa: F401

from hotswap import Engine, HotswapError
from hotswap.runner.kv_cache import kv_pool_bytes
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread
from hotswap.sglang_server_args import NOT_COMPARABLE, RUN_ONLY, SGLANG_DEFAULTS
from hotswap.wire.checksum import state_dict_manifest

openai = pytest.importorskip("openai")  # the OpenAI routes are driven by the official client

GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}
PROMPTS = ["Alice likes 12 apples", "Bob sees the river"]


def checkpoint(path) -> dict[str, torch.Tensor]:
    out = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        out.update(load_file(shard))
    return out


def texts(engine_or_client, prompts=PROMPTS) -> list[list[int]]:
    if isinstance(engine_or_client, Engine):
        return [o["output_ids"] for o in engine_or_client.generate(prompts, GREEDY)]
    r = engine_or_client.post("/generate", json={"text": prompts, "sampling_params": GREEDY})
    r.raise_for_status()
    return [o["output_ids"] for o in r.json()]


@pytest.fixture(scope="module")
def v2_ids(tiny_qwen3_v2) -> list[list[int]]:
    with Engine(str(tiny_qwen3_v2), device="cpu", page_size=4) as eng:
        return texts(eng)


# ---- get_weights_by_name --------------------------------------------------------------------------


def test_get_weights_by_name_is_the_bare_parameter(served, tiny_qwen3):
    """SGLang's test/srt/test_get_weights_by_name.py: `engine.get_weights_by_name(name, truncate_size)` and
    `requests.get(url + "/get_weights_by_name", json={...}).json()` are both the nested list, compared with
    `np.testing.assert_allclose(np.array(...), hf_param[:truncate_size])`."""
    eng, c = served
    want = checkpoint(tiny_qwen3)["model.layers.0.self_attn.q_proj.weight"][:3]
    assert torch.equal(torch.tensor(eng.get_weights_by_name("model.layers.0.self_attn.q_proj.weight", truncate_size=3)), want)
    r = c.post("/get_weights_by_name", json={"name": "model.layers.0.self_attn.q_proj.weight", "truncate_size": 3})
    r.raise_for_status()
    assert torch.equal(torch.tensor(r.json()), want)
    r = c.post("/get_weights_by_name", json={"name": "model.no_such.weight"})
    assert r.status_code == 400 and "unknown parameter 'model.no_such.weight'" in r.json()["message"]
    with pytest.raises(HotswapError, match="unknown parameter"):
        eng.get_weights_by_name("model.no_such.weight")


# ---- the colocated tensor path --------------------------------------------------------------------


def test_slime_flattened_bucket_over_http(served, tiny_qwen3_v2, v2_ids, sglang_names):  # noqa: F811
    """slime `update_weight_from_tensor.py::_send_to_colocated_engine` -> `sglang_engine.py::
    update_weights_from_tensor`: one FlattenedTensorBucket per rank, `MultiprocessingSerializer.serialize(
    ..., output_str=True)`, POST {serialized_named_tensors, load_format: "flattened_bucket", flush_cache:
    False, weight_version}; `raise_for_status()` then `response.json()`. An empty bucket (a rank with fewer
    buckets) loads nothing. Then slime flushes with GET /flush_cache."""
    eng, c = served
    new = checkpoint(tiny_qwen3_v2)
    names = sorted(new)
    half = len(names) // 2
    for part in (names[:half], names[half:]):
        payload = serialize(flattened_bucket([(n, new[n]) for n in part]), output_str=True)
        r = c.post("/update_weights_from_tensor", json={"serialized_named_tensors": [payload], "load_format": "flattened_bucket",
                                                        "flush_cache": False, "weight_version": "7"})
        r.raise_for_status()
        assert r.json()["success"] is True
    empty = serialize({"flattened_tensor": torch.empty(0, dtype=torch.uint8), "metadata": []}, output_str=True)
    r = c.post("/update_weights_from_tensor", json={"serialized_named_tensors": [empty], "load_format": "flattened_bucket"})
    r.raise_for_status()
    assert c.get("/flush_cache").status_code == 200
    assert c.get("/get_weight_version").json()["weight_version"] == "7"
    assert eng.check_weights("checksum", expected=state_dict_manifest(new)).success
    assert texts(c) == v2_ids


def test_verl_local_serialized_tensors_over_http(served, tiny_qwen3_v2, v2_ids, sglang_names):  # noqa: F811
    """verl `http_server_engine.py::AsyncHttpServerAdapter.update_weights_from_tensor` through sglang's
    `weight_sync/utils.py::update_weights`: (name, LocalSerializedTensor(values=[payload per TP rank])) pairs,
    serialized once per rank, base64, load_format None; after the buckets verl GETs /flush_cache."""
    eng, c = served
    new = checkpoint(tiny_qwen3_v2)
    named = [(n, LocalSerializedTensor(values=[serialize(t)])) for n, t in new.items()]
    body = {"serialized_named_tensors": [base64.b64encode(serialize(named)).decode()], "load_format": None, "flush_cache": True}
    r = c.post("/update_weights_from_tensor", json=body)
    r.raise_for_status()
    assert r.json()["success"], r.text
    assert c.get("/flush_cache").status_code == 200
    assert texts(c) == v2_ids


def test_refused_serialized_payload_changes_nothing(served, tiny_qwen3, sglang_names):  # noqa: F811
    """A payload naming a parameter the model lacks, or a bad load_format, is a 400 with a message; the
    weights stay bit for bit."""
    eng, c = served
    before = eng.check_weights("checksum").digest
    bad = serialize([("model.layers.7.nope.weight", torch.zeros(2))], output_str=True)
    r = c.post("/update_weights_from_tensor", json={"serialized_named_tensors": [bad]})
    assert r.status_code == 400 and "model.layers.7.nope.weight" in r.json()["message"]
    r = c.post("/update_weights_from_tensor", json={"serialized_named_tensors": [bad], "load_format": "jit"})
    assert r.status_code == 400 and "load_format" in r.json()["message"]
    r = c.post("/update_weights_from_tensor", json={})
    assert r.status_code == 400 and "serialized_named_tensors" in r.json()["message"]
    assert eng.check_weights("checksum").digest == before


def test_engine_update_weights_from_tensor_sglang_forms(tiny_qwen3, tiny_qwen3_v2, v2_ids, sglang_names):  # noqa: F811
    """SGLang's Engine.update_weights_from_tensor: in-process (name, tensor) pairs; with load_format
    "flattened_bucket" `named_tensors` is the per-rank payload list (slime's in-process path). Replies are
    `(success, message)`-style: indexable, unpackable, JSON-serialisable."""
    new = checkpoint(tiny_qwen3_v2)
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        ret = eng.update_weights_from_tensor(list(new.items()))
        ok, message = ret
        assert ok and ret[0] is True and json.loads(json.dumps(ret))["success"] is True
        assert texts(eng) == v2_ids
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng:
        payload = serialize(flattened_bucket(list(new.items())))
        assert eng.update_weights_from_tensor([payload], load_format="flattened_bucket", weight_version="b").success
        assert texts(eng) == v2_ids and eng.weight_version == "b"


# ---- info routes --------------------------------------------------------------------------------------


def test_info_routes_as_frameworks_read_them(served, tiny_qwen3):
    """slime `external.py::get_server_info` (GET /server_info, falling back to /get_server_info; reads
    tp_size/pp_size/disaggregation_*/encoder_only, asserts enable_memory_saver against its launch args);
    miles `sglang_engine.py::get_weight_version` (GET /model_info then /get_weight_version);
    slime `server_control.py` (GET /v1/loads?include=core until idle, `loads[i]["num_running_reqs"]`)."""
    eng, c = served
    for path in ("/server_info", "/get_server_info"):
        info = c.get(path).json()
        assert info["tp_size"] == 1 and info["dp_size"] == 1 and info["pp_size"] == 1 and info["page_size"] == 4
        # as launched (slime's and miles' _init_external assert it against their own launch arguments): this server was
        # started without enable_memory_saver, on the port it serves on (miles compares the port too), GPU 0
        assert info["enable_memory_saver"] is False and info["model_path"] == str(tiny_qwen3)
        assert (info["port"], info["base_gpu_id"]) == (c.base_url.port, 0)
        assert info["max_total_num_tokens"] == eng.capacity().max_total_tokens and info["weight_version"] == "default"
        assert info["max_running_requests"] == eng.config.max_running_requests and info["disaggregation_mode"] == "null"
    for path in ("/model_info", "/get_model_info"):
        info = c.get(path).json()
        assert info["weight_version"] == "default" and info["model_path"] == str(tiny_qwen3) and info["is_generation"] is True
        assert (info["model_type"], info["architectures"]) == ("qwen3", ["Qwen3ForCausalLM"])  # config.json's, as SGLang reports
    for path in ("/weight_version", "/get_weight_version"):  # SGLang's name now, and the one it deprecated
        assert c.get(path).json() == {"weight_version": "default"}
    loads = c.get("/v1/loads", params={"include": "core"}).json()
    entry = loads["loads"][0]
    assert entry["num_running_reqs"] + entry["num_waiting_reqs"] == 0 and entry["max_total_num_tokens"] > 0
    assert eng.get_server_info()["tp_size"] == 1 and eng.get_model_info()["weight_version"] == "default"


# ---- Engine construction and generate arguments ---------------------------------------------------------


def test_engine_takes_sglang_server_args(tiny_qwen3):
    """SGLang's tests and verl build `Engine(**server_args)` with ServerArgs names (e.g. SGLang's
    test_release_memory_occupation.py: model_path, random_seed, enable_memory_saver, mem_fraction_static,
    tp_size); what hotswap cannot honour is refused by name."""
    with Engine(model_path=str(tiny_qwen3), device="cpu", random_seed=42, enable_memory_saver=True, mem_fraction_static=0.85,
                tp_size=1, dp_size=1, disable_radix_cache=True, context_length=256, skip_tokenizer_init=False,
                custom_weight_loader=None, enable_return_routed_experts=False, page_size=4, chunked_prefill_size=64,
                max_running_requests=8, log_level="error", tokenizer_path=str(tiny_qwen3)) as eng:
        cfg = eng.config
        assert (cfg.seed, cfg.mem_fraction_static, cfg.tensor_parallel_size, cfg.enable_prefix_cache, cfg.max_context_len) == \
            (42, 0.85, 1, False, 256)
        info = eng.get_server_info()
        assert (info["random_seed"], info["mem_fraction_static"], info["enable_memory_saver"]) == (42, 0.85, True)
    for bad, needle in (({"dp_size": 2}, "dp_size must be 1"), ({"custom_weight_loader": ["my.loader"]}, "custom_weight_loader"),
                        ({"no_such_arg": 1}, "unknown engine argument no_such_arg"), ({"tp_size": 2, "tensor_parallel_size": 1}, "disagree")):
        with pytest.raises(HotswapError, match=needle):
            Engine(model_path=str(tiny_qwen3), device="cpu", **bad)



def test_server_info_reads_back_every_sglang_setting_as_launched(tiny_qwen3):
    """miles `sglang_engine.py::_init_external` asserts `get_server_info()[name] == value` for every key it launched with,
    its per-group overrides included (`skip_tokenizer_init: true`, `cuda_graph_max_bs: 128` in its PD example): a setting
    hotswap maps onto a field of its own, or takes under another name, reads back as given, as SGLang's
    `asdict(server_args)` does."""
    launched = {"skip_tokenizer_init": True, "cuda_graph_max_bs": 128, "max_prefill_tokens": 4096, "attention_backend": "fa3",
                "stream_output": True, "disable_radix_cache": True, "context_length": 256, "random_seed": 7, "tp_size": 1}
    with Engine(model_path=str(tiny_qwen3), device="cpu", page_size=4, num_pages=64, **launched) as eng:
        info = json.loads(json.dumps(eng.get_server_info()))  # what /get_server_info sends
        assert {name: info[name] for name in launched} == launched
        assert (eng.config.attention_backend, eng.config.max_num_batched_tokens, eng.config.cuda_graph_max_batch) == ("auto", 4096, 128)
        out = eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 2, "temperature": 0, "ignore_eos": True})
        assert len(out["output_ids"]) == 2  # input_ids in, output_ids out

def test_engine_takes_verls_rollout_arguments_and_sglangs_none(tiny_qwen3):
    """verl's SGLang rollout builds its engine with these arguments; SGLang's None ("choose for me") takes our default,
    chunked_prefill_size=-1 turns chunking off, and its dtype and attention backend names are understood."""
    prompt = list(range(3, 60))
    greedy = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
    with Engine(model_path=str(tiny_qwen3), device="cpu", page_size=4) as eng:
        ref = eng.generate(input_ids=prompt, sampling_params=greedy)["output_ids"]
    verl = dict(dtype="float", mem_fraction_static=0.5, enable_memory_saver=True, base_gpu_id=0, gpu_id_step=1, tp_size=1, node_rank=0,
                load_format="auto", dist_init_addr=None, nnodes=1, trust_remote_code=False, max_running_requests=None, port=30000,
                log_level="info", mm_attention_backend="fa3", attention_backend="fa3", skip_tokenizer_init=False)
    with Engine(model_path=str(tiny_qwen3), device="cpu", page_size=4, chunked_prefill_size=-1, **verl) as eng:
        cfg = eng.config
        assert (cfg.attention_backend, cfg.max_running_requests, cfg.mem_fraction_static) == ("auto", 512, 0.5)
        assert eng.scheduler.batcher.chunked_prefill_size == cfg.max_num_batched_tokens  # -1: no chunk limit of its own
        assert eng.generate(input_ids=prompt, sampling_params=greedy)["output_ids"] == ref
    with Engine(model_path=str(tiny_qwen3), device="cpu", page_size=4, chunked_prefill_size=None, attention_backend="torch_native",
                context_length=None, cuda_graph_max_bs=None) as eng:
        assert (eng.config.chunked_prefill_size, eng.config.attention_backend) == (2048, "torch")
        assert eng.generate(input_ids=prompt, sampling_params=greedy)["output_ids"] == ref
    for bad, needle in (({"attention_backend": "xformers"}, "unknown attention_backend 'xformers'"),
                        ({"max_running_requests": "8"}, "max_running_requests must be an integer >= 1, got '8'"),
                        ({"chunked_prefill_size": 2.5}, "chunked_prefill_size must be an integer, got 2.5"),
                        ({"gpu_id_step": 0}, "gpu_id_step must be an integer >= 1, got 0"),
                        ({"base_gpu_id": -1}, "base_gpu_id must be an integer >= 0, got -1")):
        with pytest.raises(HotswapError, match=needle):
            Engine(model_path=str(tiny_qwen3), device="cpu", **bad)


def test_engine_takes_a_whole_sglang_server_args(tiny_qwen3):
    """`Engine(**asdict(ServerArgs(...)))`: every field at SGLang's default asks nothing and is taken; fields that only
    change how SGLang runs are taken at any value; one that changes what it serves is refused by name."""
    whole = {name: value for name, value in SGLANG_DEFAULTS.items() if value is not NOT_COMPARABLE}
    run_only = {"disable_overlap_schedule": True, "schedule_policy": "lpm", "enable_torch_compile": True, "log_requests": True,
                "cuda_graph_bs_decode": [1, 2, 4], "watchdog_timeout": 60, "nccl_port": 23456, "dist_timeout": 600}  # slime: nccl_port
    assert set(run_only) <= RUN_ONLY <= set(SGLANG_DEFAULTS)
    # a run-only value JSON cannot carry is taken, not echoed (TP workers get the settings as JSON)
    with Engine(model_path=str(tiny_qwen3), **{**whole, **run_only, "custom_sigquit_handler": print, "device": None, "page_size": 4}) as eng:
        assert (eng.config.device, eng.config.max_running_requests, eng.config.enable_prefix_cache) == ("auto", 512, True)
        info = json.loads(json.dumps(eng.get_server_info()))  # what /get_server_info sends
        assert set(whole) <= set(info) and {name: info[name] for name in run_only} == run_only  # read back as launched
        assert info["custom_sigquit_handler"] is None
        assert (info["page_size"], info["max_running_requests"], info["tp_size"]) == (4, 512, 1)
        out = eng.generate(input_ids=[5, 6, 7], sampling_params={"max_new_tokens": 3, "temperature": 0, "ignore_eos": True})
        assert len(out["output_ids"]) == 3
    for bad, needle in (({"enable_deterministic_inference": True}, "enable_deterministic_inference=True: SGLang's setting is not supported "
                                                                    "by hotswap \\(only its default False\\)"),
                        ({"tool_call_parser": "kimi_k2"}, "tool_call_parser='kimi_k2': hotswap serves the tool-call parsers qwen, qwen25"),
                        ({"allowed_media_domains": ["x"]}, "allowed_media_domains=\\['x'\\]: SGLang's setting is not supported by hotswap$")):
        with pytest.raises(HotswapError, match=needle):
            Engine(model_path=str(tiny_qwen3), device="cpu", **bad)


def test_engine_takes_server_args_and_sglangs_newer_generate_arguments(tiny_qwen3):
    """SGLang's Engine(server_args=ServerArgs(...)); generate's newer arguments (engine.py @001067ff): priority,
    cache_salt and kv_router_hint taken and unused (SGLang ignores priority without priority scheduling), the
    multimodal and session ones refused by name when set, the data-parallel ranks only 0; and
    update_weights_from_distributed's sixth positional argument is load_format, as in SGLang."""
    fields = {name: value for name, value in SGLANG_DEFAULTS.items() if value is not NOT_COMPARABLE}
    ServerArgs = dataclasses.make_dataclass("ServerArgs", [("model_path", str), *[(name, object, dataclasses.field(default=value))
                                                                                  for name, value in fields.items()]])
    with Engine(server_args=ServerArgs(model_path=str(tiny_qwen3), device="cpu", page_size=4)) as eng:
        assert (eng.config.device, eng.config.page_size) == ("cpu", 4)
        sp = {"max_new_tokens": 2, "temperature": 0, "ignore_eos": True}
        out = eng.generate(input_ids=[5, 6, 7], sampling_params=sp, priority=3, cache_salt="tenant-a", kv_router_hint=None,
                           mm_hashes=None, session_params=None, routed_dp_rank=0)
        assert len(out["output_ids"]) == 2
        for bad, needle in (({"session_params": {"id": "s"}}, "'session_params' \\(continual-prompting sessions\\)"),
                            ({"mm_hashes": ["h"]}, "'mm_hashes' \\(multimodal input\\)"),
                            ({"routed_dp_rank": 1}, "routed_dp_rank=1 out of range")):
            with pytest.raises(HotswapError, match=needle):
                eng.generate(input_ids=[5, 6, 7], sampling_params=sp, **bad)
        bound = inspect.signature(eng.update_weights_from_distributed).bind(["w"], ["bfloat16"], [[2]], "g", True, "flattened_bucket")
        assert bound.arguments["load_format"] == "flattened_bucket"
    with pytest.raises(HotswapError, match="server_args must be a ServerArgs dataclass or a dict"):
        Engine(server_args=["not", "args"])


def test_max_total_tokens_caps_the_kv_cache(tiny_qwen3):
    with Engine(model_path=str(tiny_qwen3), device="cpu", page_size=4, max_total_tokens=66) as eng:
        assert eng.model_runner.kv_cache.num_pages == 16 and eng.get_server_info()["max_total_num_tokens"] == 64
        out = eng.generate(input_ids=list(range(3, 40)), sampling_params={"max_new_tokens": 4, "temperature": 0, "ignore_eos": True})
        assert len(out["output_ids"]) == 4
    with pytest.raises(HotswapError, match="max_total_tokens must be an integer >= 0, got -5"):
        Engine(model_path=str(tiny_qwen3), device="cpu", max_total_tokens=-5)


def test_mem_fraction_static_sizes_the_kv_cache_as_sglang_does(tiny_qwen3):
    """SGLang's mem_fraction_static bounds weights + KV cache to that share of the memory free at start (what a
    colocated trainer plans around); kv_cache_memory_fraction is the share of what the weights left free."""
    gib = 1 << 30
    # an 8B model (16 GiB) on an empty 80 GiB card: SGLang keeps 0.5 x 80 free, the KV cache gets 64 - 40
    assert kv_pool_bytes(80 * gib, 64 * gib, 0.8, 0.5) == 24 * gib
    assert kv_pool_bytes(80 * gib, 64 * gib, 0.5, None) == 32 * gib
    # a trainer holding 30 GiB before the engine starts: the share is of what was free then
    assert kv_pool_bytes(50 * gib, 34 * gib, 0.8, 0.5) == 9 * gib
    with pytest.raises(HotswapError, match=r"mem_fraction_static=0.2 leaves no memory for the KV cache: 80.00 GiB"):
        kv_pool_bytes(80 * gib, 64 * gib, 0.8, 0.2)
    for bad in ({"mem_fraction_static": 0}, {"mem_fraction_static": 1.5}, {"mem_fraction_static": "0.8"},
                {"kv_cache_memory_fraction": -0.1}, {"kv_cache_memory_fraction": True}):
        name = next(iter(bad))
        with pytest.raises(HotswapError, match=f"{name} must be a fraction in \\(0, 1\\]"):
            Engine(model_path=str(tiny_qwen3), device="cpu", **bad)


def test_generate_takes_sglang_arguments_and_refuses_what_it_cannot_serve(served):
    """verl `async_sglang_server.py::generate` passes rid, input_ids, image_data=None and sampling_params;
    verl's HttpServerAdapter.generate adds lora_path and custom_logit_processor (None dropped). A set
    image_data or lora_path is refused by name; a duplicate rid among running requests is refused."""
    eng, c = served
    out = eng.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, rid="verl-1", image_data=None, custom_logit_processor=None)
    assert out["meta_info"]["id"] == "verl-1" and len(out["output_ids"]) == GREEDY["max_new_tokens"]
    # SGLang's batch form: one unset image per prompt
    assert len(eng.generate(input_ids=[[5, 6, 7], [8, 9]], sampling_params=GREEDY, image_data=[None, None])) == 2
    # AReaL's sampling_params (sglang_remote.py::build_generation_request), neutral penalties included
    areal = {"top_p": 1.0, "top_k": -1, "max_new_tokens": 10, "temperature": 0.0, "stop_token_ids": [], "ignore_eos": True,
             "skip_special_tokens": True, "frequency_penalty": 0.0, "presence_penalty": 0, "repetition_penalty": 1.0, "regex": None}
    assert eng.generate(input_ids=[5, 6, 7], sampling_params=areal)["output_ids"] == out["output_ids"]
    # every argument of SGLang's Engine.generate, at SGLang's defaults
    sglang_defaults = {"prompt": None, "image_data": None, "audio_data": None, "video_data": None, "return_logprob": False,
                       "logprob_start_len": None, "top_logprobs_num": None, "token_ids_logprob": None, "lora_path": None,
                       "custom_logit_processor": None, "return_hidden_states": False, "return_routed_experts": False, "stream": False,
                       "bootstrap_host": None, "bootstrap_port": None, "bootstrap_room": None, "data_parallel_rank": None,
                       "external_trace_header": None, "rid": None}
    assert eng.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, **sglang_defaults)["output_ids"] == out["output_ids"]
    for kw, name in (({"image_data": ["x.png"]}, "image_data"), ({"lora_path": "adapter"}, "lora_path"),
                     ({"custom_logit_processor": "{}"}, "custom_logit_processor"), ({"audio_data": "a.wav"}, "audio_data"),
                     ({"return_hidden_states": True}, "return_hidden_states"), ({"token_ids_logprob": [1]}, "token_ids_logprob"),
                     ({"data_parallel_rank": 1}, "data_parallel_rank")):
        with pytest.raises(HotswapError, match=name):
            eng.generate("hi", GREEDY, **kw)
        r = c.post("/generate", json={"text": "hi", "sampling_params": GREEDY, **kw})
        assert r.status_code == 400 and name in r.json()["error"]["message"]
    r = c.post("/generate", json={"text": PROMPTS, "sampling_params": GREEDY, "rid": ["a", "b"]})
    assert [o["meta_info"]["id"] for o in r.json()] == ["a", "b"]
    # a duplicate rid while the first runs
    assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
    try:
        first = threading.Thread(target=c.post, args=("/generate",), kwargs={"json": {"text": "x", "sampling_params": GREEDY, "rid": "dup"}})
        first.start()
        deadline = time.monotonic() + 10
        while eng.get_load().num_waiting < 1:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        r = c.post("/generate", json={"text": "y", "sampling_params": GREEDY, "rid": "dup"})
        assert r.status_code == 400 and "duplicate request id" in r.json()["error"]["message"]
    finally:
        c.post("/continue_generation", json={})
    first.join(30)


def test_unserved_generate_fields_have_one_table_and_one_message(served):
    """SGLang's GenerateReqInput (managers/io_struct.py) fields hotswap does not serve are one table
    (engine/unserved.py) for Engine.generate, /generate and the OpenAI routes: set, each path refuses them with
    the one message (over HTTP a 400 whose `param` names the field); the data-parallel ranks pass at 0 only.
    Before, /generate ignored a set mm_hashes the Engine refused, refused disagg_prefill_dp_rank=0 the Engine
    took, and the two quoted field names differently; the Engine refused session_id, which SGLang's io_struct.py
    says changes nothing of the prompt (taken and unused on every path now, as /generate and the OpenAI routes did)."""
    eng, c = served
    completion = {"model": "m", "prompt": [5, 6, 7], "max_tokens": 2}
    for kw, openai in (({"session_params": {"id": "s"}}, True), ({"mm_hashes": ["h"]}, False), ({"routed_dp_rank": 1}, True),
                       ({"disagg_prefill_dp_rank": 2}, True)):
        field = next(iter(kw))
        with pytest.raises(HotswapError) as err:
            eng.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, **kw)
        for url, body in (("/generate", {"input_ids": [5, 6, 7], "sampling_params": GREEDY}), ("/v1/completions", completion)):
            r = c.post(url, json={**body, **kw})
            if url == "/v1/completions" and not openai:  # not a field of SGLang's OpenAI requests: ignored, as SGLang does
                assert r.status_code == 200, r.text
                continue
            assert r.status_code == 400, (url, field, r.text)
            assert r.json()["error"]["message"] == str(err.value) and r.json()["error"]["param"] == field
    for kw in ({"disagg_prefill_dp_rank": 0}, {"session_id": "s"}):
        assert len(eng.generate(input_ids=[5, 6, 7], sampling_params=GREEDY, **kw)["output_ids"]) == GREEDY["max_new_tokens"]
        assert c.post("/generate", json={"input_ids": [5, 6, 7], "sampling_params": GREEDY, **kw}).status_code == 200
        assert c.post("/v1/completions", json={**completion, **kw}).status_code == 200


def test_constrained_decoding_is_refused_everywhere(served):
    """regex / json_schema / ebnf (SGLang's sampling_params; SGLang's and vLLM's OpenAI extras) would be
    unconstrained text if ignored: refused by name on every path with the one message, and over HTTP a 400
    whose `param` names the field."""
    eng, c = served

    def message(field: str) -> str:
        return f"{field!r} (constrained decoding) is not supported by hotswap; leave it unset"

    def refused(r: httpx.Response, field: str) -> None:
        assert r.status_code == 400, r.text
        assert r.json()["error"]["message"] == message(field) and r.json()["error"]["param"] == field

    chat = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    for field in ("regex", "json_schema", "ebnf"):
        with pytest.raises(HotswapError) as err:
            eng.generate("hi", {**GREEDY, field: "a+"})
        assert str(err.value) == message(field)
        refused(c.post("/generate", json={"text": "hi", "sampling_params": {**GREEDY, field: "a+"}}), field)
        refused(c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2, field: "a+"}), field)
        refused(c.post("/v1/chat/completions", json={**chat, field: "a+"}), field)
    refused(c.post("/v1/completions", json={"model": "m", "prompt": "hi", "max_tokens": 2, "guided_regex": "a+"}), "guided_regex")
    refused(c.post("/inference/v1/generate", json={"token_ids": [1, 2], "sampling_params": {"max_tokens": 2, "guided_regex": "a+"}}),
            "guided_regex")
    # sent empty (as frameworks do) they are no constraint, on every path
    empty = {**GREEDY, "regex": None, "json_schema": "", "ebnf": None}
    assert c.post("/generate", json={"text": "hi", "sampling_params": empty}).status_code == 200
    assert eng.generate("hi", empty)["meta_info"]["completion_tokens"] == GREEDY["max_new_tokens"]


# ---- weight methods' return shapes, model path and versions ------------------------------------------------


def test_disk_update_from_another_folder_moves_model_path(tiny_qwen3, tiny_qwen3_v2, tmp_path, v2_ids):
    """SGLang's test_update_weights_from_disk.py: `ret = engine.update_weights_from_disk(new_path)`, then
    `ret[0]` and `json.dumps(ret)`; `get_model_info()["model_path"]` names the new folder, and over HTTP the
    served model name (no --served-model-name given) follows it."""
    folder = tmp_path / "step-1"
    shutil.copytree(tiny_qwen3_v2, folder)
    with Engine(str(tiny_qwen3), device="cpu", page_size=4) as eng, ServerThread(create_app(eng)) as srv:
        ret = eng.update_weights_from_disk(str(folder))
        assert ret[0] is True and json.loads(json.dumps(ret))["success"] is True
        success, message, num_paused_requests = ret  # SGLang's Engine: the tokenizer manager's 3-tuple
        assert success and "updated" in message and num_paused_requests == 0
        assert eng.get_model_info()["model_path"] == str(folder)
        assert texts(eng) == v2_ids
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
        assert [m.id for m in oai.models.list().data] == [str(folder)]
        # any model name is served (SGLang's server does the same)
        assert oai.completions.create(model="policy", prompt="hi", max_tokens=2).model == str(folder)
        with httpx.Client(base_url=srv.url) as c:
            r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3)})
            assert r.json()["success"] and c.get("/model_info").json()["model_path"] == str(tiny_qwen3)


def test_weight_update_replies_as_sglang_shapes_them(served, tiny_qwen3, tmp_path):
    """SGLang `entrypoints/http_server.py`: POST /update_weights_from_disk answers {success, message,
    num_paused_requests} (400 with the same keys when it fails); _from_tensor and _from_distributed answer
    {success, message}. `entrypoints/engine.py`: Engine.update_weights_from_disk returns the tokenizer
    manager's (success, message, num_paused_requests), update_weights_from_tensor (success, message).
    num_paused_requests counts the started requests held across the update: one paused in place here."""
    eng, c = served
    r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3)})
    assert r.status_code == 200 and r.json()["success"] is True and r.json()["num_paused_requests"] == 0
    r = c.post("/update_weights_from_disk", json={"model_path": str(tmp_path / "missing")})
    assert r.status_code == 400 and r.json()["success"] is False and r.json()["num_paused_requests"] == 0 and "missing" in r.json()["message"]
    ok, message, paused = eng.update_weights_from_disk(str(tmp_path / "missing"))
    assert not ok and "missing" in message and paused == 0
    ok, message = eng.update_weights_from_tensor([("model.no_such.weight", torch.zeros(1))])
    assert not ok and "model.no_such.weight" in message

    t, results = generate_in_background(eng, c, {"text": "x", "sampling_params": {"max_new_tokens": 200, "temperature": 0,
                                                                                   "ignore_eos": True}})
    try:
        assert c.post("/pause_generation", json={"mode": "in_place"}).status_code == 200
        r = c.post("/update_weights_from_disk", json={"model_path": str(tiny_qwen3), "weight_version": "w2"})
        assert r.status_code == 200 and r.json()["num_paused_requests"] == 1, r.text
        assert r.json()["message"].endswith(" Weight version updated to w2.")
    finally:
        c.post("/continue_generation", json={})
    t.join(60)
    out = results["r"].json()
    assert out["meta_info"]["finish_reason"]["type"] == "length" and out["meta_info"]["weight_version"] == "w2"


def test_weight_versions_as_sglang(tiny_qwen3):
    """SGLang's --weight-version names the launch weights; an update without weight_version leaves it;
    /update_weight_version aborts in-flight requests by default (UpdateWeightVersionReqInput.
    abort_all_requests=True) and OpenAI replies carry metadata.weight_versions."""
    with Engine(str(tiny_qwen3), device="cpu", page_size=4, weight_version="init-0") as eng, ServerThread(create_app(eng)) as srv, \
            httpx.Client(base_url=srv.url, timeout=60) as c:
        assert c.get("/get_weight_version").json()["weight_version"] == "init-0"
        assert eng.update_weights_from_disk(str(tiny_qwen3)).success and eng.weight_version == "init-0"
        long = {"max_new_tokens": 500, "temperature": 0, "ignore_eos": True}  # within the tiny model's 512-token context
        t, results = generate_in_background(eng, c, {"text": "x", "sampling_params": long})
        r = c.post("/update_weight_version", json={"new_version": "v9"})
        assert r.status_code == 200 and r.json()["new_version"] == "v9"
        t.join(30)
        assert results["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
        r = c.post("/v1/completions", json={"model": "x", "prompt": "hi", "max_tokens": 2})
        assert r.json()["metadata"]["weight_versions"]


# ---- weights_checker -----------------------------------------------------------------------------------


def test_weights_checker_checksum_reply_as_miles_parses_it(served, tiny_qwen3):
    """miles `sglang_engine.py::check_weights` POSTs {action, allow_quant_error, selector, skip_tensor_list};
    `audit_utils/checksum_utils.py` asserts body["success"], a non-empty body["ranks"], per rank
    `checksums` (name -> str) and `parallelism_info` (a list of role dicts with equal "rank")."""
    eng, c = served
    skip = ["lm_head.weight"]
    r = c.post("/weights_checker", json={"action": "checksum", "allow_quant_error": False, "selector": "all", "skip_tensor_list": skip})
    r.raise_for_status()
    body = r.json()
    assert body["success"] and body["ranks"]
    for rank_info in body["ranks"]:
        assert isinstance(rank_info["checksums"], dict) and "lm_head.weight" not in rank_info["checksums"]
        assert all(isinstance(v, str) for v in rank_info["checksums"].values()) and rank_info["per_gpu_checksum"]
        roles = rank_info["parallelism_info"]
        assert isinstance(roles, list) and len({role["rank"] for role in roles}) == 1
    want = state_dict_manifest(checkpoint(tiny_qwen3))
    assert body["ranks"][0]["checksums"] == {n: v for n, v in want.items() if n not in skip}


def test_weights_checker_compare_report(served):
    """slime `placement_group.py`: snapshot, reset_tensors, later compare; SGLang's failed compare message
    is "check tensor equality failed:" then a line per tensor with max_abs_err."""
    eng, c = served
    assert c.post("/weights_checker", json={"action": "snapshot"}).json()["success"]
    assert c.post("/weights_checker", json={"action": "compare"}).json()["success"]
    assert c.post("/weights_checker", json={"action": "reset_tensors"}).json()["success"]
    r = c.post("/weights_checker", json={"action": "compare", "skip_tensor_list": ["model.norm.weight"]})
    assert r.status_code == 400
    message = r.json()["message"]
    assert message.startswith("check tensor equality failed:\n") and "name=model.layers.0.self_attn.q_proj.weight max_abs_err=" in message
    assert "name=model.norm.weight " not in message
    r = c.post("/weights_checker", json={"action": "frobnicate"})
    assert r.status_code == 400 and "Unsupported action='frobnicate'" in r.json()["message"]


def test_post_process_weights_as_slime_calls_it(served):
    """slime's `update_weight_from_tensor.py` (miles the same) around an update of a quantized model: POST
    /post_process_weights {restore_weights_before_load: true, post_process_quantization: false} before sending,
    {false, true} after; its SGLang build answers {success, message}. hotswap holds no transformed weights: success,
    and the weights are bit for bit what they were."""
    eng, c = served
    before = eng.check_weights("checksum").checksums
    for body in ({"restore_weights_before_load": True, "post_process_quantization": False},
                 {"restore_weights_before_load": False, "post_process_quantization": True}, {}):
        r = c.post("/post_process_weights", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["success"] is True and "weights unchanged" in r.json()["message"]
    out = eng.post_process_weights(restore_weights_before_load=True)
    assert out.success and "restore_weights_before_load" in out.message
    assert eng.check_weights("checksum").checksums == before
    r = c.post("/post_process_weights", json={"restore_weights_before_load": "yes please"})
    assert r.status_code == 400 and r.json()["success"] is False and "restore_weights_before_load" in r.json()["message"]


# ---- aborts and request ids ----------------------------------------------------------------------------------


def test_abort_by_rid_returns_the_tokens_so_far(served):
    """verl `http_server_engine.py` POST /abort_request {rid, abort_all} (200, empty body as SGLang); AReaL
    `parse_generation_response` on finish_reason abort re-sends prompt + the tokens so far, so they must be
    in the reply."""
    eng, c = served
    body = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 500, "temperature": 0, "ignore_eos": True}, "rid": "areal-7"}
    t, results = generate_in_background(eng, c, body)
    time.sleep(0.3)  # some tokens
    r = c.post("/abort_request", json={"rid": "areal-7", "abort_all": False})
    assert r.status_code == 200 and r.content == b""
    t.join(30)
    out = results["r"].json()
    meta = out["meta_info"]
    assert meta["id"] == "areal-7" and meta["finish_reason"]["type"] == "abort"
    assert 0 < len(out["output_ids"]) < 500 and meta["completion_tokens"] == len(out["output_ids"])
    assert eng.abort_request(abort_all=True).success


def test_a_request_aborted_before_its_prefill_says_so(served):
    """SGLang `managers/tokenizer_manager.py::_handle_abort_req` answers a request aborted in the waiting queue
    with finish_reason {"type": "abort", "message": "Abort before prefill"}; AReaL `sglang_remote.py::
    parse_generation_response` reads that prefix as "no tokens" and sends the request again. One aborted
    after its prefill keeps its own message (its tokens so far are in the reply)."""
    eng, c = served
    r = c.post("/pause_generation", json={"mode": "abort"})  # SGLang http_server.py: {"message", "status": "ok"}
    assert r.status_code == 200 and r.json()["status"] == "ok" and r.json()["message"]
    results: dict = {}
    body = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 4}, "return_logprob": True}
    t = threading.Thread(target=lambda: results.setdefault("r", c.post("/generate", json=body)))
    t.start()
    try:
        deadline = time.monotonic() + 20
        while eng.get_load().num_waiting < 1:
            assert time.monotonic() < deadline, "the request never queued"
            time.sleep(0.01)
        assert c.post("/abort_request", json={"abort_all": True}).status_code == 200
        t.join(30)
    finally:
        r = c.post("/continue_generation", json={})
    assert r.status_code == 200 and r.json()["status"] == "ok"
    meta = results["r"].json()["meta_info"]
    assert meta["finish_reason"]["type"] == "abort" and meta["finish_reason"]["message"].startswith("Abort before prefill")
    assert meta["completion_tokens"] == 0 and meta["output_token_logprobs"] == []
    t, results = generate_in_background(eng, c, {**body, "sampling_params": {"max_new_tokens": 500, "ignore_eos": True}})
    assert c.post("/abort_request", json={"abort_all": True}).status_code == 200
    t.join(30)
    assert not results["r"].json()["meta_info"]["finish_reason"]["message"].startswith("Abort before prefill")


# ---- tokenization ----------------------------------------------------------------------------------------------


def test_text_prompts_get_bos_as_the_tokenizer_says(tiny_llama_bos):
    """SGLang tokenizes text prompts with the tokenizer's defaults (add_special_tokens): a Llama prompt
    starts with BOS, `prompt_tokens` counts it, and greedy output equals HF's on tokenizer(prompt). The
    multi-stage release/resume of SGLang's test_release_memory_occupation.py then gives the same tokens
    (its expected strings came from prompts with BOS)."""
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(tiny_llama_bos)
    ids = hf_tok(PROMPTS[0])["input_ids"]
    assert ids[0] == hf_tok.convert_tokens_to_ids("<|im_start|>")
    want = hf_greedy(tiny_llama_bos, ids, GREEDY["max_new_tokens"])[0]
    with Engine(model_path=str(tiny_llama_bos), device="cpu", page_size=4, random_seed=42, enable_memory_saver=True) as eng:
        out = eng.generate(PROMPTS[0], GREEDY)
        assert out["meta_info"]["prompt_tokens"] == len(ids) and out["output_ids"] == want
        eng.release_memory_occupation(tags=["kv_cache"])
        eng.release_memory_occupation(tags=["weights"])
        eng.resume_memory_occupation(tags=["weights"])
        assert eng.update_weights_from_tensor(list(checkpoint(tiny_llama_bos).items())).success
        eng.resume_memory_occupation(tags=["kv_cache"])
        assert eng.generate(PROMPTS[0], GREEDY)["output_ids"] == want
        with ServerThread(create_app(eng)) as srv:
            oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="x")
            res = oai.completions.create(model="m", prompt=PROMPTS[0], max_tokens=2, temperature=0)
            assert res.usage.prompt_tokens == len(ids)
            # one tokenization everywhere: Engine.encode, /tokenize, and an empty text is no tokens
            assert eng.encode(PROMPTS[0]) == ids and eng.encode(PROMPTS[0], add_special_tokens=False) == ids[1:]
            assert httpx.post(srv.url + "/tokenize", json={"prompt": PROMPTS[0]}).json()["tokens"] == ids
            assert eng.encode("") == []
            with pytest.raises(HotswapError, match="embeddings"):  # SGLang's Engine.encode([...]) means embeddings
                eng.encode([PROMPTS[0]])


def test_cached_tokens_count_tokens(served):
    """slime reads meta_info["cached_tokens"] as a token count: a repeated 10-token prompt on 4-token pages
    reuses its two full pages, 8 tokens."""
    eng, c = served
    body = {"input_ids": list(range(3, 13)), "sampling_params": {"max_new_tokens": 2}}
    assert c.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 0
    assert c.post("/generate", json=body).json()["meta_info"]["cached_tokens"] == 8


def test_generate_meta_info_as_sglang_fills_it(served):
    """SGLang `managers/tokenizer_manager.py::_handle_batch_output`: meta_info holds id, finish_reason,
    prompt_tokens, completion_tokens, cached_tokens, weight_version, and `e2e_latency` (seconds) once the
    request has finished (not on earlier streamed chunks); `output_token_logprobs` items are
    (logprob, token_id, text or None), the text with return_text_in_logprobs."""
    eng, c = served
    body = {"text": "Alice likes", "sampling_params": {"max_new_tokens": 3, "temperature": 0}, "return_logprob": True}
    meta = c.post("/generate", json=body).json()["meta_info"]
    assert {"id", "finish_reason", "prompt_tokens", "completion_tokens", "cached_tokens", "weight_version", "e2e_latency"} <= set(meta)
    assert isinstance(meta["e2e_latency"], float) and 0 < meta["e2e_latency"] < 60
    assert all(len(item) == 3 and item[2] is None for item in meta["output_token_logprobs"])
    meta = c.post("/generate", json={**body, "return_text_in_logprobs": True}).json()["meta_info"]
    assert [item[2] for item in meta["output_token_logprobs"]] == [eng.tokenizer.decode([item[1]]) for item in meta["output_token_logprobs"]]
    with c.stream("POST", "/generate", json={**body, "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert len(events) > 1 and "e2e_latency" in events[-1]["meta_info"]
    assert not any("e2e_latency" in e["meta_info"] for e in events[:-1])
    assert eng.generate("Alice likes", {"max_new_tokens": 2})["meta_info"]["e2e_latency"] > 0


def test_openai_choices_carry_matched_stop_and_prompt_ids(served):
    """SGLang `entrypoints/openai/protocol.py`: CompletionResponseChoice and ChatCompletionResponseChoice (and
    their stream choices) carry `matched_stop`, the finish_reason's `matched` (the stop token id or stop
    string that ended the choice; null when it ran to its length), and a chat choice `prompt_token_ids`."""
    eng, c = served
    chat = {"model": "m", "messages": [{"role": "user", "content": "Alice likes"}], "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    free = c.post("/v1/chat/completions", json=chat).json()["choices"][0]
    assert free["finish_reason"] == "length" and free["matched_stop"] is None
    ids = c.post("/v1/chat/completions", json={**chat, "return_token_ids": True}).json()["choices"][0]["token_ids"]
    stop_id = ids[3]
    # SGLang serving_chat.py: return_prompt_token_ids (or return_token_ids) puts the prompt's ids on each choice
    prompt = eng.encode(eng.tokenizer.apply_chat_template(chat["messages"], tokenize=False, add_generation_prompt=True),
                        add_special_tokens=False)
    for flag in ("return_prompt_token_ids", "return_token_ids"):
        got = c.post("/v1/chat/completions", json={**chat, flag: True, "n": 2}).json()["choices"]
        assert [ch["prompt_token_ids"] for ch in got] == [prompt, prompt]
    with c.stream("POST", "/v1/chat/completions", json={**chat, "return_prompt_token_ids": True, "stream": True}) as resp:
        first = next(json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {"))
    assert first["choices"][0]["prompt_token_ids"] == prompt
    stops = {**chat, "ignore_eos": False, "stop_token_ids": [stop_id]}  # SGLang's ignore_eos would ignore stop ids too
    assert not set(ids[:4]) & set(eng.eos_token_ids)
    r = c.post("/v1/chat/completions", json=stops).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["matched_stop"] == stop_id
    with c.stream("POST", "/v1/chat/completions", json={**stops, "stream": True}) as resp:
        events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    ends = [ch["matched_stop"] for e in events for ch in e["choices"]]
    assert ends[-1] == stop_id and not any(m is not None for m in ends[:-1])

    cmpl = {"model": "m", "prompt": "Bob sees the river", "temperature": 0, "max_tokens": 8, "ignore_eos": True}
    text = c.post("/v1/completions", json=cmpl).json()["choices"][0]["text"]
    stop = next(text[j:j + 2] for j in range(len(text) // 2, len(text) - 1) if text[j:j + 2].strip() == text[j:j + 2])
    r = c.post("/v1/completions", json={**cmpl, "stop": [stop]}).json()["choices"][0]
    assert r["finish_reason"] == "stop" and r["matched_stop"] == stop and stop not in r["text"]


def test_a_tensor_update_waiting_for_a_drain_is_bounded(tiny_qwen3, tiny_qwen3_v2, tmp_path):
    """A shared-memory tensor update posted over HTTP while a long request runs (SGLang's non-blocking
    update test) waits for the drain only weight_update_drain_timeout_s: then it is refused, weights
    unchanged, and the running request goes on."""
    from hotswap.wire.ipc import SharedMemoryBucket

    long_context = tmp_path / "long"
    shutil.copytree(tiny_qwen3, long_context)
    config = json.loads((long_context / "config.json").read_text())
    config["max_position_embeddings"] = 1 << 16  # a request that runs far longer than the drain bound
    (long_context / "config.json").write_text(json.dumps(config))
    with Engine(str(long_context), device="cpu", page_size=4, num_pages=1 << 15, weight_update_drain_timeout_s=1.0) as eng, \
            ServerThread(create_app(eng)) as srv, httpx.Client(base_url=srv.url, timeout=60) as c:
        before = eng.check_weights("checksum").digest
        body = {"input_ids": [3, 4, 5], "sampling_params": {"max_new_tokens": 60_000, "temperature": 0, "ignore_eos": True}, "rid": "long"}
        t, results = generate_in_background(eng, c, body)
        with SharedMemoryBucket(list(checkpoint(tiny_qwen3_v2).items()), token=eng.get_ipc_token()) as bucket:
            start = time.monotonic()
            r = c.post("/update_weights_from_tensor", json={"named_tensors": bucket.descriptors})
            assert r.status_code == 400 and "did not finish within 1 s" in r.json()["message"]
            assert time.monotonic() - start < 15
        assert eng.check_weights("checksum").digest == before
        assert eng.get_load().num_running == 1  # the request was not disturbed
        c.post("/abort_request", json={"rid": "long"})
        t.join(30)
        assert results["r"].json()["meta_info"]["finish_reason"]["type"] == "abort"
