"""Greedy parity with transformers, prefix cache, preemption, chunked prefill, logprobs, sampling."""

from __future__ import annotations

import asyncio
import copy

import pytest
import torch
from engine_support import make_engine
from hf_reference import assert_greedy_matches_hf, hf_greedy, prompt_ids

from hotswap import Engine, HotswapError
from hotswap.runner.sampler import SamplingBatch, sample
from hotswap.scheduler.output_streamer import OutputStreamer

GREEDY = {"max_new_tokens": 10, "temperature": 0, "ignore_eos": True}


def assert_idle_invariants(engine: Engine) -> None:
    res = engine.check_invariants()
    assert res.success, res.message


@pytest.mark.parametrize("family", ["tiny_qwen3", "tiny_qwen2", "tiny_llama"])
def test_greedy_parity_ragged_batch(family, request):
    path = request.getfixturevalue(family)
    prompts = [prompt_ids(i, n) for i, n in enumerate([3, 17, 40, 9])]
    with make_engine(path) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        assert_greedy_matches_hf(path, prompts, outs, GREEDY["max_new_tokens"])
        for ids, out in zip(prompts, outs):
            assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 10}
            assert out["meta_info"]["prompt_tokens"] == len(ids)
            assert out["meta_info"]["completion_tokens"] == 10
        assert_idle_invariants(engine)


def test_one_generate_call_is_admitted_at_once(tiny_qwen3):
    """A list of prompts reaches the scheduler as one message: the first step prefills them all, so 16
    prompts of 4 new tokens take 4 steps (submitted one by one, the first steps would see a few)."""
    prompts = [prompt_ids(300 + i, 6) for i in range(16)]
    with make_engine(tiny_qwen3) as engine:
        before = engine.scheduler.num_steps
        outs = engine.generate(input_ids=prompts, sampling_params=dict(GREEDY, max_new_tokens=4))
        assert [len(o["output_ids"]) for o in outs] == [4] * 16
        assert engine.scheduler.num_steps - before == 4


def test_shared_prefix_hits_cache_and_matches(tiny_qwen3):
    prefix = prompt_ids(100, 64)
    prompts = [prefix + prompt_ids(200 + i, 5) for i in range(3)]
    with make_engine(tiny_qwen3) as engine:
        first = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
        assert first["meta_info"]["cached_tokens"] == 0
        rest = engine.generate(input_ids=prompts[1:], sampling_params=GREEDY)
        for ids, out in zip(prompts[1:], rest):
            assert out["meta_info"]["cached_tokens"] == 64
            assert out["output_ids"] == hf_greedy(tiny_qwen3, ids, 10)[0]
        again = engine.generate(input_ids=prompts[0], sampling_params=GREEDY)
        assert again["meta_info"]["cached_tokens"] >= 64
        assert again["output_ids"] == first["output_ids"]
        assert_idle_invariants(engine)


def test_prompts_with_a_common_head_sent_together_compute_it_once(tiny_qwen3):
    """A batch of prompts sharing a 64-token system prompt: the first computes the head, the others wait a step
    and match it (their meta_info says so), and every output still equals HF's."""
    head = prompt_ids(100, 64)
    prompts = [head + prompt_ids(200 + i, 5) for i in range(3)]
    with make_engine(tiny_qwen3) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY, return_logprob=True)
        assert [o["meta_info"]["cached_tokens"] for o in outs] == [0, 64, 64]
        assert_greedy_matches_hf(tiny_qwen3, prompts, outs, GREEDY["max_new_tokens"])
        assert_idle_invariants(engine)


def test_small_pool_forces_preemption(tiny_qwen3):
    prompts = [prompt_ids(300 + i, 20) for i in range(6)]
    sp = {"max_new_tokens": 24, "temperature": 0, "ignore_eos": True}
    with make_engine(tiny_qwen3, num_pages=40) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=sp)
        assert engine.scheduler.batcher.num_preemptions > 0
        for ids, out in zip(prompts, outs):
            assert out["output_ids"] == hf_greedy(tiny_qwen3, ids, 24)[0]
        assert_idle_invariants(engine)


def test_chunked_prefill_long_prompts(tiny_llama):
    prompts = [prompt_ids(400 + i, n) for i, n in enumerate([150, 90, 7])]
    with make_engine(tiny_llama, chunked_prefill_size=32, max_num_batched_tokens=48) as engine:
        outs = engine.generate(input_ids=prompts, sampling_params=GREEDY)
        for ids, out in zip(prompts, outs):
            assert out["output_ids"] == hf_greedy(tiny_llama, ids, 10)[0]
        assert_idle_invariants(engine)


