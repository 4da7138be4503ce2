"""Reading tool calls back from the generated text, as it streams: OpenAI deltas and the final message.

The text follows chat/tooling/grammar.py's format. `ToolCallReader.feed` turns each piece of text
into the deltas the OpenAI API streams: a call's index, id and name first, then fragments of its
arguments; plain text becomes content deltas. The non-streamed reply reads the whole text the
same way, so both agree.
"""

from __future__ import annotations

import json
import re
import uuid

from .grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN

CALL_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*')
MAX_HEAD_CHARS = 400  # past this without a name, the text is not a call head (cannot happen under the grammar)


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


class ToolCallReader:
    """Feed generated text; get OpenAI message deltas. `calls` and `content` hold the whole reply so far."""

    def __init__(self):
        self.calls: list[dict] = []  # {"id", "type", "function": {"name", "arguments"}}
        self.content = ""
        self._buffer = ""
        self._mode = "undecided"  # -> "content", or "between" / "head" / "arguments" / "tail" while reading calls
        self._depth = 0
        self._in_string = False
        self._escaped = False

    def feed(self, text: str) -> list[dict]:
        self._buffer += text
        deltas: list[dict] = []
        while self._step(deltas):
            pass
        return deltas

    def finish(self) -> list[dict]:
        """The end of the text: anything held back that is not part of a call becomes content."""
        deltas: list[dict] = []
        if self._mode in ("undecided", "between", "content") and self._buffer.strip():
            deltas.append(self._text(self._buffer))
        self._buffer = ""
        return deltas

    def _step(self, deltas: list[dict]) -> bool:
        """Consume what can be decided from the buffer; False when more text is needed."""
        buffer = self._buffer
        if self._mode == "content":
            if buffer:
                deltas.append(self._text(buffer))
                self._buffer = ""
            return False
        if self._mode in ("undecided", "between"):
            stripped = buffer.lstrip()
            if not stripped:
                return False
            if stripped.startswith(TOOL_CALL_OPEN):
                self._buffer = stripped[len(TOOL_CALL_OPEN):]
                self._mode = "head"
                return True
            if TOOL_CALL_OPEN.startswith(stripped):
                return False  # may still become "<tool_call>"
            self._mode = "content"  # text, not a call (under the grammar: "auto" chose to answer)
            return True
        if self._mode == "head":
            match = CALL_HEAD.match(buffer)
            if match is None:
                if len(buffer) > MAX_HEAD_CHARS or TOOL_CALL_CLOSE in buffer:
                    self._mode = "content"
                    self._buffer = TOOL_CALL_OPEN + buffer
                    return True
                return False
            try:
                name = json.loads(f'"{match.group(1)}"')
            except ValueError:
                name = match.group(1)
            call = {"id": new_call_id(), "type": "function", "function": {"name": name, "arguments": ""}}
            self.calls.append(call)
            deltas.append({"tool_calls": [{"index": len(self.calls) - 1, **call,
                                           "function": {"name": name, "arguments": ""}}]})
            self._buffer = buffer[match.end():]
            self._mode, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
            return True
        if self._mode == "arguments":
            if not self.calls[-1]["function"]["arguments"]:
                buffer = self._buffer = buffer.lstrip()  # the space after "arguments": may come in a later piece
            end = self._arguments_end(buffer)
            fragment = buffer if end is None else buffer[:end]
            if fragment:
                self.calls[-1]["function"]["arguments"] += fragment
                deltas.append({"tool_calls": [{"index": len(self.calls) - 1, "function": {"arguments": fragment}}]})
            self._buffer = "" if end is None else buffer[end:]
            if end is None:
                return False
            self._mode = "tail"
            return True
        # "tail": the wrapper's closing brace and </tool_call>
        closing = buffer.find(TOOL_CALL_CLOSE)
        if closing < 0:
            return False
        self._buffer = buffer[closing + len(TOOL_CALL_CLOSE):]
        self._mode = "between"
        return True

    def _arguments_end(self, text: str) -> int | None:
        """Where the arguments' JSON value ends in `text` (continuing the scan state), or None if not yet."""
        for index, char in enumerate(text):
            if self._in_string:
                if self._escaped:
                    self._escaped = False
                elif char == "\\":
                    self._escaped = True
                elif char == '"':
                    self._in_string = False
                    if self._depth == 0:
                        return index + 1
            elif char == '"':
                self._in_string = True
            elif char in "{[":
                self._depth += 1
            elif char in "}]":
                self._depth -= 1
                if self._depth <= 0:
                    return index + 1
        return None

    def _text(self, text: str) -> dict:
        self.content += text
        return {"content": text}


def tool_reply(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply; content is None when the reply is only calls."""
    reader = ToolCallReader()
    reader.feed(text)
    reader.finish()
    return (reader.content or None) if reader.calls else reader.content, reader.calls


def tool_finish_reason(finish_reason: str, has_calls: bool) -> str:
    """OpenAI's finish_reason: "tool_calls" when the reply ended after its calls; "length" still wins."""
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason
