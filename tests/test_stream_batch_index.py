"""A streamed /generate batch names each chunk's request by `index`, whatever the batch's size: SGLang's
TokenizerManager._handle_batch_request sets result["index"] on every chunk of a batch (text or input_ids given as
a list, GenerateReqInput._determine_batch_size: is_single False), a batch of one prompt included."""

from __future__ import annotations

import json

import pytest


def _chunks(http, body: dict) -> list[dict]:
    with http.stream("POST", "/generate", json=body) as resp:
        assert resp.status_code == 200, resp.read()
        return [json.loads(x[len("data: "):]) for x in resp.iter_lines() if x.startswith("data: {")]


@pytest.mark.parametrize("prompt", [{"text": ["Alice likes"]}, {"input_ids": [[5, 6, 7]]}])
def test_streamed_batch_of_one_carries_index(http, prompt):
    chunks = _chunks(http, {**prompt, "stream": True, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
    assert chunks and all(c.get("index") == 0 for c in chunks), chunks
    # the same batch unstreamed is a list of one, as SGLang's
    body = {**prompt, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}}
    assert isinstance(http.post("/generate", json=body).json(), list)


def test_streamed_single_prompt_has_no_index(http):
    chunks = _chunks(http, {"text": "Alice likes", "stream": True, "sampling_params": {"max_new_tokens": 3, "ignore_eos": True}})
    assert chunks and all("index" not in c for c in chunks), chunks
