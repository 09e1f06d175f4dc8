"""A request frozen by pause_generation(in_place) while its prompt is still being prefilled in chunks, then
continued after a weight update: no token of it was sampled by the old weights, so every token is labelled with
the new version. Its prompt's KV must then be the new weights' too (recomputed), else its tokens and logprobs are
those of neither policy while nothing in the output says so."""

from __future__ import annotations

import threading
import time

import torch
from engine_support import make_engine
from hf_reference import hf_model, prompt_ids
from safetensors.torch import load_file


def _frozen_mid_prefill(engine, deadline_s: float = 20.0) -> bool:
    """Pause in place at a moment the only running sequence has computed part of its prompt and sampled nothing."""
    deadline = time.monotonic() + deadline_s
    batcher = engine.scheduler.batcher
    while time.monotonic() < deadline:
        running = list(batcher.running)
        if running and 0 < running[0].num_computed < running[0].prompt_len // 2 and not running[0].output_ids:
            engine.pause_generation(mode="in_place")
            seq = batcher.running[0] if batcher.running else None
            if seq is not None and 0 < seq.num_computed < seq.prompt_len and not seq.output_ids:
                return True
            engine.continue_generation()
            return False
        time.sleep(0.0005)
    return False


def test_a_request_frozen_mid_prefill_across_an_update_is_all_new_policy(tiny_qwen3, tiny_qwen3_v2):
    prompt = prompt_ids(7, 400)
    new = sorted(load_file(str(next(tiny_qwen3_v2.glob("*.safetensors")))).items())
    engine = make_engine(tiny_qwen3, chunked_prefill_size=4)
    try:
        for _ in range(5):  # the pause must land mid-prefill: try again if the prefill outran it
            box = {}
            worker = threading.Thread(target=lambda: box.update(out=engine.generate(
                input_ids=prompt, sampling_params={"max_new_tokens": 6, "temperature": 1.0, "ignore_eos": True}, return_logprob=True)))
            worker.start()
            frozen = _frozen_mid_prefill(engine)
            if frozen:
                assert engine.update_weights_from_tensor(new, weight_version="v2").success
                assert engine.continue_generation().success
            worker.join(60)
            if frozen:
                break
            engine.update_weights_from_disk(str(tiny_qwen3))  # back to the first weights for the next try
        assert frozen, "could not pause in place mid-prefill"
        out = box["out"]
        meta = out["meta_info"]
        assert set(meta.get("weight_versions") or [meta["weight_version"]]) == {"v2"}
        ids = out["output_ids"]
        got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        with torch.no_grad():
            logits = hf_model(str(tiny_qwen3_v2))(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
        want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    finally:
        engine.shutdown()


def _wait(cond, deadline_s: float = 20.0) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.0005)
    return False


def test_a_request_frozen_mid_recompute_across_an_update_recomputes_with_the_new_policy(tiny_qwen3, tiny_qwen3_v2):
    """Retracted (or preempted) after sampling some tokens, then frozen in place while it recomputes its KV in chunks:
    the tokens it samples after the update (labelled v2) must be the new policy's on the whole sequence."""
    prompt = prompt_ids(8, 300)
    new = sorted(load_file(str(next(tiny_qwen3_v2.glob("*.safetensors")))).items())
    engine = make_engine(tiny_qwen3, chunked_prefill_size=4)
    batcher = engine.scheduler.batcher
    try:
        for _ in range(5):
            box = {}
            worker = threading.Thread(target=lambda: box.update(out=engine.generate(
                input_ids=prompt, sampling_params={"max_new_tokens": 40, "temperature": 1.0, "ignore_eos": True}, return_logprob=True)))
            worker.start()
            frozen = False
            if _wait(lambda: batcher.running and len(batcher.running[0].output_ids) >= 3):
                engine.pause_generation(mode="retract")
                assert engine.flush_cache().success  # its pages leave the prefix cache too
                engine.continue_generation()  # it recomputes its 300+ tokens, 4 a step
                def recomputing():
                    r = list(batcher.running)
                    return bool(r) and r[0].output_ids and 0 < r[0].num_computed < r[0].num_tokens // 2
                if _wait(recomputing):
                    engine.pause_generation(mode="in_place")
                    r = list(batcher.running)
                    frozen = bool(r) and r[0].num_computed < r[0].num_tokens - 1
                    if frozen:
                        assert engine.update_weights_from_tensor(new, weight_version="v2").success
                    engine.continue_generation()
            worker.join(60)
            if frozen:
                break
            engine.update_weights_from_disk(str(tiny_qwen3), weight_version="default")
        assert frozen, "could not pause in place mid-recompute"
        out = box["out"]
        meta, ids = out["meta_info"], out["output_ids"]
        versions = meta.get("weight_versions") or [meta["weight_version"]] * len(ids)
        first = versions.index("v2")
        assert set(versions[:first]) == {"default"} and set(versions[first:]) == {"v2"}
        got = torch.tensor([lp for lp, _, _ in meta["output_token_logprobs"]])
        for path, span in ((tiny_qwen3, slice(0, first)), (tiny_qwen3_v2, slice(first, len(ids)))):
            with torch.no_grad():
                logits = hf_model(str(path))(torch.tensor([prompt + ids])).logits[0, len(prompt) - 1 : -1].float()
            want = torch.log_softmax(logits, -1).gather(1, torch.tensor(ids).unsqueeze(1)).squeeze(1)
            torch.testing.assert_close(got[span], want[span], atol=1e-4, rtol=1e-4)
    finally:
        engine.shutdown()
