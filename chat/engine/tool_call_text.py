"""An upstream's streamed `tool_calls` deltas written as the project's tool-call text, so one reader serves all engines.

Local models write `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks under a
grammar (chat/tooling/grammar.py); a remote upstream that was given the tools answers with OpenAI
`tool_calls` deltas instead. Writing those as the same text lets chat/tooling/calls.py read both.
"""

from __future__ import annotations

import json

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class UnofferedToolCall(Exception):
    """The upstream called a tool the request did not offer, or more calls than it allowed: the client must not get
    it (a client dispatching by name would run whatever the upstream named)."""


class ToolCallText:
    """Feed the `tool_calls` list of each upstream delta; get text pieces. `close()` ends the last call.

    `body`: the request as sent upstream (its tools, tool_choice, parallel_tool_calls); a call outside them
    raises UnofferedToolCall."""

    def __init__(self, body: dict | None = None):
        self._open: int | None = None  # index of the call being written
        self._has_arguments = False
        self._count = 0
        self._callable, self._parallel = _callable_names(body or {})

    def feed(self, deltas: list) -> str:
        pieces = []
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            index = delta.get("index", position)  # a non-streamed message's calls carry no index
            if index != self._open:
                self._check(function.get("name"))
                pieces.append(self.close())
                if self._count:
                    pieces.append("\n")
                pieces.append(f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(function.get("name") or "")}, "arguments": ')
                self._open, self._has_arguments = index, False
                self._count += 1
            arguments = function.get("arguments")
            if isinstance(arguments, str) and arguments:
                pieces.append(arguments)
                self._has_arguments = True
            elif isinstance(arguments, dict):  # some servers send the object itself
                pieces.append(json.dumps(arguments))
                self._has_arguments = True
        return "".join(pieces)

    def _check(self, name) -> None:
        if not isinstance(name, str) or name not in self._callable:
            raise UnofferedToolCall(f"a call of {str(name)[:64]!r}, which was not offered")
        if self._count and not self._parallel:
            raise UnofferedToolCall("a second tool call, though parallel_tool_calls was false")

    def close(self) -> str:
        if self._open is None:
            return ""
        self._open = None
        return ("" if self._has_arguments else "{}") + f"}}\n{TOOL_CALL_CLOSE}"


def _callable_names(body: dict) -> tuple[frozenset[str], bool]:
    """The tool names a reply may call under `body` (all its tools, or the one tool_choice names) and whether it
    may call several."""
    names = {tool["function"]["name"] for tool in body.get("tools") or ()
             if isinstance(tool, dict) and isinstance(tool.get("function"), dict)}
    choice = body.get("tool_choice")
    if isinstance(choice, dict):
        names &= {(choice.get("function") or {}).get("name")}
    elif choice == "none":
        names = set()
    return frozenset(names), body.get("parallel_tool_calls") is not False
