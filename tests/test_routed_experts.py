"""Routed experts (routing replay, R3): SGLang's interface, ids equal to HF's router top-k on the same tokens,
also for prompts served from the prefix cache, under preemption, chunked prefill and streaming."""

from __future__ import annotations

import argparse
import json
import threading
import time

import pytest
import torch
from hf_reference import hf_greedy, hf_model, prompt_ids

from hotswap import Engine, HotswapError
from hotswap.errors import EngineUnavailableError
from hotswap.trainer import decode_routed_experts

SP = {"max_new_tokens": 6, "temperature": 0, "ignore_eos": True}
LAYERS, TOP_K = 3, 2  # the tiny fixture: layers 0 and 2 sparse, layer 1 dense


def make_engine(path, **kw) -> Engine:
    kw.setdefault("page_size", 4)
    return Engine(str(path), device="cpu", enable_return_routed_experts=True, **kw)


@torch.no_grad()
def hf_routing(path, tokens: list[int]) -> torch.Tensor:
    """[len(tokens), layers, top_k] of HF's router top-k ids on the tokens, -1 on dense layers."""
    model = hf_model(str(path))
    out = torch.full((len(tokens), LAYERS, TOP_K), -1, dtype=torch.int32)
    hooks = []

    def record(layer: int):
        def hook(_module, _inputs, result) -> None:  # the router returns (logits, weights, top-k ids)
            out[:, layer] = result[2]
        return hook

    for i, layer in enumerate(model.model.layers):
        gate = getattr(layer.mlp, "gate", None)
        if isinstance(gate, torch.nn.Module):  # the sparse block's router (dense MLPs have a gate_proj only)
            hooks.append(gate.register_forward_hook(record(i)))
    try:
        model(torch.tensor([tokens]))
    finally:
        for h in hooks:
            h.remove()
    return out


def assert_routing_matches(path, prompt: list[int], out: dict) -> None:
    got = decode_routed_experts(out, LAYERS, TOP_K)
    tokens = prompt + out["output_ids"]
    assert got.shape == (len(tokens) - 1, LAYERS, TOP_K)  # every forwarded position
    assert (got[:, 1] == -1).all()
    assert torch.equal(torch.from_numpy(got), hf_routing(path, tokens[:-1]))


def test_routed_experts_equal_hf_router_on_a_ragged_batch(tiny_qwen3_moe):
    prompts = [prompt_ids(i, n) for i, n in enumerate([5, 19, 2])]
    with make_engine(tiny_qwen3_moe) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=SP, return_routed_experts=True)
        for ids, out in zip(prompts, outs):
            assert_routing_matches(tiny_qwen3_moe, ids, out)
        assert "routed_experts" not in eng.generate(input_ids=prompts[0], sampling_params=SP)["meta_info"]


def test_prefix_cache_hit_still_returns_the_prompts_routing(tiny_qwen3_moe):
    prefix = prompt_ids(50, 24)
    with make_engine(tiny_qwen3_moe) as eng:
        eng.generate(input_ids=prefix + [7], sampling_params=SP)  # caches the prefix, routing not asked
        prompt = prefix + prompt_ids(51, 6)
        out = eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True)
        assert out["meta_info"]["cached_tokens"] == 24
        assert_routing_matches(tiny_qwen3_moe, prompt, out)


def test_samples_matching_a_running_prompt_get_its_routing(tiny_qwen3_moe):
    """GRPO's n samples and prompts with a common head, sent together: the others match the pages the first
    one is computing (cached_tokens), and each still gets the prompt's routing, HF's."""
    head = prompt_ids(60, 36)
    prompts = [head + prompt_ids(61, 5), head + prompt_ids(62, 3)]
    with make_engine(tiny_qwen3_moe) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=dict(SP, n=2), return_routed_experts=True)
        assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 40, 36, 36]
        for ids, out in zip([prompts[0]] * 2 + [prompts[1]] * 2, outs):
            assert_routing_matches(tiny_qwen3_moe, ids, out)


