"""Reading tool calls back from the generated text, as it streams: OpenAI deltas and the final message.

The text follows chat/tooling/grammar.py's format. `ToolCallReader.feed` turns each piece of text
into the deltas the OpenAI API streams: a call's index, id and name first, then fragments of its
arguments; plain text becomes content deltas. The non-streamed reply reads the whole text the
same way, so both agree.
"""

from __future__ import annotations

import dataclasses
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
        # Text arrives a token at a time: pieces are kept in lists and joined when read, since
        # appending to one growing string copies it on every token (quadratic in a long reply).
        self._calls: list[tuple[dict, list[str]]] = []  # ({"id", "type", "function": {"name"}}, argument pieces)
        self._content: list[str] = []
        self._buffer = ""
        self._mode = "undecided"  # -> "content", or "between" / "head" / "arguments" / "tail" while reading calls
        self._depth = 0
        self._in_string = False
        self._escaped = False

    @property
    def calls(self) -> list[dict]:
        """{"id", "type", "function": {"name", "arguments"}} of each call read so far."""
        return [{**call, "function": {**call["function"], "arguments": "".join(pieces)}}
                for call, pieces in self._calls]

    @property
    def content(self) -> str:
        return "".join(self._content)

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
            call = {"id": new_call_id(), "type": "function", "function": {"name": name}}
            self._calls.append((call, []))
            deltas.append({"tool_calls": [{"index": len(self._calls) - 1, **call,
                                           "function": {"name": name, "arguments": ""}}]})
            self._buffer = buffer[match.end():]
            self._mode, self._depth, self._in_string, self._escaped = "arguments", 0, False, False
            return True
        if self._mode == "arguments":
            argument_pieces = self._calls[-1][1]
            if not argument_pieces:
                buffer = self._buffer = buffer.lstrip()  # the space after "arguments": may come in a later piece
            end = self._arguments_end(buffer)
            fragment = buffer if end is None else buffer[:end]
            if fragment:
                argument_pieces.append(fragment)
                deltas.append({"tool_calls": [{"index": len(self._calls) - 1, "function": {"arguments": fragment}}]})
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
        self._content.append(text)
        return {"content": text}


READ_PIECE_CHARS = 4096  # the reader slices its buffer once a call: fed whole, a reply of many calls is quadratic


def tool_reply(text: str) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a finished reply; content is None when the reply is only calls."""
    reader = ToolCallReader()
    for start in range(0, len(text), READ_PIECE_CHARS):
        reader.feed(text[start:start + READ_PIECE_CHARS])
    reader.finish()
    calls, content = reader.calls, reader.content
    return (content or None) if calls else content, calls


def tool_finish_reason(finish_reason: str, has_calls: bool) -> str:
    """OpenAI's finish_reason: "tool_calls" when the reply ended after its calls; "length" still wins."""
    return "tool_calls" if has_calls and finish_reason == "stop" else finish_reason


# --- A reply that repeats a call it already made ends there ------------------------------------------
# A small model allowed parallel calls (the default) tends to write the same call again and again until
# max_tokens. An exact repeat adds nothing, so the reply ends before it: the text up to the last distinct
# call, finish_reason "stop" (OpenAI's "tool_calls" once read), the tokens generated still counted.

TOOL_CALL_BLOCK = re.compile(re.escape(TOOL_CALL_OPEN) + r".*?" + re.escape(TOOL_CALL_CLOSE), re.S)
LEADING_SPACE = re.compile(r"\s*")


