"""A chat request that offers tools keeps special tokens in its text, as SGLang's chat does
(serving_chat.py, OpenAIServingChat._process_messages: `if request.tools and request.tool_choice != "none":
request.skip_special_tokens = False`): a client parsing tool calls from the text needs the special tokens that
many models mark a call with."""

from __future__ import annotations

import json

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "weather?"}]


def _special_id(engine) -> int:
    return engine.tokenizer.convert_tokens_to_ids("<|im_start|>")  # a special token that is not an end of sequence


def _chat(http, engine, **extra) -> dict:
    body = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0, "logit_bias": {str(_special_id(engine)): 100},
            "return_token_ids": True, **extra}
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_tools_keep_special_tokens_in_the_text(http, engine):
    c = _chat(http, engine, tools=TOOLS)
    assert c["token_ids"] == [_special_id(engine)] * 2
    assert c["message"]["content"] == "<|im_start|><|im_start|>"
    c = _chat(http, engine, tools=TOOLS, tool_choice="auto")
    assert c["message"]["content"] == "<|im_start|><|im_start|>"


def test_tools_keep_special_tokens_when_streamed(http, engine):
    body = {"messages": MESSAGES, "max_tokens": 2, "temperature": 0, "logit_bias": {str(_special_id(engine)): 100},
            "tools": TOOLS, "stream": True}
    text = ""
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    text += ch["delta"].get("content") or ""
    assert text == "<|im_start|><|im_start|>"


def test_without_tools_or_with_tool_choice_none_special_tokens_are_skipped(http, engine):
    assert _chat(http, engine)["message"]["content"] == ""
    assert _chat(http, engine, tools=TOOLS, tool_choice="none")["message"]["content"] == ""
