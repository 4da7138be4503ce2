"""An upstream's streamed `tool_calls` deltas written as the project's tool-call text, so one reader serves all engines.

Local models write `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks under a
grammar (chat/tooling/grammar.py); a remote upstream that was given the tools answers with OpenAI
`tool_calls` deltas instead. Writing those as the same text lets chat/tooling/calls.py read both.
"""

from __future__ import annotations

import json

TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


class ToolCallText:
    """Feed the `tool_calls` list of each upstream delta; get text pieces. `close()` ends the last call."""

    def __init__(self):
        self._open: int | None = None  # index of the call being written
        self._has_arguments = False
        self._count = 0

    def feed(self, deltas: list) -> str:
        pieces = []
        for position, delta in enumerate(deltas):
            if not isinstance(delta, dict):
                continue
            function = delta.get("function") if isinstance(delta.get("function"), dict) else {}
            index = delta.get("index", position)  # a non-streamed message's calls carry no index
            if index != self._open:
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

    def close(self) -> str:
        if self._open is None:
            return ""
        self._open = None
        return ("" if self._has_arguments else "{}") + f"}}\n{TOOL_CALL_CLOSE}"
