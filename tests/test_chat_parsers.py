"""SGLang's reasoning and tool-call parsers (server/chat_parsers/) on SGLang's own examples
(test/srt/test_reasoning_parser.py, test/srt/test_function_call_parser.py: Qwen3Detector, DeepSeekR1Detector,
Qwen25Detector; test_qwen3_coder_detector.py: Qwen3CoderDetector): the whole reply
as SGLang's detect_and_parse splits it, and a stream split at any point giving what one chunk gives."""

from __future__ import annotations

import json
import random

import pytest

from hotswap.server.chat_parsers import (
    CoderCallStream,
    ReasoningStream,
    ToolCallStream,
    chat_template_kwargs,
    has_tool_call,
    new_call_id,
    parse_calls,
    parse_tool_calls,
    split_reasoning,
    thinking_requested,
)

TOOLS = ["get_current_weather", "get_tourist_attractions"]
WEATHER = '<tool_call>\n{"name": "get_current_weather", "arguments": {"location": "Tokyo", "unit": "celsius"}}\n</tool_call>'


def _splits(text: str, seed: int = 0) -> list[list[str]]:
    """The text in one piece, in characters, at every single cut, and at random cuts."""
    rng = random.Random(seed)
    out = [[text], list(text)] + [[text[:i], text[i:]] for i in range(1, len(text))]
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        out.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return out


def _stream_reasoning(pieces: list[str], parser: str, thinking: bool, stream_reasoning: bool = True) -> tuple[str, str]:
    s = ReasoningStream(parser, thinking, stream_reasoning)
    parts = [s.feed(p) for p in pieces] + [s.finish()]
    return "".join(r for r, _ in parts), "".join(c for _, c in parts)


REASONING_CASES = [  # (parser, thinking, text, reasoning, content)
    ("qwen3", True, "<think>I need to think about this</think>The answer is 42.", "I need to think about this", "The answer is 42."),
    ("qwen3", True, "I need to think about this</think>The answer is 42.", "I need to think about this", "The answer is 42."),
    ("qwen3", False, "The answer is 42.", "", "The answer is 42."),
    ("qwen3", False, "<think>Let me think</think>Sure.", "Let me think", "Sure."),
    ("qwen3", True, "<think>still thinking when cut", "still thinking when cut", ""),
    ("qwen3", True, "<think>I should call a tool\n" + WEATHER, "I should call a tool\n", WEATHER),
    ("qwen3", True, "<think>\nplan\n</think>\n\n" + WEATHER, "\nplan\n", "\n\n" + WEATHER),
    ("deepseek-r1", False, "I need to think about this</think>The answer is 42.", "I need to think about this", "The answer is 42."),
    ("deepseek-r1", False, "<think>I need to think about this</think>The answer is 42.", "I need to think about this", "The answer is 42."),
    ("deepseek-r1", False, "truncated reasoning", "truncated reasoning", ""),
    ("deepseek-r1", True, "<think><think>a</think>b</think>c", "a", "b</think>c"),
    ("qwen3-thinking", False, "plan</think>answer", "plan", "answer"),
    ("qwen3-thinking", False, "plan\n" + WEATHER, "plan\n", WEATHER),
]


@pytest.mark.parametrize("parser,thinking,text,reasoning,content", REASONING_CASES)
def test_reasoning_whole_and_streamed(parser, thinking, text, reasoning, content):
    assert split_reasoning(text, parser, thinking) == (reasoning, content)
    for pieces in _splits(text):
        assert _stream_reasoning(pieces, parser, thinking) == (reasoning, content), pieces
        assert _stream_reasoning(pieces, parser, thinking, stream_reasoning=False) == (reasoning, content), pieces


def test_reasoning_streams_as_it_comes_or_in_one_piece():
    s = ReasoningStream("qwen3", True)
    assert s.feed("<think>ab") == ("ab", "")
    assert s.feed("c</thi") == ("c", "")  # a partial end marker is held back
    assert s.feed("nk>d") == ("", "d")
    s = ReasoningStream("qwen3", True, stream_reasoning=False)
    assert s.feed("<think>ab") == ("", "")
    assert s.feed("c</think>d") == ("abc", "d")


