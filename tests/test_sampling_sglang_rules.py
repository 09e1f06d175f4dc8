"""Sampling rules read from SGLang's source (sampling/sampling_params.py, penaltylib/min_new_tokens.py,
managers/schedule_batch.py): a near-zero temperature is greedy, None is a field's default on every path, min_new_tokens
masks eos under ignore_eos, and the tokenizer's eos ends a sequence beside the config's."""

from __future__ import annotations

import json
import shutil

import httpx
import pytest

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

IDS = [5, 17, 99, 230, 41, 7]
EOS_FORCED = {"temperature": 0, "logit_bias": {"0": 100.0}}  # the tiny models' eos is id 0


def _lps(out: dict) -> list[float]:
    return [lp for lp, _, _ in out["meta_info"]["output_token_logprobs"]]


def test_a_temperature_below_sglangs_epsilon_samples_greedily(engine):
    """SGLang's SamplingParams.__post_init__: 0 <= temperature < 1e-6 becomes top_k 1 at temperature 1, so the tokens
    are the argmax and the logprobs the raw ones (they were those of logits / 1e-5: all 0.0)."""
    greedy = engine.generate(input_ids=IDS, sampling_params={"max_new_tokens": 4, "temperature": 0}, return_logprob=True)
    tiny = engine.generate(input_ids=IDS, sampling_params={"max_new_tokens": 4, "temperature": 1e-7, "seed": 3}, return_logprob=True)
    assert tiny["output_ids"] == greedy["output_ids"]
    # the second request's prompt is a prefix-cache hit, computed in another order: equal to float32 rounding
    assert _lps(tiny) == pytest.approx(_lps(greedy), abs=1e-5) and all(lp < -0.1 for lp in _lps(tiny))


def test_null_sampling_fields_are_their_defaults_on_every_path(engine):
    """SGLang reads None as the default for every sampling field ("so that callers (e.g. /generate) can pass null") and
    takes None for the Optional return_logprob / top_logprobs_num; the Engine refused temperature None where HTTP took it."""
    base = {"max_new_tokens": 3, "temperature": 0}
    want = engine.generate(input_ids=IDS, sampling_params=base)["output_ids"]
    for key in ("top_p", "top_k", "min_p", "n", "ignore_eos", "skip_special_tokens", "spaces_between_special_tokens"):
        assert engine.generate(input_ids=IDS, sampling_params={**base, key: None})["output_ids"] == want, key
    sampled = {"max_new_tokens": 3, "seed": 5}
    assert (engine.generate(input_ids=IDS, sampling_params={**sampled, "temperature": None})["output_ids"]
            == engine.generate(input_ids=IDS, sampling_params=sampled)["output_ids"])
    with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as http:
        r = http.post("/generate", json={"input_ids": IDS, "sampling_params": {**base, "ignore_eos": None},
                                         "return_logprob": None, "top_logprobs_num": None})
        assert r.status_code == 200, r.text
        assert r.json()["output_ids"] == want and "output_token_logprobs" not in r.json()["meta_info"]


def test_min_new_tokens_masks_eos_under_ignore_eos(engine):
    """SGLang's BatchedMinNewTokensPenalizer masks eos whatever ignore_eos says (vLLM's min_tokens too)."""
    out = engine.generate(input_ids=IDS, sampling_params={**EOS_FORCED, "max_new_tokens": 4, "ignore_eos": True, "min_new_tokens": 2})
    assert 0 not in out["output_ids"][:2] and out["output_ids"][2:] == [0, 0]


def test_the_tokenizers_eos_ends_a_sequence_beside_the_configs(tiny_qwen3, tmp_path):
    """A tokenizer whose eos (<|im_end|>, id 2) is not config.json's (id 0): SGLang's Req._check_token_based_finish stops
    at `tokenizer.eos_token_id` too, and min_new_tokens masks it; it ran to max_new_tokens."""
    path = shutil.copytree(tiny_qwen3, tmp_path / "tokenizer_eos")
    config = json.loads((path / "tokenizer_config.json").read_text())
    config["eos_token"] = "<|im_end|>"
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    with Engine(str(path), device="cpu", page_size=4) as engine:
        forced = {"max_new_tokens": 4, "temperature": 0, "logit_bias": {"2": 100.0}}
        out = engine.generate(input_ids=IDS, sampling_params=forced)
        assert out["output_ids"] == [2] and out["meta_info"]["finish_reason"] == {"type": "stop", "matched": 2}
        held = engine.generate(input_ids=IDS, sampling_params={**forced, "min_new_tokens": 2})["output_ids"]
        assert 2 not in held[:2] and held[2] == 2 and len(held) == 3
        assert engine.generate(input_ids=IDS, sampling_params={**EOS_FORCED, "max_new_tokens": 4})["output_ids"] == [0]
