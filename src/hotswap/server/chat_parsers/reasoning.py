"""Reasoning (`--reasoning-parser` qwen3, qwen3-thinking, deepseek-r1): sglang/srt/parser/reasoning_parser.py,
BaseReasoningFormatDetector with Qwen3Detector and DeepSeekR1Detector. The text up to `</think>` is `reasoning_content`,
a leading `<think>` dropped. `deepseek-r1` always starts in reasoning (its template opens `<think>` in the prompt);
`qwen3` starts in reasoning while thinking is on (serving_chat.py passes `_get_reasoning_from_request` as force_reasoning:
on unless `chat_template_kwargs.enable_thinking` is false), and a `<tool_call>` before any `</think>` ends its
reasoning; `qwen3-thinking` is `qwen3` always reasoning."""

from __future__ import annotations

from hotswap.server.chat_parsers.common import THINK_END, THINK_START, TOOL_START, partial_suffix


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
                keep = partial_suffix(self._buffer, self._ends)
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

