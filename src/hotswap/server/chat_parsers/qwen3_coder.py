"""Qwen3-Coder tool calls (`--tool-call-parser qwen3_coder`): sglang/srt/function_call/qwen3_coder_detector.py,
Qwen3CoderDetector, used by agentic RL recipes on Qwen3-Coder models (e.g. slime's `--sglang-tool-call-parser
qwen3_coder`). Each `<function=NAME>\\n<parameter=ARG>\\nVALUE\\n</parameter>...</function>`, in a `<tool_call>` block
or bare, is a call of any name (an unknown tool is not dropped), each value converted by the type its tool's JSON schema
gives that parameter (utils.infer_type_from_json_schema); the content is the text before the first marker, unstripped."""

from __future__ import annotations

import ast
import json
import re
from typing import Any

from hotswap.server.chat_parsers.common import TOOL_END, TOOL_START, ToolCall

FUNCTION_START, FUNCTION_END = "<function=", "</function>"
PARAMETER_START, PARAMETER_END = "<parameter=", "</parameter>"
_CODER_TAGS = (TOOL_START, TOOL_END, FUNCTION_START, FUNCTION_END, PARAMETER_START, PARAMETER_END)
_CODER_FUNCTION = re.compile(r"<function=(.*?)</function>|<function=(.*)$", re.DOTALL)
_CODER_PARAMETER = re.compile(r"<parameter=(.*?)(?:</parameter>|(?=<parameter=)|(?=</function>)|$)", re.DOTALL)
_STRING_TYPES = ("string", "str", "text", "varchar", "char", "enum")
_INT_PREFIXES = ("int", "uint", "long", "short", "unsigned")


def coder_parameters(name: str | None, tools: list[dict]) -> dict:
    """Qwen3CoderDetector._get_arguments_config: the first offered function of that name's parameter schemas
    (utils.get_schema_properties: `properties`, else those of its anyOf/oneOf/allOf branches; else the `parameters`
    object itself); {} for an unknown tool."""
    for tool in tools:
        function = tool.get("function") if isinstance(tool, dict) else None
        if isinstance(function, dict) and tool.get("type", "function") == "function" and function.get("name") == name:
            params = function.get("parameters")
            if not isinstance(params, dict):
                return {}
            properties = _schema_properties(params)
            return properties if properties or "properties" in params else params
    return {}


def _schema_properties(schema: Any) -> dict:
    """utils.get_schema_properties: a schema's `properties`, or its branches' merged (the first branch naming one wins)."""
    if not isinstance(schema, dict):
        return {}
    if isinstance(properties := schema.get("properties"), dict):
        return properties
    merged: dict = {}
    for keyword in ("anyOf", "oneOf", "allOf"):
        for branch in schema.get(keyword) if isinstance(schema.get(keyword), list) else []:
            for key, value in _schema_properties(branch).items():
                merged.setdefault(key, value)
    return merged


def schema_type(schema: Any) -> str | None:
    """utils.infer_type_from_json_schema: `type` (a list's first non-null), else anyOf/oneOf's (one type, or the one
    beside null, or string where any is string, else the first), enum values' (one type, else string), allOf's first
    that is not string, object where it has `properties`, array where it has `items`."""
    if not isinstance(schema, dict):
        return None
    kind = schema.get("type")
    if isinstance(kind, str):
        return kind
    if isinstance(kind, list) and kind:
        return next((t for t in kind if t != "null"), "string")
    if "anyOf" in schema or "oneOf" in schema:
        branches = schema.get("anyOf") or schema.get("oneOf")
        types = [t for b in branches if (t := schema_type(b))] if isinstance(branches, list) else []
        if types:
            if len(set(types)) == 1:
                return types[0]
            if len(set(types)) == 2 and "null" in types:
                return next(t for t in types if t != "null")
            return "string" if "string" in types else types[0]
    if isinstance(schema.get("enum"), list):
        kinds = {_json_type(v) for v in schema["enum"]}
        return kinds.pop() if len(kinds) == 1 else "string"
    if isinstance(schema.get("allOf"), list):
        return next((t for b in schema["allOf"] if (t := schema_type(b)) and t != "string"), "string")
    if "properties" in schema:
        return "object"
    return "array" if "items" in schema else None


def _json_type(value: Any) -> str:
    for kind, name in ((type(None), "null"), (bool, "boolean"), (int, "integer"), (float, "number"), (list, "array"),
                       (dict, "object")):
        if isinstance(value, kind):
            return name
    return "string"


def coder_value(value: str, name: str, schema: dict) -> Any:
    """Qwen3CoderDetector._convert_param_value: `null` is None; a parameter the schema does not name stays a string;
    else by its schema's type (none: string), a value that does not convert staying the string it was (a boolean that
    is not true/false: False)."""
    if value.lower() == "null":
        return None
    if name not in schema:
        return value
    kind = str(schema_type(schema[name]) or "string").strip().lower()
    if kind in _STRING_TYPES:
        return value
    if kind.startswith(_INT_PREFIXES):
        return _converted(int, value)
    if kind.startswith(("num", "float")):
        return _converted(_number, value)
    if kind in ("boolean", "bool", "binary"):
        return value.lower() == "true"
    if kind in ("object", "array", "arr") or kind.startswith(("dict", "list")):
        try:
            return json.loads(value)
        except (ValueError, RecursionError):
            pass
    return _converted(_literal, value)