def test_routing_under_preemption_and_chunked_prefill(tiny_qwen3_moe):
    prompts = [prompt_ids(300 + i, 20) for i in range(5)] + [prompt_ids(399, 70)]
    sp = dict(SP, max_new_tokens=16)
    with make_engine(tiny_qwen3_moe, num_pages=36, chunked_prefill_size=16, max_num_batched_tokens=24) as eng:
        outs = eng.generate(input_ids=prompts, sampling_params=sp, return_routed_experts=True)
        assert eng.scheduler.batcher.num_preemptions > 0
        for ids, out in zip(prompts, outs):
            assert out["output_ids"] == hf_greedy(tiny_qwen3_moe, ids, 16)[0]
            assert_routing_matches(tiny_qwen3_moe, ids, out)


def test_a_row_dropped_at_launch_reads_its_routing_after_the_step_in_flight(tiny_qwen3_moe, monkeypatch):
    """Sequences finishing as a step is read back have every routed position written by a completed step, so their
    routing is read without waiting for the step in flight (`settled`, its own stream on CUDA). A row dropped at
    launch may not: here its second prefill chunk fails while the first may still be in flight, and its routing
    (the first chunk's positions) is read after that step. Both equal HF's router on the same tokens."""
    from hotswap.errors import BatchRowError
    from hotswap.runner.routed_experts import RoutedExpertsTable
    from hotswap.runner.row_params import RowParamTable

    settled_calls = []
    read, update = RoutedExpertsTable.read_many, RowParamTable.update

    def spy_read(self, spans, settled=False):
        settled_calls.append(settled)
        return read(self, spans, settled)

    failed_at = []

    def failing_update(self, entries):  # the long prompt's second chunk fails to convert
        for entry in entries:
            if entry.params.max_new_tokens == 9 and entry.start_pos > 0 and not failed_at:
                failed_at.append(entry.start_pos)
                raise BatchRowError(entry, "this request's sampling parameters cannot run: injected")
        return update(self, entries)

    prompts = [prompt_ids(500, 9), prompt_ids(501, 40)]
    monkeypatch.setattr(RoutedExpertsTable, "read_many", spy_read)
    monkeypatch.setattr(RowParamTable, "update", failing_update)
    with make_engine(tiny_qwen3_moe, chunked_prefill_size=16, max_num_batched_tokens=24) as eng:
        done, dropped = eng.generate(input_ids=prompts, sampling_params=[SP, dict(SP, max_new_tokens=9)], return_routed_experts=True)
    assert done["meta_info"]["finish_reason"]["type"] == "length" and dropped["meta_info"]["finish_reason"]["type"] == "abort"
    assert settled_calls.count(True) == 1 and settled_calls.count(False) == 1
    assert_routing_matches(tiny_qwen3_moe, prompts[0], done)
    assert dropped["output_ids"] == [] and 0 < failed_at[0] < len(prompts[1])
    got = decode_routed_experts(dropped, LAYERS, TOP_K)
    assert got.shape == (failed_at[0], LAYERS, TOP_K)  # every position the first chunk forwarded
    assert torch.equal(torch.from_numpy(got), hf_routing(tiny_qwen3_moe, prompts[1][: failed_at[0]]))


def test_streamed_request_gets_routing_with_its_last_chunk(tiny_qwen3_moe):
    prompt = prompt_ids(7, 11)
    with make_engine(tiny_qwen3_moe) as eng:
        chunks = list(eng.generate(input_ids=prompt, sampling_params=SP, stream=True, return_routed_experts=True))
        assert all("routed_experts" not in c["meta_info"] for c in chunks[:-1])
        assert_routing_matches(tiny_qwen3_moe, prompt, chunks[-1])