class RepeatWatch:
    """Feed generated text; get what may be released now. Text that could still become an exact repeat of an
    earlier call block is held back; `repeated` turns True when it did (the reply should end there)."""

    def __init__(self):
        self.repeated = False
        self._blocks: list[str] = []  # the complete call blocks so far, as written
        self._held = ""               # text after the last complete block, not released yet
        self._scanned = ""            # released text since the last complete block (may open a block)
        self._plain = False           # the reply is plain text ("auto" chose to answer): nothing to watch
        self._longest_block = 0

    def feed(self, text: str) -> str:
        if self.repeated:
            return ""
        if self._plain:
            return text
        if not self._blocks and not self._scanned.strip() and (self._scanned + text).strip()[:1] not in ("", "<"):
            self._plain = True  # under the grammar, a reply that starts with text holds no call
            self._scanned += text
            return text
        released = []
        pending = self._held + text
        self._held = ""
        while pending:
            # The scanned text holds no whole block, so a new one ends in the new text: searched only then (a
            # search per token reads the whole call so far, quadratic in a long call's arguments).
            if TOOL_CALL_CLOSE not in self._scanned[-len(TOOL_CALL_CLOSE) + 1:] + pending:
                break
            match = TOOL_CALL_BLOCK.search(self._scanned + pending)
            if match is None:
                break
            whole = self._scanned + pending
            block, end = match.group(0), match.end()
            if block in self._blocks:
                self.repeated = True
                kept = whole[:match.start()].rstrip()  # not the newline that led into the repeat
                released.append(kept[len(self._scanned):] if len(kept) >= len(self._scanned) else "")
                return "".join(released)
            self._blocks.append(block)
            self._longest_block = max(self._longest_block, len(block))
            released.append(whole[len(self._scanned):end])
            self._scanned, pending = "", whole[end:]
        if self._blocks and self._could_repeat(self._scanned, pending):
            self._held = pending
        else:
            released.append(pending)
            self._scanned += pending
        return "".join(released)

    def finish(self) -> str:
        """The end of the text: what was held back (it never became a repeat)."""
        held, self._held = self._held, ""
        return "" if self.repeated else held

    def _could_repeat(self, scanned: str, pending: str) -> bool:
        """Whether the text since the last block (scanned + pending) may still become a block already written."""
        text_start = LEADING_SPACE.match(scanned).end()
        if text_start == len(scanned):
            start = pending.lstrip()
            if not start:
                return bool(scanned or pending)  # whitespace that may lead into another call
        elif len(scanned) - text_start + len(pending) > self._longest_block:
            return False  # longer than any block (and not copied to find that out: this runs once a token)
        else:
            start = scanned[text_start:] + pending
        return any(block.startswith(start) for block in self._blocks)


class RepeatStoppingGeneration:
    """A generation (sync or async readers) that ends at the first exact repeat of a tool call it already made:
    the engine's generation is cancelled there, and `result` is its completion with the text up to the last
    distinct call and finish_reason "stop". Other attributes are the wrapped generation's."""

    def __init__(self, generation):
        self._generation = generation
        self._watch = RepeatWatch()
        self._text: list[str] = []
        self.result = None

    def __getattr__(self, name):
        return getattr(self._generation, name)

    def cancel(self) -> None:
        self._generation.cancel()

    def _released(self, delta: str) -> str:
        released = self._watch.feed(delta)
        self._text.append(released)
        if self._watch.repeated:
            self._generation.cancel()
        return released

    def _finish(self) -> str:
        tail = self._watch.finish()
        self._text.append(tail)
        completion = self._generation.result
        if completion is not None and self._watch.repeated:
            completion = dataclasses.replace(completion, text="".join(self._text), finish_reason="stop")
        self.result = completion
        return tail

    def __iter__(self):
        for delta in self._generation:
            if self._watch.repeated:
                continue  # draining the cancelled generation: its result counts the tokens generated
            released = self._released(delta)
            if released:
                yield released
        tail = self._finish()
        if tail:
            yield tail

    async def __aiter__(self):
        async for delta in self._generation:
            if delta is None:  # a keep-alive is due
                yield None
                continue
            if self._watch.repeated:
                continue
            released = self._released(delta)
            if released:
                yield released
        tail = self._finish()
        if tail:
            yield tail