def _number(value: str) -> int | float:
    """A float, an int where it is whole and written without `.` or an exponent (SGLang's maybe_convert)."""
    number = float(value)
    return int(number) if number.is_integer() and "." not in value and "e" not in value.lower() else number


def _literal(value: str) -> Any:
    """ast.literal_eval, kept only where the result is JSON (SGLang's json.dumps would fail the whole reply on a set or
    bytes; hotswap keeps the string instead)."""
    result = ast.literal_eval(value)
    json.dumps(result)
    return result


def _converted(convert, value: str) -> Any:
    try:
        return convert(value)
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return value


def _coder_value_text(raw: str) -> str:
    """A parameter's value without the one newline the format puts on each side."""
    raw = raw[1:] if raw.startswith("\n") else raw
    return raw[:-1] if raw.endswith("\n") else raw


def _coder_call(index: int, name: str, params: dict[str, Any]) -> ToolCall:
    return ToolCall(index, name, json.dumps(params, ensure_ascii=False))


def has_coder_call(text: str) -> bool:
    """Qwen3CoderDetector.has_tool_call: a `<tool_call>` or a bare `<function=` (its stream takes either)."""
    return TOOL_START in text or FUNCTION_START in text


def parse_coder_calls(text: str, tools: list[dict]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply with a call: Qwen3CoderDetector.detect_and_parse, whose calls are every
    `<function=` in the text, in or out of a `<tool_call>` block, closed or cut short by the reply's end, numbered in
    order (`tool_index` the call's position, not the tool's); the content is the text before the first marker."""
    calls = []
    for closed, open_ in _CODER_FUNCTION.findall(text):
        body = closed or open_
        if ">" not in body:
            continue
        name, _, params_text = body.partition(">")
        schema = coder_parameters(name, tools)
        params = {}
        for param in _CODER_PARAMETER.findall(params_text):
            if ">" in param:
                key, _, raw = param.partition(">")
                params[key] = coder_value(_coder_value_text(raw), key, schema)
        calls.append(_coder_call(len(calls), name, params))
    start = min(i for marker in (TOOL_START, FUNCTION_START) if (i := text.find(marker)) != -1)
    return text[:start], calls


class CoderCallStream:
    """A streamed reply's (content, calls) deltas: Qwen3CoderDetector.parse_streaming_increment's cursor, each call sent
    whole once its `</function>` comes (SGLang sends the name, then each parameter as it closes, then `}`); text outside
    `<tool_call>` blocks is content, text inside them between tags is dropped."""

    def __init__(self, tools: list[dict]) -> None:
        self._tools = tools
        self._buffer = ""
        self._inside = False  # within <tool_call> ... </tool_call>
        self._name: str | None = None  # the open function's
        self._params: dict[str, Any] = {}
        self._calls = 0
        self._searched = 0  # how much of a waiting buffer was searched for what it waits for (searched once, not per chunk)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while self._buffer and (used := self._step(content, calls)):
            self._buffer = self._buffer[used:]
            self._searched = 0
        self._searched = len(self._buffer)
        return "".join(content), calls

    def _step(self, content: list[str], calls: list[ToolCall]) -> int:
        """What the buffer's head is, and how much of it that uses (0: wait for more text)."""
        head = self._buffer
        if head.startswith(TOOL_START):
            self._inside = True
            return len(TOOL_START)
        if head.startswith(TOOL_END):
            self._inside = False
            return len(TOOL_END)
        if head.startswith(FUNCTION_START):
            end = head.find(">", self._searched)
            if end == -1:
                return 0
            self._name, self._params = head[len(FUNCTION_START):end], {}
            return end + 1
        if head.startswith(PARAMETER_START):
            return self._parameter(head)
        if head.startswith(FUNCTION_END):
            if self._name is not None:
                calls.append(_coder_call(self._calls, self._name, self._params))
                self._calls += 1
                self._name = None
            return len(FUNCTION_END)
        angle = head.find("<")
        if angle == 0 and any(tag.startswith(head) for tag in _CODER_TAGS):
            return 0
        used = len(head) if angle == -1 else max(angle, 1)
        if not self._inside:
            content.append(head[:used])
        return used

    def _parameter(self, head: str) -> int:
        """A parameter ends at its `</parameter>`, or (unclosed) at the next `<parameter=` or `</function>`."""
        name_end = head.find(">")
        if name_end == -1:
            return 0
        ends = [(i, n) for tag, n in ((PARAMETER_END, len(PARAMETER_END)), (PARAMETER_START, 0), (FUNCTION_END, 0))
                if (i := head.find(tag, max(name_end + 1, self._searched - len(tag) + 1))) != -1]
        if not ends:
            return 0
        end, skip = min(ends)
        if self._name is not None:  # SGLang adds one outside a function to the last call's JSON; hotswap drops it
            key = head[len(PARAMETER_START):name_end]
            value = _coder_value_text(head[name_end + 1:end])
            self._params[key] = coder_value(value, key, coder_parameters(self._name, self._tools))
        return end + skip

    def finish(self) -> str:
        """Content held back at the end: a partial tag outside a call is text; a call cut short is dropped (SGLang has
        sent its name and closed parameters, arguments without their `}`)."""
        rest, self._buffer = self._buffer, ""
        cut = self._inside or self._name is not None or rest.startswith((FUNCTION_START, PARAMETER_START))
        return "" if cut else rest