def test_a_request_aborted_while_queued_returns_no_routing_key(tiny_qwen3_moe):
    """SGLang's abort of a request that never ran builds its meta_info without routed_experts (tokenizer_manager
    _handle_abort_req); slime decodes whatever the key holds into prompt + output - 1 rows, so an empty string
    there broke its rollout's abort of leftover requests. One that ran returns its rows as always."""
    with make_engine(tiny_qwen3_moe) as eng:
        prompt = prompt_ids(3, 8)
        assert eng.pause_generation("in_place").success
        try:
            box = {}
            t = threading.Thread(target=lambda: box.update(out=eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True)))
            t.start()
            deadline = time.monotonic() + 30
            while eng.get_load().num_waiting < 1:
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert eng.abort_request(abort_all=True).success
            t.join(10)
        finally:
            assert eng.continue_generation().success
        meta = box["out"]["meta_info"]
        assert meta["finish_reason"]["type"] == "abort" and "routed_experts" not in meta
        ran = eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True)
        assert_routing_matches(tiny_qwen3_moe, prompt, ran)


def test_routing_from_a_start_position(tiny_qwen3_moe):
    """`routed_experts_start_len`: the rows of positions [start, prompt + output - 1) only, the start echoed
    beside them; a start past the prompt, a bad value, or one without return_routed_experts is refused."""
    prompt = prompt_ids(21, 13)
    with make_engine(tiny_qwen3_moe) as eng:
        full = eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True)
        assert full["meta_info"]["routed_experts_start_len"] == 0
        rows = decode_routed_experts(full, LAYERS, TOP_K)
        for start in (5, len(prompt)):
            out = eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True, routed_experts_start_len=start)
            assert out["output_ids"] == full["output_ids"] and out["meta_info"]["routed_experts_start_len"] == start
            assert (decode_routed_experts(out, LAYERS, TOP_K) == rows[start:]).all()
        two = [prompt, prompt_ids(22, 9)]  # one start for every prompt of a batch (fanned out with n)
        outs = eng.generate(input_ids=two, sampling_params=dict(SP, n=2), return_routed_experts=True, routed_experts_start_len=9)
        for ids, out in zip([two[0]] * 2 + [two[1]] * 2, outs):
            got = decode_routed_experts(out, LAYERS, TOP_K)
            assert got.shape[0] == len(ids) + len(out["output_ids"]) - 1 - 9
            assert torch.equal(torch.from_numpy(got), hf_routing(tiny_qwen3_moe, (ids + out["output_ids"])[:-1])[9:])
        for kwargs, why in (({"routed_experts_start_len": 10}, "past the end of prompt 1"),
                            ({"routed_experts_start_len": -1}, "integer >= 0"), ({"routed_experts_start_len": True}, "integer >= 0"),
                            ({"routed_experts_start_len": 2, "return_routed_experts": False}, "needs return_routed_experts")):
            with pytest.raises(HotswapError, match=why):
                eng.generate(input_ids=two, sampling_params=SP, **{"return_routed_experts": True, **kwargs})
        assert "routed_experts" not in eng.generate(input_ids=prompt, sampling_params=SP)["meta_info"]  # still serves


def test_releasing_the_kv_cache_releases_the_routing_table(tiny_qwen3_moe):
    """The table goes and comes back with the `kv_cache` tag; after the resume (prefix cache emptied) a new
    request's routing is HF's again."""
    prompt = prompt_ids(31, 17)
    with make_engine(tiny_qwen3_moe) as eng:
        table = eng.model_runner.routed_experts
        assert_routing_matches(tiny_qwen3_moe, prompt, eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True))
        assert eng.release_memory_occupation(tags=["kv_cache"]).success
        assert table.ids is None and eng.model_runner.routed_experts_ids is None
        with pytest.raises(EngineUnavailableError, match="memory is released"):  # refused, the scheduler unharmed
            eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True)
        assert eng.resume_memory_occupation(tags=["kv_cache"]).success
        assert table.ids.shape == table.shape and (table.ids == -1).all()
        out = eng.generate(input_ids=prompt, sampling_params=SP, return_routed_experts=True)
        assert out["meta_info"]["cached_tokens"] == 0
        assert_routing_matches(tiny_qwen3_moe, prompt, out)


