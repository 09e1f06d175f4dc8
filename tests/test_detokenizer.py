"""scheduler/detokenizer.py: incremental text equals the whole sequence's decode, on both paths (tokenizers'
DecodeStream over a fast tokenizer's backend, and two decodes a step for tokenizers without one)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from hotswap.scheduler import detokenizer as dt


@pytest.fixture(scope="module")
def tokenizer(tiny_qwen3):
    return AutoTokenizer.from_pretrained(tiny_qwen3)


def both(tok, skip: bool) -> list[dt.IncrementalDetokenizer]:
    decode = lambda ids, s: tok.decode(ids, skip_special_tokens=s)  # noqa: E731
    return [dt.IncrementalDetokenizer(backend=None, decode=decode, skip_special_tokens=skip),
            dt.IncrementalDetokenizer(backend=tok.backend_tokenizer, decode=decode, skip_special_tokens=skip),
            dt.detokenizer_for(tok, skip)]  # what a front end in its own process builds from its tokenizer


@pytest.mark.parametrize("skip", [True, False])
def test_streamed_text_is_the_whole_decode(tokenizer, skip):
    rng = random.Random(7)
    for _ in range(100):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(1, 40))]
        full = tokenizer.decode(ids, skip_special_tokens=skip)
        texts = []
        for det in both(tokenizer, skip):
            text, k = "", 0
            while k < len(ids):  # one to three tokens a step, as coalesced outputs arrive
                k = min(len(ids), k + rng.randint(1, 3))
                text += det.step(ids[:k])
            texts.append(text)
        for text in texts:  # all of it, except a trailing partial character (it waits for the token completing it)
            assert text == full if not full.endswith("\ufffd") else full.startswith(text)


def test_a_character_split_over_tokens_waits_until_it_is_complete(tokenizer):
    ids = tokenizer.encode("a 你好 b", add_special_tokens=False)
    for det in both(tokenizer, True):
        pieces = [det.step(ids[: k + 1]) for k in range(len(ids))]
        assert "".join(pieces) == tokenizer.decode(ids)
        assert all("\ufffd" not in p for p in pieces)