def test_text_prompts_stop_strings_and_stream(tiny_qwen3):
    with make_engine(tiny_qwen3) as engine:
        full = engine.generate("the cat sat on the mat", {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True})
        assert full["text"] == engine.tokenizer.decode(full["output_ids"], skip_special_tokens=True)
        chunks = list(engine.generate("the cat sat on the mat", {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True}, stream=True))
        assert "".join(c["delta_text"] for c in chunks) == full["text"]
        assert chunks[-1]["output_ids"] == full["output_ids"]
        stop = full["text"][6:9]
        if stop.strip():
            out = engine.generate("the cat sat on the mat", {"max_new_tokens": 20, "temperature": 0, "ignore_eos": True, "stop": [stop]})
            assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": stop}
            assert stop not in out["text"] and full["text"].startswith(out["text"])
        tok = full["output_ids"][3]
        out = engine.generate("the cat sat on the mat", {"max_new_tokens": 20, "temperature": 0, "stop_token_ids": [tok]})
        assert out["output_ids"][-1] == tok and len(out["output_ids"]) == full["output_ids"].index(tok) + 1
        assert_idle_invariants(engine)


def test_batched_final_texts_equal_tokenizer_decode(tiny_qwen3):
    """Requests that finish in the same step get their texts from one batched decode (the fast tokenizer's
    backend); each must equal `tokenizer.decode` of its ids, special tokens kept or skipped per request."""
    with make_engine(tiny_qwen3) as engine:
        tok = engine.tokenizer
        specials = [t for t in tok.all_special_ids if t is not None]
        assert specials, "the fixture tokenizer should define special tokens"
        streamer = engine.scheduler.streamer
        assert streamer.backend is not None  # the fast path is the one under test
        id_lists = [prompt_ids(50 + i, 9) + [specials[i % len(specials)]] + prompt_ids(80 + i, 4) for i in range(6)]
        skips = [i % 2 == 0 for i in range(6)]
        want = [tok.decode(ids, skip_special_tokens=skip) for ids, skip in zip(id_lists, skips)]
        assert streamer.decode_many(id_lists, skips, [[]] * 6) == want
        assert [streamer.decode(ids, skip) for ids, skip in zip(id_lists, skips)] == want
        # a tokenizer with a clean-up pass configured keeps going through tokenizer.decode
        cleaning = copy.deepcopy(tok)
        cleaning.clean_up_tokenization_spaces = True
        slow = OutputStreamer(tokenizer=cleaning, eos_token_ids=frozenset(), max_context_len=64)
        assert slow.backend is None
        assert slow.decode_many(id_lists, skips, [[]] * 6) == [cleaning.decode(ids, skip_special_tokens=skip) for ids, skip in zip(id_lists, skips)]
        outs = engine.generate(input_ids=[prompt_ids(20 + i, 5) for i in range(5)],
                               sampling_params=[dict(GREEDY, skip_special_tokens=i % 2 == 0) for i in range(5)])
        for i, out in enumerate(outs):
            assert out["text"] == tok.decode(out["output_ids"], skip_special_tokens=i % 2 == 0)


