"""A request's own `chat_template` (vLLM's field) and a `tool_choice` outside OpenAI's values were dropped without a
word: the prompt was rendered with the server's template and without the asked tool constraint, a 200. vLLM refuses a
request template unless started with --trust-request-chat-template (OpenAIServing._validate_chat_template, on chat and
/tokenize alike), and vLLM's and SGLang's request models refuse any tool_choice but none/auto/required/a named function."""

from __future__ import annotations

import pytest

MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize", "/v1/tokenize"])
def test_a_request_chat_template_is_refused_by_name(http, route):
    r = http.post(route, json={"messages": MESSAGES, "max_tokens": 1, "chat_template": "{{ 'x' }}"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "chat_template"
    assert http.post(route, json={"messages": MESSAGES, "max_tokens": 1}).status_code == 200


def test_a_tool_choice_outside_openais_values_is_refused_by_name(http):
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "tools": TOOLS, "tool_choice": "banana"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "tool_choice" and "banana" in r.json()["error"]["message"]
    for choice in ("auto", "none"):
        r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 1, "tools": TOOLS, "tool_choice": choice})
        assert r.status_code == 200, r.text
