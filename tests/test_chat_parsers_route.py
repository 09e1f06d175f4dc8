"""The chat route with SGLang's `--reasoning-parser qwen3 --tool-call-parser qwen25` (serving_chat.py: non-streamed
`message.reasoning_content` / `tool_calls` / finish_reason "tool_calls"; streamed `reasoning_content` and `tool_calls`
deltas). The tiny model's text is replaced by a reply a Qwen3 model would give, over the engine's real outputs
(a streamed reply cut across the engine's chunks); /generate and /v1/completions keep the text as generated."""

from __future__ import annotations

import json
from unittest.mock import ANY

import pytest

from hotswap.errors import HotswapError

REPLY = ('<think>The user wants the weather.</think>\n\nLet me check.\n<tool_call>\n'
         '{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {}}}}]
MESSAGES = [{"role": "user", "content": "weather in Paris?"}]


@pytest.fixture(scope="module")
def engine(tiny_qwen3):
    from hotswap import Engine

    eng = Engine(str(tiny_qwen3), device="cpu", page_size=4, reasoning_parser="qwen3", tool_call_parser="qwen25")
    real = eng.async_generate

    async def replying(*args, stream: bool = False, **kwargs):
        """The engine's outputs with REPLY as their text (streamed: REPLY cut into as many pieces as chunks)."""
        if not stream:
            out = await real(*args, **kwargs)
            return [{**o, "text": REPLY} for o in out] if isinstance(out, list) else {**out, "text": REPLY}
        chunks = [c async for c in await real(*args, stream=True, **kwargs)]

        async def gen():
            cut = len(REPLY) // len(chunks) + 1
            for j, c in enumerate(chunks):
                yield {**c, "delta_text": REPLY[j * cut:(j + 1) * cut] if j < len(chunks) - 1 else REPLY[j * cut:]}
        return gen()

    eng.async_generate = replying
    yield eng
    eng.shutdown()


def _stopping(http) -> dict:
    """Request fields that stop the reply at its first token (finish_reason "stop", as a model ending its turn)."""
    return {"stop_token_ids": list(range(http.get("/get_model_info").json()["vocab_size"]))}


def _chat(http, **extra) -> dict:
    r = http.post("/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 6, "temperature": 0, **extra})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_reasoning_and_tool_calls_apart(http):
    c = _chat(http, tools=TOOLS, **_stopping(http))
    msg = c["message"]
    assert msg["reasoning_content"] == "The user wants the weather."
    assert msg["content"] == "Let me check."
    [call] = msg["tool_calls"]
    assert call["id"].startswith("call_") and call["type"] == "function" and call["index"] == 0
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert c["finish_reason"] == "tool_calls" and c["matched_stop"] is None


def test_no_reasoning_is_null(http, monkeypatch):
    """SGLang's _build_chat_response: `reasoning_content=reasoning_text if reasoning_text else None`."""
    monkeypatch.setitem(globals(), "REPLY", "Just the answer.")
    msg = _chat(http, chat_template_kwargs={"enable_thinking": False})["message"]
    assert msg == {"role": "assistant", "content": "Just the answer.", "reasoning_content": None}


def test_a_call_nested_too_deep_is_dropped_not_a_500(http, monkeypatch):
    monkeypatch.setitem(globals(), "REPLY", '<tool_call>\n{"name": "get_weather", "arguments": ' + "[" * 5000 + "]" * 5000 + "}\n</tool_call>")
    c = _chat(http, tools=TOOLS)
    assert c["message"]["content"] == "" and c["message"]["tool_calls"] == []


def test_without_tools_the_call_stays_text_and_separate_reasoning_false_keeps_the_think(http):
    c = _chat(http)
    assert c["message"]["content"] == REPLY.split("</think>")[1] and "tool_calls" not in c["message"]
    assert c["finish_reason"] == "length"
    c = _chat(http, tools=TOOLS, tool_choice="none", separate_reasoning=False)
    assert c["message"] == {"role": "assistant", "content": REPLY}


def _streamed(http, tools: list[dict], **extra) -> tuple[str, str, list[dict], str | None]:
    """A streamed reply's reasoning, content, tool call deltas and finish_reason."""
    body = {"messages": MESSAGES, "max_tokens": 6, "temperature": 0, "tools": tools, "stream": True, **extra}
    reasoning, content, calls, finish = "", "", [], None
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                for ch in json.loads(line[6:])["choices"]:
                    reasoning += ch["delta"].get("reasoning_content") or ""
                    content += ch["delta"].get("content") or ""
                    calls += ch["delta"].get("tool_calls") or []
                    finish = ch["finish_reason"] or finish
    return reasoning, content, calls, finish


def test_streamed_deltas(http):
    reasoning, content, calls, finish = _streamed(http, TOOLS)
    assert reasoning == "The user wants the weather."
    assert content.strip() == "Let me check."
    assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [(0, "get_weather", '{"city": "Paris"}')]
    assert calls[0]["id"].startswith("call_") and finish == "length"  # cut at max_tokens
    assert _streamed(http, TOOLS, **_stopping(http))[2:] == ([{**calls[0], "id": ANY}], "tool_calls")


def test_a_reply_cut_at_the_length_stays_length_with_its_calls(http):
    """SGLang's serving_chat.py turns only a "stop" into "tool_calls" (_process_tool_calls, and the stream's final
    finish_reason): a reply cut at max_tokens after a call is "length", so a framework sees it was truncated."""
    c = _chat(http, tools=TOOLS)
    assert len(c["message"]["tool_calls"]) == 1 and c["finish_reason"] == "length"
    assert _streamed(http, TOOLS)[3] == "length"


CODER_REPLY = ('<think>List the files.</think>\n\nI will run it.\n<tool_call>\n<function=run>\n<parameter=command>\nls -la\n'
               '</parameter>\n<parameter=timeout>\n30\n</parameter>\n</function>\n</tool_call>')
CODER_TOOLS = [{"type": "function", "function": {"name": "run", "parameters": {
    "type": "object", "properties": {"command": {"type": "string"}, "timeout": {"type": "integer"}}}}}]


def test_qwen3_coder_calls_whole_and_streamed(engine, monkeypatch):
    """`--tool-call-parser qwen3_coder` (Qwen3-Coder agentic RL recipes): the XML-like call, its values typed by the
    tool's schema, whole and streamed; the content before the call unstripped, as Qwen3CoderDetector leaves it."""
    import httpx

    from hotswap.server.app import create_app
    from hotswap.server.launch import ServerThread

    monkeypatch.setitem(globals(), "REPLY", CODER_REPLY)
    monkeypatch.setitem(engine.config.sglang_settings, "tool_call_parser", "qwen3_coder")
    with ServerThread(create_app(engine, served_model_name="tiny")) as srv, httpx.Client(base_url=srv.url, timeout=30) as client:
        c = _chat(client, tools=CODER_TOOLS, **_stopping(client))
        assert c["message"]["reasoning_content"] == "List the files." and c["message"]["content"] == "\n\nI will run it.\n"
        [call] = c["message"]["tool_calls"]
        assert call["index"] == 0 and call["function"] == {"name": "run", "arguments": '{"command": "ls -la", "timeout": 30}'}
        assert c["finish_reason"] == "tool_calls"
        reasoning, content, calls, finish = _streamed(client, CODER_TOOLS, **_stopping(client))
        assert (reasoning, content) == ("List the files.", "\n\nI will run it.\n") and finish == "tool_calls"
        assert [(c["index"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == \
            [(0, "run", '{"command": "ls -la", "timeout": 30}')]


def test_enable_thinking_reaches_the_template(server, engine):
    from hotswap.server.app import ServerState  # noqa: F401 - the template sees enable_thinking as SGLang injects it

    seen = {}
    render = engine.tokenizer.apply_chat_template

    def spy(*args, **kwargs):
        seen.update(kwargs)
        return render(*args, **kwargs)

    engine.tokenizer.apply_chat_template = spy
    try:
        import httpx

        with httpx.Client(base_url=server.url, timeout=30) as client:
            _chat(client)
            assert seen.get("enable_thinking") is True
            _chat(client, chat_template_kwargs={"enable_thinking": False})
            assert seen.get("enable_thinking") is False
    finally:
        engine.tokenizer.apply_chat_template = render


def test_generate_and_completions_are_not_parsed(http):
    r = http.post("/generate", json={"text": "hi", "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
    assert r.status_code == 200 and r.json()["text"] == REPLY
    r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3, "temperature": 0})
    assert r.json()["choices"][0]["text"] == REPLY


def test_server_info_reports_the_parsers(http):
    info = http.get("/get_server_info").json()
    assert info["reasoning_parser"] == "qwen3" and info["tool_call_parser"] == "qwen25"


def test_unknown_parser_names_are_refused_by_name():
    from hotswap.config import engine_args_from_sglang

    with pytest.raises(HotswapError, match=r"reasoning_parser='kimi'.*deepseek-r1, qwen3, qwen3-thinking"):
        engine_args_from_sglang({"reasoning_parser": "kimi"})
    with pytest.raises(HotswapError, match=r"tool_call_parser='hermes'.*qwen, qwen25, qwen3_coder"):
        engine_args_from_sglang({"tool_call_parser": "hermes"})
    for reasoning, tools in (("deepseek-r1", "qwen"), ("qwen3-thinking", "qwen25"), ("qwen3", "qwen3_coder")):  # miles' e2e launch: qwen3 with qwen
        assert engine_args_from_sglang({"reasoning_parser": reasoning, "tool_call_parser": tools})["sglang_settings"] == \
            {"reasoning_parser": reasoning, "tool_call_parser": tools}
