"""Message roles as SGLang takes them (entrypoints/openai/protocol.py: ChatCompletionMessageGenericParam._normalize_role,
ChatCompletionMessageUserParam): case-insensitive and lowercased; any other role is a 400. Chat templates test the role
by name, so a "User" message, or one with a role the template does not know, vanished from the prompt with a 200."""

from __future__ import annotations

import pytest

TEMPLATE = ("{% for m in messages %}{% if m.role == 'user' %}<|im_start|>user\n{{ m.content }}<|im_end|>\n"
            "{% elif m.role == 'assistant' %}<|im_start|>assistant\n{{ m.content }}<|im_end|>\n{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


@pytest.fixture
def role_template(engine):
    """A Qwen-style template: it renders the roles it tests by name and nothing else."""
    own = engine.tokenizer.chat_template
    engine.tokenizer.chat_template = TEMPLATE
    yield
    engine.tokenizer.chat_template = own


def _prompt(http, engine, route: str, role: str) -> tuple[int, str]:
    messages = [{"role": role, "content": "Alice likes apples"}]
    if route == "/tokenize":
        r = http.post(route, json={"messages": messages})
        return r.status_code, r.json()
    r = http.post(route, json={"messages": messages, "max_tokens": 1, "return_token_ids": True})
    return r.status_code, r.json()


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_a_role_in_capitals_is_the_role(http, engine, role_template, route):
    status, reply = _prompt(http, engine, route, "User")
    assert status == 200, reply
    ids = reply["tokens"] if route == "/tokenize" else reply["prompt_token_ids"]
    assert "Alice likes apples" in engine.tokenizer.decode(ids)


@pytest.mark.parametrize("route", ["/v1/chat/completions", "/tokenize"])
def test_an_unknown_role_is_a_400_naming_it(http, engine, role_template, route):
    status, reply = _prompt(http, engine, route, "wizard")
    assert status == 400, reply
    assert reply["error"]["param"] == "messages" and "messages[0].role" in reply["error"]["message"]
    assert "wizard" in reply["error"]["message"]