def test_qwen3_thinks_unless_enable_thinking_is_false():
    assert thinking_requested("qwen3", None) and thinking_requested("qwen3", {"enable_thinking": True})
    assert not thinking_requested("qwen3", {"enable_thinking": False})
    assert thinking_requested("deepseek-r1", {"enable_thinking": False})
    assert thinking_requested("qwen3-thinking", {"enable_thinking": False})
    assert chat_template_kwargs("qwen3", None) == {"enable_thinking": True}
    assert chat_template_kwargs("qwen3", {"enable_thinking": False, "x": 1}) == {"enable_thinking": False, "x": 1}
    assert chat_template_kwargs("deepseek-r1", {"x": 1}) == {"x": 1} and chat_template_kwargs(None, None) is None


TOOL_CASES = [  # (text, content, [(tool_index, name, arguments)])
    ("Hello, world!", "Hello, world!", []),
    (WEATHER, "", [(0, "get_current_weather", '{"location": "Tokyo", "unit": "celsius"}')]),
    ("Let me check.\n" + WEATHER + "\n" + WEATHER.replace("Tokyo", "Paris").replace("get_current_weather", "get_tourist_attractions")
     .replace(', "unit": "celsius"', ""),
     "Let me check.", [(0, "get_current_weather", '{"location": "Tokyo", "unit": "celsius"}'),
                       (1, "get_tourist_attractions", '{"location": "Paris"}')]),
    ('<tool_call>\n{"name": "unknown_tool", "arguments": {}}\n</tool_call>', "", []),  # an unoffered tool: dropped
    ('Sure.\n<tool_call>\n{"name": "get_current_weather", "arguments": {"location": \n</tool_call>', "Sure.", []),  # bad JSON: dropped
    ('<tool_call>\n{"name": "get_current_weather", "parameters": {"city": "東京"}}\n</tool_call>', "",
     [(0, "get_current_weather", '{"city": "東京"}')]),
]


@pytest.mark.parametrize("text,content,calls", TOOL_CASES)
def test_tool_calls_whole_and_streamed(text, content, calls):
    got_content, got = parse_tool_calls(text, TOOLS) if has_tool_call(text) else (text, [])
    assert got_content == content
    assert [(c.tool_index, c.name, c.arguments) for c in got] == calls
    whole = None
    for pieces in _splits(text):
        s = ToolCallStream(TOOLS)
        parts = [s.feed(p) for p in pieces]
        streamed = ("".join(c for c, _ in parts) + s.finish(), [(c.tool_index, c.name, c.arguments) for _, cs in parts for c in cs])
        whole = whole or streamed
        assert streamed == whole, pieces
    assert whole[0].strip() == content.strip() and whole[1] == calls  # the stream keeps the whitespace SGLang's strip() drops


def test_unclosed_tool_block_is_dropped_and_partial_marker_is_text():
    s = ToolCallStream(TOOLS)
    assert s.feed("ok <tool_ca") == ("ok ", [])
    assert s.finish() == "<tool_ca"
    s = ToolCallStream(TOOLS)
    assert s.feed('ok <tool_call>\n{"name": "get_current_weather"') == ("ok ", [])
    assert s.finish() == ""


def test_call_ids_are_sglangs():
    ids = {new_call_id() for _ in range(3)}
    assert len(ids) == 3 and all(i.startswith("call_") and len(i) == 29 for i in ids)


def _fn(name: str, **properties) -> dict:
    return {"type": "function", "function": {"name": name, "parameters": {"type": "object", "properties": properties}}}


CODER_TOOLS = [  # SGLang's test_qwen3_coder_detector.py tools, and one with every converted type
    _fn("get_current_weather", location={"type": "string"}, unit={"type": "string", "enum": ["celsius", "fahrenheit"]},
        days={"type": "integer"}),
    _fn("sql_interpreter", query={"type": "string"}, dry_run={"type": "boolean"}),
    _fn("TodoWrite", todos={"type": "array", "items": {"type": "object"}}),
    _fn("get_current_time", cities={"anyOf": [{"type": "array", "items": {"type": "string"}}, {"type": "null"}], "default": None}),
    _fn("process_optional_list", optional_items_to_process={"anyOf": [
        {"anyOf": [{"type": "null"}, {"anyOf": [{"type": "array", "items": {}}, {"type": "null"}]}]}, {"type": "null"}]}),
    _fn("typed", n={"type": "number"}, i={"type": "integer"}, b={"type": "boolean"}, o={"type": "object"},
        e={"enum": [1, 2]}, t={"type": ["null", "integer"]}),
]


