"""Tool definitions of a chat request (`tools`, `tool_choice`, `parallel_tool_calls`), checked as OpenAI defines them."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from chat.errors import ApiError

MAX_TOOLS = 128  # OpenAI's own limit
NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
CHOICES = ("none", "auto", "required")
EMPTY_PARAMETERS = {"type": "object", "properties": {}}


@dataclass(frozen=True)
class Tool:
    """One function the model may call: its JSON Schema `parameters` describe the arguments object."""

    name: str
    description: str
    parameters_json: str  # the schema as JSON text: keeps the dataclass immutable and hashable

    @property
    def parameters(self) -> dict:
        return json.loads(self.parameters_json)

    def as_openai(self) -> dict:
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


@dataclass(frozen=True)
class ToolRequest:
    """What the request allows: `choice` is none, auto, required, or function (then `function` names it)."""

    tools: tuple[Tool, ...]
    choice: str = "auto"
    function: str | None = None
    parallel: bool = True

    @property
    def may_call(self) -> bool:
        return self.choice != "none" and bool(self.tools)

    @property
    def must_call(self) -> bool:
        return self.choice in ("required", "function")

    @property
    def openai_choice(self) -> str | dict:
        """tool_choice as the OpenAI API writes it."""
        if self.choice == "function":
            return {"type": "function", "function": {"name": self.function}}
        return self.choice

    @property
    def callable_tools(self) -> tuple[Tool, ...]:
        """The tools a reply may call: all of them, or only the one tool_choice names."""
        if self.choice == "function":
            return tuple(tool for tool in self.tools if tool.name == self.function)
        return self.tools if self.choice != "none" else ()


def tool_request_from(*, tools, tool_choice, parallel_tool_calls) -> ToolRequest | None:
    """The checked tool settings of a request, or None when it has no tools; raises ApiError naming the field."""
    if tools is None:
        if tool_choice not in (None, "none"):
            raise ApiError("tool_choice needs a non-empty 'tools' list.", param="tool_choice")
        return None  # parallel_tool_calls alone is harmless: without tools there is nothing to call
    if not isinstance(tools, list) or not tools:
        raise ApiError("tools must be a non-empty list of function tools.", param="tools")
    if len(tools) > MAX_TOOLS:
        raise ApiError(f"at most {MAX_TOOLS} tools are accepted per request.", param="tools")
    checked = tuple(_tool_from(definition, f"tools[{index}]") for index, definition in enumerate(tools))
    names = [tool.name for tool in checked]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ApiError(f"two tools are named {name!r}; tool names must be unique.",
                           param=f"tools[{index}].function.name")
    choice, function = _choice_from(tool_choice, names)
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise ApiError("parallel_tool_calls must be true or false.", param="parallel_tool_calls")
    return ToolRequest(tools=checked, choice=choice, function=function,
                       parallel=True if parallel_tool_calls is None else parallel_tool_calls)


def _tool_from(definition, path: str) -> Tool:
    if not isinstance(definition, dict) or definition.get("type") != "function":
        raise ApiError(f"{path} must be an object with type 'function' (the only tool type supported).",
                       param=f"{path}.type")
    function = definition.get("function")
    if not isinstance(function, dict):
        raise ApiError(f"{path}.function must be an object with at least a 'name'.", param=f"{path}.function")
    name = function.get("name")
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise ApiError(f"{path}.function.name must be 1-64 letters, digits, underscores or dashes.",
                       param=f"{path}.function.name")
    description = function.get("description", "")
    if description is None:
        description = ""
    if not isinstance(description, str):
        raise ApiError(f"{path}.function.description must be a string.", param=f"{path}.function.description")
    parameters = function.get("parameters")
    if parameters is None:
        parameters = EMPTY_PARAMETERS
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise ApiError(f"{path}.function.parameters must be a JSON Schema of type 'object'.",
                       param=f"{path}.function.parameters")
    return Tool(name=name, description=description, parameters_json=json.dumps(parameters, sort_keys=True))


def _choice_from(tool_choice, names: list[str]) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ApiError(f"tool_choice must be one of {', '.join(CHOICES)} or a named function, "
                           f"not {tool_choice[:40]!r}.", param="tool_choice")
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function" or not isinstance(function, dict):
        raise ApiError('tool_choice must be a string or {"type": "function", "function": {"name": ...}}.',
                       param="tool_choice")
    name = function.get("name")
    if name not in names:
        shown = name[:64] if isinstance(name, str) else name
        raise ApiError(f"tool_choice names the function {shown!r}, which is not among the request's tools.",
                       param="tool_choice")
    return "function", name


def tool_message_check(message: dict, path: str) -> None:
    """A history message's tool fields: `tool` messages answer a call id; assistant tool_calls are well formed."""
    role = message.get("role")
    if role == "tool":
        if not isinstance(message.get("tool_call_id"), str) or not message["tool_call_id"]:
            raise ApiError(f"{path}.tool_call_id is required on a tool message.", param=f"{path}.tool_call_id")
        return
    calls = message.get("tool_calls")
    if calls is None:
        return
    if role != "assistant":
        raise ApiError(f"{path}.tool_calls is only allowed on assistant messages.", param=f"{path}.tool_calls")
    if not isinstance(calls, list):
        raise ApiError(f"{path}.tool_calls must be a list.", param=f"{path}.tool_calls")
    for index, call in enumerate(calls):
        where = f"{path}.tool_calls[{index}]"
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise ApiError(f"{where} must have a function with a name.", param=f"{where}.function")
        if not isinstance(function.get("arguments", ""), str):
            raise ApiError(f"{where}.function.arguments must be a JSON string.", param=f"{where}.function.arguments")
        if not isinstance(call.get("id", ""), str):
            raise ApiError(f"{where}.id must be a string.", param=f"{where}.id")


def tool_request_of(data: dict) -> ToolRequest | None:
    """The tool settings of a validated request (chat/api/serializers.py checked them)."""
    return tool_request_from(tools=data.get("tools"), tool_choice=data.get("tool_choice"),
                             parallel_tool_calls=data.get("parallel_tool_calls"))
