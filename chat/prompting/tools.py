"""The generic tool format of prompts: the tools in a system message, calls and results as plain text turns.

Used for every model (docs/API.md, "Tool calling"): the history's assistant `tool_calls` become
the same `<tool_call>` blocks the grammar makes the model write, and `tool` results become a user
turn of `<tool_response>` blocks, so the turns still alternate user/assistant for any template.
"""

from __future__ import annotations

import json

from llmsite.strict_json import StrictJSONError, strict_json_loads

from chat.tooling.grammar import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from chat.tooling.requests import ToolRequest

TOOL_RESPONSE_OPEN, TOOL_RESPONSE_CLOSE = "<tool_response>", "</tool_response>"


def tools_system_text(request: ToolRequest | None) -> str:
    """What the model is told about the tools it may call now ("" when it may call none)."""
    if request is None or not request.may_call:
        return ""
    listed = "\n".join(json.dumps({"name": tool.name, "description": tool.description,
                                   "parameters": tool.parameters}, ensure_ascii=False)
                       for tool in request.callable_tools)
    if request.must_call:
        when = "You must call a tool in this reply."
    else:
        when = "Call a tool when it helps answer; otherwise answer in plain text."
    return (f"You can call these tools:\n{listed}\n\n"
            f"To call a tool, reply with {TOOL_CALL_OPEN}\n"
            f'{{"name": "<tool name>", "arguments": {{<arguments as JSON>}}}}\n{TOOL_CALL_CLOSE}\n'
            f"Tool results come back in {TOOL_RESPONSE_OPEN} blocks. {when}")


def turns_with_tool_text(messages: list[dict]) -> list[dict]:
    """User/assistant turns of a client history in which tool calls and tool results are written as text."""
    names = {}  # tool_call_id -> function name, to label each result
    turns: list[dict] = []
    for message in messages:
        role = message["role"]
        if role == "assistant":
            blocks = [message.get("content") or ""]
            for call in message.get("tool_calls") or []:
                function = call["function"]
                names[call.get("id")] = function["name"]
                blocks.append(f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(function["name"])}, '
                              f'"arguments": {_json_text(function.get("arguments"))}}}\n{TOOL_CALL_CLOSE}')
            turns.append({"role": "assistant", "content": "\n".join(block for block in blocks if block)})
        elif role == "tool":
            result = json.dumps({"name": names.get(message["tool_call_id"], ""), "content": message["content"]},
                                ensure_ascii=False)
            block = f"{TOOL_RESPONSE_OPEN}\n{result}\n{TOOL_RESPONSE_CLOSE}"
            if turns and turns[-1]["role"] == "user" and turns[-1]["content"].startswith(TOOL_RESPONSE_OPEN):
                turns[-1] = {"role": "user", "content": turns[-1]["content"] + "\n" + block}
            else:
                turns.append({"role": "user", "content": block})
        elif role == "user":
            turns.append({"role": "user", "content": message["content"]})
    return turns


def _json_text(arguments: str | None) -> str:
    """The call's arguments as JSON text (a client's malformed arguments are quoted as a string)."""
    if not arguments:
        return "{}"
    try:
        strict_json_loads(arguments)
    except StrictJSONError:  # not JSON, or JSON nested too deep to read back (json.loads raised RecursionError)
        return json.dumps(arguments, ensure_ascii=False)
    return arguments
