"""Qwen2.5 tool calls (`--tool-call-parser qwen25` / `qwen`): sglang/srt/function_call/qwen25_detector.py,
Qwen25Detector; base_format_detector.py::parse_base_json. Each `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`
block naming an offered tool is a call; the content is the text before the first block, stripped; a block that is not
JSON, or names no offered tool, is dropped."""

from __future__ import annotations

import json

from hotswap.server.chat_parsers.common import TOOL_END, TOOL_START, ToolCall, partial_suffix


def _calls_in(payload: str, tool_names: list[str]) -> list[ToolCall]:
    """BaseFormatDetector.parse_base_json: a call (or a list of them) naming an offered tool; anything else dropped."""
    try:
        action = json.loads(payload.strip())
    except (json.JSONDecodeError, RecursionError):  # nested past the parser's depth: no call, not a 500
        return []
    calls = []
    for act in action if isinstance(action, list) else [action]:
        name = act.get("name") if isinstance(act, dict) else None
        if isinstance(name, str) and name in tool_names:
            args = act.get("parameters") or act.get("arguments", {})
            calls.append(ToolCall(tool_names.index(name), name, json.dumps(args, ensure_ascii=False)))
    return calls


def has_tool_call(text: str) -> bool:
    return TOOL_START + "\n" in text


def parse_tool_calls(text: str, tool_names: list[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of a whole reply that has a call block: Qwen25Detector.detect_and_parse."""
    content = text[:text.find(TOOL_START + "\n")].strip()
    return content, [call for payload in _tool_blocks(text) for call in _calls_in(payload, tool_names)]


def _tool_blocks(text: str) -> list[str]:
    """The payloads Qwen25Detector's `<tool_call>\\n(.*?)\\n</tool_call>` findall gives, found in linear time (the
    regex rescans the rest of the reply from each unclosed opening: quadratic in a reply of many)."""
    opening, closing = TOOL_START + "\n", "\n" + TOOL_END
    payloads, start = [], text.find(opening)
    while start != -1 and (end := text.find(closing, start + len(opening))) != -1:
        payloads.append(text[start + len(opening):end])
        start = text.find(opening, end + len(closing))
    return payloads


class ToolCallStream:
    """A streamed reply's (content, calls) deltas: Qwen25Detector.parse_streaming_increment, which sends each call whole
    once its block closes; text outside blocks is content, a stray `</tool_call>` removed."""

    def __init__(self, tool_names: list[str]) -> None:
        self._tool_names = tool_names
        self._buffer = ""
        self._searched = 0  # how far an open block was searched for its end (each chunk searches only what is new)

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content, calls = [], []
        while (start := self._buffer.find(TOOL_START)) != -1:
            content.append(self._buffer[:start])
            self._buffer = self._buffer[start:]
            end = self._buffer.find(TOOL_END, max(len(TOOL_START), self._searched))
            if end == -1:
                self._searched = max(len(TOOL_START), len(self._buffer) - len(TOOL_END) + 1)
                return _without_ends("".join(content)), calls
            self._searched = 0
            calls += _calls_in(self._buffer[len(TOOL_START):end], self._tool_names)
            self._buffer = self._buffer[end + len(TOOL_END):]
        keep = partial_suffix(self._buffer, (TOOL_START, TOOL_END))
        content.append(self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return _without_ends("".join(content)), calls

    def finish(self) -> str:
        """Content held back at the end: a partial marker is text; an unclosed block is dropped, as SGLang drops it."""
        rest, self._buffer = self._buffer, ""
        return "" if rest.startswith(TOOL_START) else _without_ends(rest)


def _without_ends(text: str) -> str:
    return text.replace(TOOL_END, "")