def _coder(name: str, *params: tuple[str, str]) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in params)
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


CODER_CASES = [  # (text, whole content, streamed content, [(tool_index, name, arguments)])
    ("This is plain text without any tool calls.", "This is plain text without any tool calls.",
     "This is plain text without any tool calls.", []),
    ("Let me check the weather for you.\n\n" + _coder("get_current_weather", ("location", "New York")),
     "Let me check the weather for you.\n\n", "Let me check the weather for you.\n\n",
     [(0, "get_current_weather", '{"location": "New York"}')]),
    (_coder("get_current_weather", ("location", "New York")) + "\n"
     + _coder("sql_interpreter", ("query", "SELECT * FROM users"), ("dry_run", "True")), "", "\n",
     [(0, "get_current_weather", '{"location": "New York"}'),
      (1, "sql_interpreter", '{"query": "SELECT * FROM users", "dry_run": true}')]),
    (_coder("get_current_weather", ("location", "Tokyo"), ("days", "5")), "", "",
     [(0, "get_current_weather", '{"location": "Tokyo", "days": 5}')]),
    (_coder("TodoWrite", ("todos", '[\n  {"content": "Buy groceries", "status": "pending"}\n]')), "", "",
     [(0, "TodoWrite", '{"todos": [{"content": "Buy groceries", "status": "pending"}]}')]),
    (_coder("get_current_time", ("cities", '["NYC"]')), "", "", [(0, "get_current_time", '{"cities": ["NYC"]}')]),
    (_coder("get_current_time", ("cities", "null")), "", "", [(0, "get_current_time", '{"cities": null}')]),
    (_coder("process_optional_list", ("optional_items_to_process", '[true, null, {"enabled": false}]')), "", "",
     [(0, "process_optional_list", '{"optional_items_to_process": [true, null, {"enabled": false}]}')]),
    ("<tool_call>\n<function=get_current_weather>\n<parameter=location></parameter>\n</function>\n</tool_call>", "", "",
     [(0, "get_current_weather", '{"location": ""}')]),
    (_coder("sql_interpreter", ("query", "SELECT * FROM users WHERE name = 'John \"Doe\"' AND a < b")), "", "",
     [(0, "sql_interpreter", '{"query": "SELECT * FROM users WHERE name = \'John \\"Doe\\"\' AND a < b"}')]),
    # values that do not convert stay strings (a boolean: false); numbers whole only when written so; unknown
    # parameters and tools keep strings; text after the calls is content only in the stream
    (_coder("typed", ("n", "5"), ("i", "x7"), ("b", "yes"), ("o", "{'a': (1, 2)}"), ("e", "2"), ("t", "3"), ("zz", "1")),
     "", "", [(0, "typed", '{"n": 5, "i": "x7", "b": false, "o": {"a": [1, 2]}, "e": 2, "t": 3, "zz": "1"}')]),
    (_coder("typed", ("n", "5.0"), ("i", "12"), ("b", "TRUE"), ("o", "{not json"), ("n", "1e3")), "", "",
     [(0, "typed", '{"n": 1000.0, "i": 12, "b": true, "o": "{not json"}')]),
    ("a <b> c\n" + _coder("nope", ("x", "1")) + "\nDone.", "a <b> c\n", "a <b> c\n\nDone.", [(0, "nope", '{"x": "1"}')]),
    # a parameter left unclosed ends at the next one or at </function>
    ("<tool_call>\n<function=get_current_weather>\n<parameter=location>\nParis\n<parameter=days>\n3\n</function>\n</tool_call>",
     "", "", [(0, "get_current_weather", '{"location": "Paris", "days": 3}')]),
]


def _stream_coder(pieces: list[str]) -> tuple[str, list]:
    s = CoderCallStream(CODER_TOOLS)
    parts = [s.feed(p) for p in pieces]
    return "".join(c for c, _ in parts) + s.finish(), [(c.tool_index, c.name, c.arguments) for _, cs in parts for c in cs]


