"""vLLM's `add_special_tokens` on /v1/completions (default true: a text prompt gets the tokenizer's BOS) and on the chat
route and chat /tokenize (default false: the template holds its special tokens), vllm/entrypoints/openai/completion/
protocol.py and chat_completion/protocol.py (build_tok_params). hotswap ignored the field on both routes: a client that
renders its chat template itself (BOS included) and sends the text with add_special_tokens=false got a second BOS, and
/tokenize (which honoured it) no longer gave the ids the completion ran on."""

from __future__ import annotations

import httpx
import pytest

from hotswap import Engine
from hotswap.server.app import create_app
from hotswap.server.launch import ServerThread

BOS = "<|im_start|>"


@pytest.fixture(scope="module")
def bos_server(tiny_llama_bos):
    """The BOS-prepending tiny Llama, served."""
    with Engine(model_path=str(tiny_llama_bos), device="cpu", page_size=4) as eng, ServerThread(create_app(eng)) as srv:
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            yield eng, c


def test_completions_honour_add_special_tokens(bos_server):
    eng, c = bos_server
    bos = eng.tokenizer.convert_tokens_to_ids(BOS)
    text = BOS + "Alice likes"  # what a client-side chat template renders: BOS already in the text
    plain = eng.tokenizer.encode(text, add_special_tokens=False)
    assert plain[0] == bos and plain[1] != bos
    for flag, want in ((None, [bos] + plain), (True, [bos] + plain), (False, plain)):
        body = {"prompt": text, "max_tokens": 1, "return_token_ids": True, **({} if flag is None else {"add_special_tokens": flag})}
        got = c.post("/v1/completions", json=body).json()["choices"][0]["prompt_token_ids"]
        assert got == want, flag
        tok = c.post("/tokenize", json={k: v for k, v in body.items() if k in ("prompt", "add_special_tokens")}).json()["tokens"]
        assert tok == got  # /tokenize gives the ids the completion ran on


def test_chat_and_chat_tokenize_honour_add_special_tokens(bos_server):
    eng, c = bos_server
    bos = eng.tokenizer.convert_tokens_to_ids(BOS)
    messages = [{"role": "user", "content": "Alice likes"}]
    for flag in (None, False, True):
        extra = {} if flag is None else {"add_special_tokens": flag}
        chat = c.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 1, "return_token_ids": True, **extra})
        assert chat.status_code == 200, chat.text
        tok = c.post("/tokenize", json={"messages": messages, **extra})
        assert tok.status_code == 200, tok.text
        ids = chat.json()["prompt_token_ids"]
        assert tok.json()["tokens"] == ids
        assert (ids[:2] == [bos, bos]) == bool(flag)  # the template renders one BOS; true adds the tokenizer's on top