def test_routing_needs_the_engine_flag_and_an_moe_model(tiny_qwen3_moe, tiny_qwen3):
    with Engine(str(tiny_qwen3_moe), device="cpu") as eng:
        with pytest.raises(HotswapError, match="enable_return_routed_experts"):
            eng.generate(input_ids=[1, 2, 3], sampling_params=SP, return_routed_experts=True)
        assert eng.generate(input_ids=[1, 2, 3], sampling_params=SP)["output_ids"]  # still serves
    with pytest.raises(HotswapError, match="mixture-of-experts"):
        Engine(str(tiny_qwen3), device="cpu", enable_return_routed_experts=True)


def test_decode_routed_experts_refuses_a_wrong_shape():
    import base64

    import numpy as np

    data = base64.b64encode(np.arange(12, dtype="<i4").tobytes()).decode()
    assert decode_routed_experts(data, 3, 2).shape == (2, 3, 2)
    with pytest.raises(ValueError, match="do not split"):
        decode_routed_experts(data, 5, 2)


def test_http_generate_and_openai_routes_return_routing(tiny_qwen3_moe):
    """Native /generate (plain and streamed) takes `return_routed_experts` and `routed_experts_start_len`; the
    OpenAI routes take both as body fields (SGLang `entrypoints/openai/protocol.py`: CompletionRequest and
    ChatCompletionRequest) and answer with the response-level `sglext.routed_experts` (SGLang's SglExt, from
    the first choice; streamed: a chunk of its own with no choices after the content, as `serving_chat.py`
    sends it) and the same base64 string on each choice (streamed: on the choice's last chunk)."""
    import httpx
    import openai

    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread, add_serve_arguments, engine_kwargs_from_args

    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    args = parser.parse_args(["--model-path", "x", "--enable-return-routed-experts"])
    assert engine_kwargs_from_args(args)["enable_return_routed_experts"] is True
    prompt = prompt_ids(9, 8)
    with make_engine(tiny_qwen3_moe) as eng, ServerThread(create_app(eng, served_model_name="tiny")) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as http:
            out = http.post("/generate", json={"input_ids": prompt, "sampling_params": SP, "return_routed_experts": True}).json()
            assert_routing_matches(tiny_qwen3_moe, prompt, out)
            with http.stream("POST", "/generate", json={"input_ids": prompt, "sampling_params": SP, "stream": True,
                                                         "return_routed_experts": True}) as resp:
                events = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
            assert events[-1]["meta_info"]["routed_experts"] == out["meta_info"]["routed_experts"]
            # top-level routed_experts_start_len, as SGLang's GenerateReqInput; the flag inside sampling_params works too
            part = http.post("/generate", json={"input_ids": prompt, "sampling_params": dict(SP, return_routed_experts=True),
                                                "routed_experts_start_len": 3}).json()
            assert part["meta_info"]["routed_experts_start_len"] == 3
            assert (decode_routed_experts(part, LAYERS, TOP_K) == decode_routed_experts(out, LAYERS, TOP_K)[3:]).all()
            bad = http.post("/generate", json={"input_ids": prompt, "sampling_params": SP, "return_routed_experts": True,
                                               "routed_experts_start_len": len(prompt) + 1})
            assert bad.status_code == 400 and "routed_experts_start_len" in bad.text
        oai = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=30)
        extra = {"ignore_eos": True, "return_routed_experts": True}
        res = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body=extra)
        assert res.choices[0].model_extra["routed_experts"] == out["meta_info"]["routed_experts"]
        assert res.model_extra["sglext"] == {"routed_experts": out["meta_info"]["routed_experts"]}
        res = oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, extra_body={**extra, "routed_experts_start_len": 3})
        assert res.model_extra["sglext"]["routed_experts"] == res.choices[0].model_extra["routed_experts"] == part["meta_info"]["routed_experts"]
        stream = list(oai.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, stream=True,
                                             extra_body={**extra, "routed_experts_start_len": 3}))
        routed = [c.choices[0].model_extra.get("routed_experts") for c in stream if c.choices]
        assert routed[-1] == part["meta_info"]["routed_experts"] and not any(routed[:-1])  # on the last chunk only
        assert [c.model_extra["sglext"] for c in stream if not c.choices] == [{"routed_experts": part["meta_info"]["routed_experts"]}]
        messages = [{"role": "user", "content": "route me"}]
        chat = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, extra_body=extra)
        assert chat.model_extra["sglext"]["routed_experts"] == chat.choices[0].model_extra["routed_experts"]
        stream = list(oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0, stream=True,
                                                  extra_body=extra, stream_options={"include_usage": True}))
        routed = [c.choices[0].model_extra.get("routed_experts") for c in stream if c.choices]
        assert routed[-1] == chat.choices[0].model_extra["routed_experts"] and not any(routed[:-1])
        tail = [c for c in stream if not c.choices]  # the routing chunk, then the usage chunk
        assert tail[0].model_extra["sglext"] == chat.model_extra["sglext"] and tail[-1].usage.completion_tokens == 6
        part_chat = oai.chat.completions.create(model="tiny", messages=messages, max_tokens=6, temperature=0,
                                                extra_body={**extra, "routed_experts_start_len": 2})
        rows = decode_routed_experts(part_chat.model_extra["sglext"]["routed_experts"], LAYERS, TOP_K)
        assert (rows == decode_routed_experts(chat.model_extra["sglext"]["routed_experts"], LAYERS, TOP_K)[2:]).all()
        with pytest.raises(openai.BadRequestError, match="routed_experts_start_len needs return_routed_experts"):
            oai.chat.completions.create(model="tiny", messages=messages, max_tokens=2, extra_body={"routed_experts_start_len": 2})


