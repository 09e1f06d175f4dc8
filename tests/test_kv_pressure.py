"""A small KV pool under shared prefixes and long outputs: every request finishes, none wedges, and a
request preempted for KV space during a weight update still computes all of its output on one policy."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from hf_reference import prompt_ids
from safetensors.torch import load_file

from hotswap import Engine

LONG = {"max_new_tokens": 120, "temperature": 0, "ignore_eos": True}
WARM = {"max_new_tokens": 1, "temperature": 0, "ignore_eos": True}


def shared_prefix_prompts(n: int = 8) -> list[list[int]]:
    common = prompt_ids(7000, 12)
    return [common + prompt_ids(7100 + i, 8) for i in range(n)]


@pytest.fixture(scope="module")
def references(tiny_qwen3, tiny_qwen3_v2) -> dict[str, list[list[int]]]:
    """Greedy outputs of both checkpoints, from engines with room to spare."""
    refs = {}
    for name, path in (("A", tiny_qwen3), ("B", tiny_qwen3_v2)):
        with Engine(str(path), device="cpu", page_size=4) as engine:
            refs[name] = [o["output_ids"] for o in engine.generate(input_ids=shared_prefix_prompts(), sampling_params=LONG)]
    assert refs["A"] != refs["B"]
    return refs


def small_engine(path) -> Engine:
    return Engine(str(path), device="cpu", page_size=4, num_pages=48)


def generate_concurrently(engine: Engine, prompts: list[list[int]], pool: ThreadPoolExecutor):
    return [pool.submit(engine.generate, input_ids=ids, sampling_params=LONG) for ids in prompts]


def assert_drained(engine: Engine) -> None:
    load = engine.get_load()
    assert (load.num_running, load.num_waiting) == (0, 0)
    res = engine.check_invariants()
    assert res.success, res.message


def test_long_generations_over_warm_shared_prefixes_all_finish(tiny_qwen3, references):
    prompts = shared_prefix_prompts()
    with small_engine(tiny_qwen3) as engine, ThreadPoolExecutor(8) as pool:
        engine.generate(input_ids=prompts, sampling_params=WARM)
        futures = generate_concurrently(engine, prompts, pool)
        outs = [f.result(timeout=300) for f in futures]
        assert [o["output_ids"] for o in outs] == references["A"]
        assert engine.scheduler.batcher.num_preemptions > 0
        assert_drained(engine)


def test_request_preempted_during_an_update_finishes_on_one_policy(tiny_qwen3, tiny_qwen3_v2, references):
    """A -> B from disk while long requests are being preempted for KV space, then B -> A from tensors of
    the same model: each output is one policy's greedy output, and reports that version only."""
    prompts = shared_prefix_prompts()
    with small_engine(tiny_qwen3) as engine, ThreadPoolExecutor(8) as pool:
        version_a = engine.weight_version
        engine.generate(input_ids=prompts, sampling_params=WARM)
        first = generate_concurrently(engine, prompts, pool)
        deadline = time.monotonic() + 120
        while engine.scheduler.batcher.num_preemptions == 0:  # someone has output under A and no pages
            assert time.monotonic() < deadline and not all(f.done() for f in first)
            time.sleep(0.005)
        res = engine.update_weights_from_disk(str(tiny_qwen3_v2), weight_version="B")
        assert res.success, res.message
        second = generate_concurrently(engine, prompts, pool)
        outs = [f.result(timeout=300) for f in first + second]
        for i, out in enumerate(outs):
            meta = out["meta_info"]
            assert "weight_versions" not in meta, f"request {i} mixed weights: {meta['weight_versions']}"
            policy = "A" if meta["weight_version"] == version_a else "B"
            assert meta["weight_version"] in (version_a, "B")
            assert out["output_ids"] == references[policy][i % len(prompts)], f"request {i} is not {policy}'s greedy output"
        assert all(o["meta_info"]["weight_version"] == version_a for o in outs[:8])  # drained on A
        assert all(o["meta_info"]["weight_version"] == "B" for o in outs[8:])
        assert_drained(engine)

        tensors = load_file(str(tiny_qwen3 / "model.safetensors"))
        third = generate_concurrently(engine, prompts, pool)
        deadline = time.monotonic() + 120
        while engine.get_load().num_running == 0 and not all(f.done() for f in third):
            assert time.monotonic() < deadline
            time.sleep(0.005)
        res = engine.update_weights_from_tensor(list(tensors.items()), weight_version="A2")
        assert res.success, res.message
        for i, out in enumerate(f.result(timeout=300) for f in third):
            assert "weight_versions" not in out["meta_info"] and out["meta_info"]["weight_version"] == "B"
            assert out["output_ids"] == references["B"][i]
        after = engine.generate(input_ids=prompts, sampling_params=LONG)
        assert [o["output_ids"] for o in after] == references["A"]
        assert all(o["meta_info"]["weight_version"] == "A2" for o in after)
        assert_drained(engine)


def test_a_request_that_outgrows_the_cache_ends_at_the_cache_and_others_finish(tiny_qwen3, references):
    """SGLang's init_req_max_new_tokens: max_new_tokens is cut to the cache (max_total_num_tokens - 2 - prompt)."""
    with small_engine(tiny_qwen3) as engine, ThreadPoolExecutor(2) as pool:
        cap = engine.capacity()
        assert (cap.num_pages, cap.page_size, cap.max_total_tokens) == (48, 4, 192)
        big = pool.submit(engine.generate, input_ids=prompt_ids(7300, 100),
                          sampling_params={"max_new_tokens": 150, "temperature": 0, "ignore_eos": True})
        small = pool.submit(engine.generate, input_ids=shared_prefix_prompts()[0], sampling_params=LONG)
        out = big.result(timeout=120)
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 192 - 2 - 100}
        assert len(out["output_ids"]) == 90
        assert small.result(timeout=120)["output_ids"] == references["A"][0]
        assert_drained(engine)
