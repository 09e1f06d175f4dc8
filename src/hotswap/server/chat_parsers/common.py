"""What the chat parsers share: their markers, a parsed call, and the streamed hold-back of a partial marker."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

THINK_START, THINK_END = "<think>", "</think>"
TOOL_START, TOOL_END = "<tool_call>", "</tool_call>"


@dataclass
class ToolCall:
    """One parsed call: `tool_index` is the tool's position in the request's `tools` (SGLang's ToolCallItem.tool_index)."""
    tool_index: int
    name: str
    arguments: str



def partial_suffix(text: str, markers: tuple[str, ...]) -> int:
    """The length of the longest end of `text` that begins one of `markers` (held back until the next chunk)."""
    longest = 0
    for marker in markers:
        for n in range(min(len(text), len(marker) - 1), longest, -1):
            if marker.startswith(text[-n:]):
                longest = n
                break
    return longest


def new_call_id() -> str:
    """SGLang's tool call id (serving_chat.py, `_process_tool_call_id` for every parser but Kimi's)."""
    return f"call_{uuid.uuid4().hex[:24]}"