@pytest.mark.parametrize("text,content,streamed_content,calls", CODER_CASES)
def test_qwen3_coder_calls_whole_and_streamed(text, content, streamed_content, calls):
    got_content, got = parse_calls(text, "qwen3_coder", CODER_TOOLS) or (text, [])
    assert got_content == content
    assert [(c.tool_index, c.name, c.arguments) for c in got] == calls
    for pieces in _splits(text):
        assert _stream_coder(pieces) == (streamed_content, calls), pieces


def test_qwen3_coder_call_cut_short():
    """A reply cut inside a call: the whole reply keeps it (its last parameter running to the end), the stream drops it
    (SGLang's stream never closes an unfinished function); a partial tag outside a call is text."""
    text = "<tool_call>\n<function=get_current_weather>\n<parameter=location>London"
    content, [call] = parse_calls(text, "qwen3_coder", CODER_TOOLS)
    assert (content, call.name, call.arguments) == ("", "get_current_weather", '{"location": "London"}')
    for pieces in _splits(text):
        assert _stream_coder(pieces) == ("", []), pieces
    assert _stream_coder(["ok <tool_ca"]) == ("ok <tool_ca", []) and _stream_coder(["ok <functi", "on=x"]) == ("ok ", [])


def test_qwen3_coder_only_parses_a_reply_with_a_marker():
    assert parse_calls("no call here <tool", "qwen3_coder", CODER_TOOLS) is None
    assert parse_calls("<function=get_current_weather>\n</function>", "qwen3_coder", CODER_TOOLS) == \
        ("", [parse_calls(_coder("get_current_weather"), "qwen3_coder", CODER_TOOLS)[1][0]])


def test_qwen3_coder_values_that_do_not_parse_stay_strings():
    """Deep nesting and Python literals that are not JSON stay the text (never an error); a tool without `type` is a
    function (SGLang's Tool default)."""
    tools = [{"function": {"name": "f", "parameters": {"properties": {"o": {"type": "object"}}}}}]
    for value in ("[" * 5000, "{1, 2}", "b'x'", "1+2j"):
        _, [call] = parse_calls(_coder("f", ("o", value)), "qwen3_coder", tools)
        assert call.arguments == json.dumps({"o": value}), value
    _, [call] = parse_calls(_coder("f", ("o", "{'a': None}")), "qwen3_coder", tools)
    assert call.arguments == '{"o": {"a": null}}'


def test_json_nested_past_the_parsers_depth_is_no_call_not_an_error():
    """A call block whose JSON nests past json's recursion limit is dropped as a block that is not JSON (it raised
    RecursionError: a 500 on the chat route)."""
    text = '<tool_call>\n{"name": "get_current_weather", "arguments": ' + "[" * 5000 + "]" * 5000 + '}\n</tool_call>'
    assert parse_tool_calls(text, TOOLS) == ("", [])
    s = ToolCallStream(TOOLS)
    assert s.feed(text) == ("", []) and s.finish() == ""


HOSTILE = [  # (parser, a ~300 KB reply)
    ("qwen25", "<tool_call>\n" * 25_000),
    ("qwen25", '<tool_call>\n{"name": "get_current_weather", "arguments": {"a": "' + "x" * 300_000),
    ("qwen3_coder", "<tool_call>\n<function=get_current_weather>\n<parameter=location>\n" + "x" * 300_000),
    ("qwen3_coder", "<function=" + "x" * 300_000),
]


@pytest.mark.parametrize("parser,text", HOSTILE, ids=["openings", "open-json", "open-parameter", "open-function"])
def test_hostile_replies_parse_in_linear_time(parser, text):
    """Many unclosed openings, or a call never closed, whole and streamed a few characters at a time: each rescanned
    the reply from the opening (seconds to tens of seconds for 300 KB)."""
    import time

    from hotswap.server.chat_parsers import call_stream

    tools = [{"type": "function", "function": {"name": name}} for name in TOOLS]
    started = time.perf_counter()
    parse_calls(text, parser, tools)
    s = call_stream(parser, tools)
    for i in range(0, len(text), 4):
        s.feed(text[i:i + 4])
    s.finish()
    assert time.perf_counter() - started < 3