@pytest.mark.gpu
def test_cuda_graphs_write_the_same_routing_as_the_cpu(tiny_qwen3_moe):
    """Decode and extend CUDA graphs write the routing table too (it is in their captured context)."""
    prompts = [prompt_ids(60 + i, n) for i, n in enumerate([5, 30, 9])]
    with make_engine(tiny_qwen3_moe) as cpu:
        ref = cpu.generate(input_ids=prompts, sampling_params=SP, return_routed_experts=True)
    with Engine(str(tiny_qwen3_moe), device="cuda", dtype="float32", enable_return_routed_experts=True) as gpu:
        assert gpu.model_runner.cuda_graphs is not None
        got = gpu.generate(input_ids=prompts, sampling_params=SP, return_routed_experts=True)
    for a, b in zip(ref, got):
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["routed_experts"] == b["meta_info"]["routed_experts"]


@pytest.mark.gpu
def test_gpu_kv_release_frees_the_table_and_recaptured_graphs_write_the_new_one(tiny_qwen3_moe):
    """Released with the KV, the table's device memory is returned; the graphs captured after the resume
    write the new table (a graph still holding the old address would leave its rows at -1)."""
    prompts = [prompt_ids(70 + i, n) for i, n in enumerate([6, 25])]
    with make_engine(tiny_qwen3_moe) as cpu:
        ref = cpu.generate(input_ids=prompts, sampling_params=SP, return_routed_experts=True)
    with Engine(str(tiny_qwen3_moe), device="cuda", dtype="float32", enable_return_routed_experts=True, num_pages=4096) as gpu:
        assert gpu.model_runner.cuda_graphs is not None
        table = gpu.model_runner.routed_experts
        table_bytes = table.ids.numel() * table.ids.element_size()
        torch.cuda.synchronize()
        held = torch.cuda.memory_allocated(gpu.device)
        assert gpu.release_memory_occupation(tags=["kv_cache"]).success
        assert held - torch.cuda.memory_allocated(gpu.device) >= table_bytes + gpu.model_runner.kv_cache.bytes_per_page * 4096
        assert gpu.resume_memory_occupation(tags=["kv_cache"]).success
        got = gpu.generate(input_ids=prompts, sampling_params=SP, return_routed_experts=True)
    for a, b in zip(ref, got):
        assert a["output_ids"] == b["output_ids"]
        assert a["meta_info"]["routed_experts"] == b["meta_info"]["routed_experts"]
