"""A request whose activations are not finite (a pushed checkpoint with a NaN embedding row: one token's prompts
overflow) costs no other request anything: not the requests batched beside it (top-p over a NaN row failed
the whole batch with "internal error"), and not the requests that later reuse its KV pages once good weights
are back (the torch backend's decode read the stale NaN rows past a sequence's length, masked but still
multiplied in, and every later sample on those pages was NaN)."""

from __future__ import annotations

import math

import pytest
import torch
from trainer_support import checkpoint_tensors

from hotswap import Engine

POISON = 9  # the token whose embedding row the bad push makes NaN
HEALTHY = [[1, 2, 3], [20, 21, 22, 23, 24], [40, 41]]  # prompts without it, lengths off the 4-token pages
GREEDY = {"max_new_tokens": 6, "temperature": 0.0}


def _nan_row(tensors: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
    emb = tensors["model.embed_tokens.weight"].clone()
    emb[POISON] = float("nan")
    return [("model.embed_tokens.weight", emb)]


@pytest.fixture(scope="module", params=[pytest.param("cpu", id="torch-backend"),
                                        pytest.param("cuda", id="triton-kernels", marks=pytest.mark.gpu)])
def engine_and_weights(request, tiny_qwen3):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    # the GPU's decode kernels (graphs, split KV) mask by loading no stale row; the torch backend gathers whole pages
    backend = {"attention_backend": "torch"} if request.param == "cpu" else {}
    engine = Engine(str(tiny_qwen3), device=request.param, page_size=4, num_pages=12, **backend)
    yield engine, checkpoint_tensors(tiny_qwen3)
    engine.shutdown()


def _finite(out: dict) -> bool:
    return all(math.isfinite(lp) for lp, _, _ in out["meta_info"]["output_token_logprobs"])


def test_stale_nonfinite_kv_pages_do_not_reach_later_requests(engine_and_weights):
    engine, tensors = engine_and_weights
    want = engine.generate(input_ids=HEALTHY, sampling_params=GREEDY, return_logprob=True)
    assert engine.update_weights_from_tensor(_nan_row(tensors), weight_version="bad").success
    # its KV is NaN from the poisoned position on, across most of the 12-page pool
    engine.generate(input_ids=[POISON] + list(range(100, 106)), sampling_params={"max_new_tokens": 30, "temperature": 0.0, "ignore_eos": True})
    assert engine.update_weights_from_tensor([("model.embed_tokens.weight", tensors["model.embed_tokens.weight"])], weight_version="good").success
    for _ in range(3):  # the freed pages come back in other places of other requests
        got = engine.generate(input_ids=HEALTHY, sampling_params=GREEDY, return_logprob=True)
        assert [g["output_ids"] for g in got] == [w["output_ids"] for w in want]
        assert all(_finite(g) for g in got)
    assert engine.check_invariants().success


def test_a_nan_row_in_a_top_p_batch_fails_no_other_row(engine_and_weights):
    engine, tensors = engine_and_weights
    assert engine.update_weights_from_tensor(_nan_row(tensors), weight_version="bad").success
    try:
        outs = engine.generate(input_ids=[[POISON, 1, 2, 3, 4]] + HEALTHY, return_logprob=True,
                               sampling_params={"max_new_tokens": 5, "temperature": 1.0, "top_p": 0.9, "seed": 3, "ignore_eos": True})
    finally:
        assert engine.update_weights_from_tensor([("model.embed_tokens.weight", tensors["model.embed_tokens.weight"])], weight_version="good").success
    for out in outs[1:]:
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 5}, out["meta_info"]["finish_reason"]
        assert _finite(out)
    assert "internal error" not in str(outs[0]["meta_info"]["finish_reason"])  # the NaN row's sample is its own, not a failed batch