def test_seeded_sampling_is_reproducible_and_batch_invariant(tiny_qwen3):
    ids = prompt_ids(7, 12)
    sp = {"max_new_tokens": 16, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    with make_engine(tiny_qwen3) as engine:
        a = engine.generate(input_ids=ids, sampling_params=sp)
        batch = engine.generate(input_ids=[prompt_ids(8, 30), ids, prompt_ids(9, 5)],
                                sampling_params=[dict(sp, seed=1), sp, dict(sp, seed=2)])
        assert batch[1]["output_ids"] == a["output_ids"]
        other = engine.generate(input_ids=ids, sampling_params=dict(sp, seed=99))
        assert other["output_ids"] != a["output_ids"]
        n = engine.generate(input_ids=ids, sampling_params=dict(sp, n=3))
        assert len(n) == 3 and n[0]["output_ids"] == a["output_ids"] and n[1]["output_ids"] != n[0]["output_ids"]
        assert_idle_invariants(engine)


def test_async_generate(tiny_qwen3):
    with make_engine(tiny_qwen3) as engine:
        async def main():
            return await asyncio.gather(*(engine.async_generate(input_ids=prompt_ids(i, 8), sampling_params=GREEDY) for i in range(4)))

        outs = asyncio.run(main())
        for i, out in enumerate(outs):
            assert out["output_ids"] == hf_greedy(tiny_qwen3, prompt_ids(i, 8), 10)[0]


def _allowed(logits: torch.Tensor, temp: float, top_k: int, top_p: float, min_p: float) -> set[int]:
    probs = torch.softmax(logits / temp, -1)
    order = probs.argsort(descending=True)
    keep, cum = set(), 0.0
    for rank, tok in enumerate(order.tolist()):
        p = probs[tok].item()
        if rank >= top_k or cum > top_p or p < min_p * probs.max().item():
            if rank > 0:
                continue
        keep.add(tok)
        cum += p
    return keep


@pytest.mark.parametrize("top_k,top_p,min_p", [(5, 1.0, 0.0), (-1, 0.6, 0.0), (-1, 1.0, 0.2), (8, 0.9, 0.05)])
def test_filters_never_emit_outside_allowed_set(top_k, top_p, min_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 64, generator=g)
    allowed = _allowed(logits[0], 0.8, top_k if top_k > 0 else 64, top_p, min_p)
    rows = 512
    batch = SamplingBatch(
        temperatures=torch.full((rows,), 0.8), top_ps=torch.full((rows,), top_p), top_ks=torch.full((rows,), top_k if top_k > 0 else 64),
        min_ps=torch.full((rows,), min_p), seeds=torch.arange(rows), steps=torch.zeros(rows, dtype=torch.int64),
        all_greedy=False, needs_filter=True, needs_logprobs=False, max_top_logprobs=0)
    seen = set(sample(logits.expand(rows, -1).contiguous(), batch).token_ids.tolist())
    assert seen <= allowed
    assert len(allowed) > 1 and len(seen) > 1  # it really samples from a set of several


def test_sampling_matches_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    rows = 20000
    batch = SamplingBatch(temperatures=torch.ones(rows), top_ps=torch.ones(rows), top_ks=torch.full((rows,), 4), min_ps=torch.zeros(rows),
                          seeds=torch.arange(rows), steps=torch.zeros(rows, dtype=torch.int64), all_greedy=False, needs_filter=False, needs_logprobs=False,
                          max_top_logprobs=0)
    counts = torch.bincount(sample(logits.expand(rows, -1).contiguous(), batch).token_ids, minlength=4).float() / rows
    torch.testing.assert_close(counts, torch.softmax(logits[0], -1), atol=0.015, rtol=0)


def test_bad_input_is_named_and_engine_keeps_serving(tiny_qwen3, tmp_path):
    with make_engine(tiny_qwen3) as engine:
        with pytest.raises(HotswapError, match="empty"):
            engine.generate("", GREEDY)
        with pytest.raises(HotswapError, match="context length"):
            engine.generate(input_ids=[5] * 600, sampling_params=GREEDY)
        with pytest.raises(HotswapError, match="unknown sampling parameter"):
            engine.generate("hi", {"max_tokens": 3})
        with pytest.raises(HotswapError, match="top_p"):
            engine.generate("hi", {"top_p": 1.5})
        with pytest.raises(HotswapError, match="stop"):
            engine.generate("hi", {"stop": 5})
        with pytest.raises(HotswapError, match="temperature"):
            engine.generate("hi", {"temperature": -1})
        with pytest.raises(HotswapError, match="vocabulary"):
            engine.generate(input_ids=[10**6], sampling_params=GREEDY)
        assert len(engine.generate("hello", GREEDY)["output_ids"]) == 10
        assert_idle_invariants(engine)
    with pytest.raises(HotswapError, match="no config.json"):
        Engine(str(tmp_path), device="cpu")
    (tmp_path / "config.json").write_text('{"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}')
    with pytest.raises(HotswapError, match="unsupported architecture"):
        Engine(str(tmp_path), device="cpu")
    with pytest.raises(HotswapError, match="unknown engine argument"):
        Engine(str(tiny_qwen3), device="cpu", page_sizes=3)


def test_failed_batch_aborts_cleanly_and_leaves_no_stale_cache(tiny_qwen3, monkeypatch):
    """A device fault mid-step fails that step's requests with a message; the engine keeps serving and
    never reuses KV the failed step did not write."""
    ids = prompt_ids(77, 40)
    with make_engine(tiny_qwen3) as engine:
        real_run = engine.model_runner.run
        calls = {"n": 0}

        def flaky(entries, prev=None):
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("injected device fault")
            return real_run(entries, prev)

        monkeypatch.setattr(engine.model_runner, "run", flaky)
        failed = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert failed["meta_info"]["finish_reason"]["type"] == "abort"
        assert "injected device fault" in failed["meta_info"]["finish_reason"]["message"]
        assert_idle_invariants(engine)
        again = engine.generate(input_ids=ids, sampling_params=GREEDY)
        assert again["meta_info"]["cached_tokens"] == 0
        assert again["output_ids"] == hf_greedy(tiny_qwen3, ids, 10)[0]
        assert_idle_invariants(engine)


def test_a_device_fault_right_after_a_stop_token_caches_no_unwritten_kv(tiny_qwen3, monkeypatch):
    """The launch after the step that sampled a request's stop token fails: that request ends (stop), and its
    last position, which only the failed step would have written, must stay out of the prefix cache; a next turn
    (the prompt, the answer and more) that matches it would read KV nobody wrote."""
    ids = prompt_ids(91, 13)
    ref = hf_greedy(tiny_qwen3, ids, 12)[0]
    # a stop token whose position (13 + j) completes a 4-token page, not sampled before
    j = next(j for j in range(12) if (13 + j + 1) % 4 == 0 and ref[j] not in ref[:j])
    with make_engine(tiny_qwen3) as engine:
        real_run = engine.model_runner.run
        calls = {"n": 0}

        def flaky(entries, prev=None):
            calls["n"] += 1
            if calls["n"] == j + 2:  # the launch right after the step that sampled the stop token
                raise RuntimeError("injected device fault")
            return real_run(entries, prev)

        monkeypatch.setattr(engine.model_runner, "run", flaky)
        first = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 12, "temperature": 0, "stop_token_ids": [ref[j]]})
        assert first["meta_info"]["finish_reason"]["type"] == "stop" and first["output_ids"] == ref[: j + 1]
        monkeypatch.setattr(engine.model_runner, "run", real_run)
        turn = ids + ref[: j + 1] + prompt_ids(92, 3)
        out = engine.generate(input_ids=turn, sampling_params=GREEDY)
        assert out["output_ids"] == hf_greedy(tiny_qwen3, turn, GREEDY["max_new_tokens"])[0]
        assert_idle_invariants(engine)


