"""A chat reply's message parsed as SGLang's serving_chat.py does (its --reasoning-parser / --tool-call-parser): whole,
or as one streamed choice's deltas."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from hotswap.server.chat_parsers import ReasoningStream, call_stream, new_call_id, parse_calls, split_reasoning, thinking_requested
from hotswap.server.openai_replies import finish_reason, matched_stop

if TYPE_CHECKING:
    from hotswap.server.app import ServerState
    from hotswap.server.openai_requests import ChatCompletionRequest


class ChatParsing:
    """How a chat reply is parsed, as SGLang's serving_chat.py decides it: reasoning where the server has a parser and
    the request `separate_reasoning`; tool calls where it has a parser and `tool_choice` is not "none" (SGLang's default:
    "auto" with tools, "none" without)."""

    def __init__(self, state: ServerState, body: ChatCompletionRequest) -> None:
        self.reasoning = state.reasoning_parser if body.separate_reasoning else None
        self.thinking = bool(state.reasoning_parser) and thinking_requested(state.reasoning_parser, body.chat_template_kwargs)
        self.stream_reasoning = body.stream_reasoning
        choice = body.tool_choice or ("auto" if body.tools else "none")
        self.tool_parser = state.tool_call_parser if choice != "none" else None
        self.tools = body.tools or []

    def message(self, text: str, meta: dict) -> tuple[dict, str | None, int | str | None]:
        """A whole reply's message, finish_reason and matched_stop (`tool_calls` and no match where it made calls)."""
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        fin, matched = finish_reason(meta), matched_stop(meta)
        if self.reasoning:  # SGLang's ChatMessage: reasoning_content null where there was none, not ""
            reasoning, msg["content"] = split_reasoning(text, self.reasoning, self.thinking)
            msg["reasoning_content"] = reasoning or None
        if self.tool_parser:
            msg["tool_calls"] = None
            if (parsed := parse_calls(msg["content"], self.tool_parser, self.tools)) is not None:
                msg["content"], calls = parsed
                msg["tool_calls"] = [{"id": new_call_id(), "index": c.tool_index, "type": "function",
                                      "function": {"name": c.name, "arguments": c.arguments}} for c in calls]
                if calls and fin == "stop":  # SGLang's _process_tool_calls: a reply cut at the length stays "length"
                    fin, matched = "tool_calls", None
        return msg, fin, matched

    def stream(self) -> ChoiceStream:
        return ChoiceStream(self)


class ChoiceStream:
    """One streamed choice's deltas: `reasoning_content`, `content`, and each tool call whole once it closes (its
    `index` the call's position in the choice, the key a client gathers a call's deltas by)."""

    def __init__(self, parsing: ChatParsing) -> None:
        self.reasoning = ReasoningStream(parsing.reasoning, parsing.thinking, parsing.stream_reasoning) if parsing.reasoning else None
        self.tools = call_stream(parsing.tool_parser, parsing.tools) if parsing.tool_parser else None
        self.calls = 0

    def delta(self, text: str, fin: str | None) -> tuple[dict, str | None]:
        reasoning, content = self.reasoning.feed(text) if self.reasoning else ("", text)
        if self.reasoning and fin is not None:
            more_reasoning, more_content = self.reasoning.finish()
            reasoning, content = reasoning + more_reasoning, content + more_content
        calls: list = []
        if self.tools:
            content, calls = self.tools.feed(content)
            content += self.tools.finish() if fin is not None else ""
        delta: dict[str, Any] = {}
        if reasoning:
            delta["reasoning_content"] = reasoning
        if content:
            delta["content"] = content
        if calls:
            delta["tool_calls"] = [{"id": new_call_id(), "index": self.calls + j, "type": "function",
                                    "function": {"name": c.name, "arguments": c.arguments}} for j, c in enumerate(calls)]
            self.calls += len(calls)
        return delta, ("tool_calls" if self.calls and fin == "stop" else fin)
