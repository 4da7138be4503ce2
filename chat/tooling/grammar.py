"""A GBNF grammar that makes the model's reply tool calls whose arguments match the tools' JSON Schemas.

The reply format (docs/API.md, "Tool calling"): one or more

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

separated by a newline. With tool_choice "auto" the reply is either such calls or plain text that
does not start with "<" (so the first character tells which: chat/tooling/calls.py relies on it).
"""

from __future__ import annotations

from chat.engine.grammars import SchemaNotConvertible, json_schema_grammar, one_regex_budget
from chat.engine.tool_call_text import TOOL_CALL_CLOSE, TOOL_CALL_OPEN
from chat.errors import ApiError
from .requests import ToolRequest
MAX_PARALLEL_CALLS = 8  # a small model may repeat a call until max_tokens; a bound keeps the reply finite


def tool_call_grammar(request: ToolRequest | None) -> str | None:
    """The grammar for a request that may call tools, or None (tool_choice "none", or no tools)."""
    if request is None or not request.may_call:
        return None
    with one_regex_budget():  # for all the tools together, not each
        return _tool_call_grammar(request)


def _tool_call_grammar(request: ToolRequest) -> str:
    alternatives = []
    tools = request.callable_tools
    for index, tool in enumerate(tools):
        _check_convertible(tool, request)
        # The parameters move into a larger schema: their own references ("#/$defs/Item", as pydantic writes
        # them) must point to where they now are.
        where = "#/properties/arguments" if len(tools) == 1 else f"#/anyOf/{index}/properties/arguments"
        alternatives.append({"type": "object", "properties": {"name": {"const": tool.name},
                                                              "arguments": _rebased(tool.parameters, where)},
                             "required": ["name", "arguments"]})
    schema = alternatives[0] if len(alternatives) == 1 else {"anyOf": alternatives}
    call_json = json_schema_grammar(schema, root="tool-call-json")
    calls = "tool-call" if not request.parallel else f'tool-call ("\\n" tool-call){{0,{MAX_PARALLEL_CALLS - 1}}}'
    root = "root ::= tool-calls" if request.must_call else "root ::= tool-calls | free-text"
    return "\n".join([
        root,
        f"tool-calls ::= {calls}",
        f'tool-call ::= "{TOOL_CALL_OPEN}" "\\n"? tool-call-json "\\n"? "{TOOL_CALL_CLOSE}"',
        "free-text ::= [^<] [^\\x00]*",
        call_json,
    ])


DATA_KEYWORDS = ("const", "enum", "default", "examples")  # their values are JSON data, not schemas


def _rebased(schema, where: str):
    """`schema` with every local reference ("#...") made relative to `where` instead of the schema's root."""
    if isinstance(schema, list):
        return [_rebased(item, where) for item in schema]
    if not isinstance(schema, dict):
        return schema
    rebased = {}
    for key, value in schema.items():
        if key == "$ref" and isinstance(value, str) and value.startswith("#"):
            rebased[key] = where + value[1:] if value not in ("#", "#/") else where
        elif key in DATA_KEYWORDS:
            rebased[key] = value
        else:
            rebased[key] = _rebased(value, where)
    return rebased


def _check_convertible(tool, request: ToolRequest) -> None:
    try:
        json_schema_grammar(tool.parameters_json)
    except SchemaNotConvertible as exc:
        index = [t.name for t in request.tools].index(tool.name)
        raise ApiError(f"tools[{index}].function.parameters: {exc}", param=f"tools[{index}].function.parameters",
                       code=exc.code) from None