def test_a_dead_scheduler_fails_every_request_instead_of_hanging(tiny_qwen3, monkeypatch):
    """Should the scheduler loop itself raise (a bug, not a device fault), the request it held is aborted
    with the reason, and every later call fails at once with it instead of waiting forever."""
    ids = prompt_ids(78, 12)
    with make_engine(tiny_qwen3) as engine:
        assert engine.generate(input_ids=ids, sampling_params=GREEDY)["meta_info"]["finish_reason"]["type"] == "length"

        def broken():
            raise RuntimeError("injected scheduler bug")

        monkeypatch.setattr(engine.scheduler, "schedule", broken)
        held = engine.generate(input_ids=ids, sampling_params=GREEDY)
        reason = held["meta_info"]["finish_reason"]
        assert reason["type"] == "abort" and "injected scheduler bug" in reason["message"]
        engine.scheduler.thread.join(timeout=30)
        assert not engine.scheduler.thread.is_alive()
        later = engine.generate(input_ids=[ids, ids], sampling_params=GREEDY)
        assert all(o["meta_info"]["finish_reason"]["type"] == "abort" for o in later)
        load = engine.get_load()
        assert not load.success and "injected scheduler bug" in load.message
        assert not engine.update_weights_from_disk(str(tiny_qwen3)).success


def test_shutdown_frees_the_engine_state_while_the_object_lives_on(tiny_qwen3):
    """A closed engine that its caller still holds (and whose components reference each other) keeps no
    weights, KV storage or kept IPC mappings: on a GPU that memory goes back without a gc pass."""
    engine = Engine(str(tiny_qwen3), device="cpu", page_size=4)
    engine.generate(input_ids=prompt_ids(1, 6), sampling_params={"max_new_tokens": 2, "temperature": 0})
    runner, updater, reads = engine.model_runner, engine.scheduler.weight_updater, engine.scheduler.weight_reads
    engine.shutdown()
    assert runner.kv_cache.kv is None and runner.weight_map is None
    assert all(p.numel() == 0 for p in runner.model.parameters())
    assert updater.ipc_mappings.max_bytes == 0 and not updater.ipc_mappings.storages and reads.snapshot is None


def test_an_engine_makes_full_garbage_collections_rare_in_its_process(tiny_qwen3):
    """The offline engine's scheduler thread allocates per row per step as a server's does (hotswap/gc_policy.py): its
    process gets the serving processes' collector threshold; a collector turned off stays off."""
    import gc

    from hotswap.gc_policy import GC_FIRST_THRESHOLD

    saved = gc.get_threshold()
    try:
        for before, after in (((700, 10, 10), (GC_FIRST_THRESHOLD, 10, 10)), ((0, 10, 10), (0, 10, 10))):
            gc.set_threshold(*before)
            engine = make_engine(tiny_qwen3)
            engine.shutdown()
            assert gc.get_threshold() == after
    finally:
        gc.set_threshold(*saved)
