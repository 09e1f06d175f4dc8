"""SGLang's chat output parsers (`--reasoning-parser`, `--tool-call-parser`), for the chat route only (/generate and
/v1/completions return the text as generated, as SGLang's do). The names served: sglang_server_args.REASONING_PARSERS and
TOOL_CALL_PARSERS; one module per parser family.

Streaming holds back a possible partial marker at a chunk's end, so any split of the text gives the same result as one
chunk (SGLang's reasoning stream relies on the marker arriving as one token).
"""

from __future__ import annotations

from hotswap.server.chat_parsers.common import ToolCall, new_call_id
from hotswap.server.chat_parsers.qwen3_coder import CoderCallStream, has_coder_call, parse_coder_calls
from hotswap.server.chat_parsers.qwen25 import ToolCallStream, has_tool_call, parse_tool_calls
from hotswap.server.chat_parsers.reasoning import ReasoningStream, chat_template_kwargs, split_reasoning, thinking_requested

__all__ = ["CoderCallStream", "ReasoningStream", "ToolCall", "ToolCallStream", "call_stream", "chat_template_kwargs",
           "has_tool_call", "new_call_id", "parse_calls", "parse_tool_calls", "split_reasoning", "thinking_requested"]


def parse_calls(text: str, parser: str, tools: list[dict]) -> tuple[str, list[ToolCall]] | None:
    """(content, calls) of a whole reply by the served `--tool-call-parser`; None where the reply has no call marker."""
    if parser == "qwen3_coder":
        return parse_coder_calls(text, tools) if has_coder_call(text) else None
    return parse_tool_calls(text, _tool_names(tools)) if has_tool_call(text) else None


def call_stream(parser: str, tools: list[dict]) -> ToolCallStream | CoderCallStream:
    """The served `--tool-call-parser`'s stream."""
    return CoderCallStream(tools) if parser == "qwen3_coder" else ToolCallStream(_tool_names(tools))


def _tool_names(tools: list[dict]) -> list[str | None]:
    return [f.get("name") if isinstance(f := t.get("function"), dict) else None for t in tools]
