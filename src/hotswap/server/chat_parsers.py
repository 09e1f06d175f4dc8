"""SGLang's chat output parsers (`--reasoning-parser`, `--tool-call-parser`), for the chat route only (/generate and
/v1/completions return the text as generated, as SGLang's do). The names served: sglang_server_args.REASONING_PARSERS and
TOOL_CALL_PARSERS.

Reasoning (sglang/srt/parser/reasoning_parser.py, BaseReasoningFormatDetector with Qwen3Detector and DeepSeekR1Detector):
the text up to `</think>` is `reasoning_content`, a leading `<think>` dropped. `deepseek-r1` always starts in reasoning
(its template opens `<think>` in the prompt); `qwen3` starts in reasoning while thinking is on (serving_chat.py passes
`_get_reasoning_from_request` as force_reasoning: on unless `chat_template_kwargs.enable_thinking` is false), and a
`<tool_call>` before any `</think>` ends its reasoning; `qwen3-thinking` is `qwen3` always reasoning.

Tool calls (sglang/srt/function_call/qwen25_detector.py, Qwen25Detector; base_format_detector.py::parse_base_json): each
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` block naming an offered tool is a call; the content is the
text before the first block, stripped; a block that is not JSON, or names no offered tool, is dropped.

Streaming holds back a possible partial marker at a chunk's end, so any split of the text gives the same result as one
chunk (SGLang's reasoning stream relies on the marker arriving as one token).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"
_TOOL_BLOCK = re.compile(re.escape(TOOL_START + "\n") + "(.*?)" + re.escape("\n" + TOOL_END), re.DOTALL)


@dataclass
class ToolCall:
    """One parsed call: `tool_index` is the tool's position in the request's `tools` (SGLang's ToolCallItem.tool_index)."""
    tool_index: int
    name: str
    arguments: str


def thinking_requested(parser: str, template_kwargs: dict | None) -> bool:
    """SGLang's `_get_reasoning_from_request`: qwen3 thinks unless `enable_thinking` is false; deepseek-r1 always."""
    if parser == "qwen3":  # qwen3-thinking: on, as ReasoningParser forces it
        return not template_kwargs or template_kwargs.get("enable_thinking") is not False
    return True


def chat_template_kwargs(parser: str | None, template_kwargs: dict | None) -> dict | None:
    """SGLang's `_inject_reasoning_chat_template_kwarg`: qwen3's template gets `enable_thinking` unless the request set it."""
    if parser != "qwen3":
        return template_kwargs
    return {"enable_thinking": thinking_requested(parser, template_kwargs), **(template_kwargs or {})}


def split_reasoning(text: str, parser: str, thinking: bool) -> tuple[str, str]:
    """(reasoning_content, content) of a whole reply: BaseReasoningFormatDetector.detect_and_parse."""
    if not (_forced(parser, thinking) or THINK_START in text):
        return "", text
    while text.startswith(THINK_START):
        text = text[len(THINK_START):]
    if THINK_END in text:
        reasoning, _, content = text.partition(THINK_END)
        return reasoning, content
    tool = text.find(TOOL_START) if parser != "deepseek-r1" else -1
    return (text[:tool], text[tool:]) if tool != -1 else (text, "")


def _forced(parser: str, thinking: bool) -> bool:
    return parser != "qwen3" or thinking


def _partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of `markers` (held back until the next chunk)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(text), len(marker) - 1), longest, -1):
            if marker.startswith(text[-n:]):
                longest = n
                break
    return longest


class ReasoningStream:
    """A streamed reply's (reasoning, content) deltas, as the whole reply splits. `stream_reasoning` false (SGLang's
    request field) sends the reasoning in one piece once it ends."""

    def __init__(self, parser: str, thinking: bool, stream_reasoning: bool = True) -> None:
        self._ends = (THINK_END,) if parser == "deepseek-r1" else (THINK_END, TOOL_START)
        self._in_reasoning = _forced(parser, thinking)
        self._at_start = True  # nothing sent yet: a leading <think> is dropped (and opens reasoning when not forced)
        self._done = False  # reasoning ended: the rest is content
        self._stream_reasoning = stream_reasoning
        self._held = ""  # reasoning kept back (stream_reasoning false)
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, str]:
        self._buffer += text
        reasoning, content = "", ""
        if self._at_start:
            while self._buffer.startswith(THINK_START):
                self._buffer = self._buffer[len(THINK_START):]
                self._in_reasoning = True
            if self._buffer and THINK_START.startswith(self._buffer):
                return "", ""
            self._at_start = not self._buffer
        if self._in_reasoning and not self._done:
            found = [(i, m) for m in self._ends if (i := self._buffer.find(m)) != -1]
            if found:
                i, marker = min(found)
                reasoning, self._buffer = self._buffer[:i], self._buffer[i + (len(marker) if marker == THINK_END else 0):]
                self._done = True
                reasoning, self._held = self._held + reasoning, ""
            else:
                keep = _partial_suffix(self._buffer, self._ends)
                part, self._buffer = self._buffer[:len(self._buffer) - keep], self._buffer[len(self._buffer) - keep:]
                if not self._stream_reasoning:
                    self._held += part
                    return "", ""
                return part, ""
        if not self._in_reasoning and not self._done:
            self._done = True  # not forced and no leading <think>: all content
        content, self._buffer = self._buffer, ""
        return reasoning, content

    def finish(self) -> tuple[str, str]:
        """What was held back when the reply ends (a reply cut inside its reasoning: reasoning)."""
        rest, self._buffer = self._buffer, ""
        if self._in_reasoning and not self._done:
            rest, self._held = self._held + rest, ""
            return rest, ""
        return "", rest


def _calls_in(payload: str, tool_names: list[str]) -> list[ToolCall]:
    """BaseFormatDetector.parse_base_json: a call (or a list of them) naming an offered tool; anything else dropped."""
    try:
        action = json.loads(payload.strip())
    except json.JSONDecodeError:
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
    return content, [call for payload in _TOOL_BLOCK.findall(text) for call in _calls_in(payload, tool_names)]


class ToolCallStream:
    """A streamed reply's (content, calls) deltas: Qwen25Detector.parse_streaming_increment, which sends each call whole
    once its block closes; text outside blocks is content, a stray `</tool_call>` removed."""

    def __init__(self, tool_names: list[str]) -> None:
        self._tool_names = tool_names
        self._buffer = ""

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self._buffer += text
        content, calls = [], []
        while (start := self._buffer.find(TOOL_START)) != -1:
            content.append(self._buffer[:start])
            self._buffer = self._buffer[start:]
            end = self._buffer.find(TOOL_END, len(TOOL_START))
            if end == -1:
                return _without_ends("".join(content)), calls
            calls += _calls_in(self._buffer[len(TOOL_START):end], self._tool_names)
            self._buffer = self._buffer[end + len(TOOL_END):]
        keep = _partial_suffix(self._buffer, (TOOL_START, TOOL_END))
        content.append(self._buffer[:len(self._buffer) - keep])
        self._buffer = self._buffer[len(self._buffer) - keep:]
        return _without_ends("".join(content)), calls

    def finish(self) -> str:
        """Content held back at the end: a partial marker is text; an unclosed block is dropped, as SGLang drops it."""
        rest, self._buffer = self._buffer, ""
        return "" if rest.startswith(TOOL_START) else _without_ends(rest)


def _without_ends(text: str) -> str:
    return text.replace(TOOL_END, "")


def new_call_id() -> str:
    """SGLang's tool call id (serving_chat.py, `_process_tool_call_id` for every parser but Kimi's)."""
    return f"call_{uuid.uuid4().hex[:24]}"
