"""The Responses API (`client.responses`): POST /v1/responses, GET and DELETE /v1/responses/<id>.

A thin surface over the chat pipeline: the request is translated into a chat request (input items into
messages, function tools into chat tools, text.format into response_format) and runs as one
(chat/services.py `response_create`); a stored response is its conversation's n-th reply, so
`previous_response_id` continues that conversation. Shapes and stream events: chat/api/response_events.py.
"""

from __future__ import annotations

from django.conf import settings
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from chat.errors import ApiError
from chat.services import response_create, response_delete, response_get
from chat.tooling.requests import tool_message_check, tool_request_from

from .response_events import response_body, response_events, stored_response_body
from .response_serializers import ResponseDeletedSerializer, ResponseObjectSerializer
from .serializers import SamplingFieldsMixin
from .views import ERRORS, GeneratingView, api_key_of, logged, reply_stream_response

INPUT_ROLES = ("user", "system", "developer", "assistant")
TEXT_PART_TYPES = ("input_text", "output_text", "text")


MAX_METADATA_PAIRS, MAX_METADATA_KEY = 16, 64  # OpenAI's limits


class MetadataField(serializers.DictField):
    """`metadata`, counted before its values are validated: 1 MB holds 100,000 pairs, each a field run (1.7 s of CPU),
    and all of them would be echoed back."""

    def to_internal_value(self, data):
        if isinstance(data, dict):
            if len(data) > MAX_METADATA_PAIRS:
                raise serializers.ValidationError(f"at most {MAX_METADATA_PAIRS} key-value pairs.")
            if any(len(str(key)) > MAX_METADATA_KEY for key in data):
                raise serializers.ValidationError(f"keys may be at most {MAX_METADATA_KEY} characters long.")
        return super().to_internal_value(data)


class ResponseRequestSerializer(SamplingFieldsMixin):
    """The request as the openai SDK sends it; `validate` returns the equivalent chat request (plus
    previous_response_id and the fields echoed in the response object)."""

    input = serializers.JSONField(help_text="A string (one user message) or a list of input items.")
    instructions = serializers.CharField(required=False, allow_null=True, allow_blank=True, trim_whitespace=False)
    max_output_tokens = serializers.IntegerField(required=False, allow_null=True, min_value=1)
    tools = serializers.JSONField(required=False, allow_null=True)
    tool_choice = serializers.JSONField(required=False, allow_null=True)
    parallel_tool_calls = serializers.BooleanField(required=False, allow_null=True)
    text = serializers.JSONField(required=False, allow_null=True, help_text='{"format": {"type": "json_schema", ...}}')
    previous_response_id = serializers.RegexField(r"^resp_[A-Za-z0-9_]{1,80}$", required=False, allow_null=True)
    store = serializers.BooleanField(required=False, default=True,
                                     help_text="Store the response (with a character) so that it can be retrieved "
                                               "and continued.")
    metadata = MetadataField(required=False, allow_null=True, child=serializers.CharField(max_length=512),
                             help_text=f"Up to {MAX_METADATA_PAIRS} pairs, keys of up to {MAX_METADATA_KEY} "
                                       "characters, values of up to 512 (OpenAI's limits); echoed in the response.")
    background = serializers.BooleanField(required=False, allow_null=True)
    character = serializers.SlugField(required=False, allow_null=True, help_text="A character's slug (extension).")
    character_id = serializers.CharField(required=False, allow_null=True)

    def validate(self, attrs):
        attrs = super().validate(attrs)
        if attrs.get("background"):
            raise serializers.ValidationError({"background": "background responses are not supported; use "
                                                             "/v1/chat/completions with background: true."})
        if attrs.get("max_output_tokens") is not None:
            attrs["max_tokens"] = attrs["max_output_tokens"]
            attrs = super().validate(attrs)  # the server's max_tokens cap
        try:
            messages = input_messages(attrs["input"], continuing=bool(attrs.get("previous_response_id")))
            tools = chat_tools(attrs.get("tools"))
            tool_choice = chat_tool_choice(attrs.get("tool_choice"))
            tool_request_from(tools=tools, tool_choice=tool_choice, parallel_tool_calls=attrs.get("parallel_tool_calls"))
            for index, message in enumerate(messages):
                tool_message_check(message, f"input[{index}]")
            response_format = chat_response_format(attrs.get("text"))
        except ApiError as error:
            raise serializers.ValidationError({error.param or "input": error.message}) from None
        if attrs.get("instructions"):
            # Policy (docs/API.md): a character's system prompt is not replaced or extended by a client; a stored
            # conversation (previous_response_id) always has a character. Refused rather than dropped unseen.
            if any(attrs.get(field) for field in ("character", "character_id", "previous_response_id")):
                raise serializers.ValidationError({"instructions": "instructions cannot be combined with a character "
                                                   "(or a previous_response_id, which continues one): the "
                                                   "character's system prompt applies."})
            messages = [{"role": "system", "content": attrs["instructions"]}, *messages]
        if attrs.get("character") and attrs.get("character_id"):
            raise serializers.ValidationError({"character_id": "send either 'character' or 'character_id'."})
        chat = {key: attrs[key] for key in ("model", "temperature", "top_p", "top_k", "seed", "stop", "user",
                                            "max_tokens", "logit_bias", "parallel_tool_calls", "character",
                                            "character_id", "previous_response_id", "presence_penalty",
                                            "frequency_penalty", "repetition_penalty")
                if attrs.get(key) is not None}
        return {**chat, "messages": messages, "tools": tools, "tool_choice": tool_choice,
                "response_format": response_format, "store": attrs["store"], "stream": attrs.get("stream", False),
                "echo": {"instructions": attrs.get("instructions"), "metadata": attrs.get("metadata") or {},
                         "max_output_tokens": attrs.get("max_output_tokens"), "tools": attrs.get("tools") or [],
                         "tool_choice": attrs.get("tool_choice") or "auto", "text": attrs.get("text"),
                         "temperature": attrs.get("temperature"), "top_p": attrs.get("top_p"),
                         "parallel_tool_calls": attrs.get("parallel_tool_calls") is not False,
                         "store": attrs["store"], "user": attrs.get("user")}}


def _text_of(content, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for index, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in TEXT_PART_TYPES or \
                    not isinstance(part.get("text"), str):
                raise ApiError(f"{where}[{index}]: only text parts (input_text, output_text) are supported.",
                               param=f"{where}[{index}]")
            texts.append(part["text"])
        return "\n".join(texts)
    raise ApiError(f"{where} must be a string or a list of text parts.", param=where)


def input_messages(items, *, continuing: bool) -> list[dict]:
    """Chat messages of a Responses `input`: messages, function calls (assistant tool_calls) and their outputs
    (tool messages). The last item must be a user message or a function call's output."""
    if isinstance(items, str):
        items = [{"role": "user", "content": items}]
    if not isinstance(items, list) or not items:
        raise ApiError("input must be a string or a non-empty list of input items.", param="input")
    if len(items) > settings.API_MAX_MESSAGES:
        raise ApiError(f"at most {settings.API_MAX_MESSAGES} input items are accepted per request.", param="input")
    messages: list[dict] = []
    for index, item in enumerate(items):
        where = f"input[{index}]"
        kind = item.get("type", "message") if isinstance(item, dict) else None
        if kind == "message":
            if item.get("role") not in INPUT_ROLES:
                raise ApiError(f"{where}.role must be one of {', '.join(INPUT_ROLES)}.", param=f"{where}.role")
            messages.append({"role": item["role"], "content": _text_of(item.get("content"), f"{where}.content")})
        elif kind == "function_call":
            call = {"id": item.get("call_id"), "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments", "")}}
            if not isinstance(call["id"], str) or not call["id"]:
                raise ApiError(f"{where}.call_id is required.", param=f"{where}.call_id")
            if messages and messages[-1]["role"] == "assistant" and messages[-1].get("tool_calls"):
                messages[-1]["tool_calls"].append(call)  # consecutive calls: one assistant turn
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "tool_call_id": item.get("call_id"),
                             "content": output if isinstance(output, str) else _text_of(output, f"{where}.output")})
        else:
            raise ApiError(f"{where}: input items of type {str(kind)[:40]!r} are not supported (message, "
                           "function_call, function_call_output).", param=f"{where}.type")
    last = messages[-1]
    if last["role"] not in ("user", "tool") or (last["role"] == "user" and not last["content"].strip()):
        raise ApiError("the last input item must be a non-empty user message or a function_call_output.",
                       param="input")
    if not continuing and not any(message["role"] == "user" for message in messages):
        raise ApiError("input must include a user message.", param="input")
    if continuing and not _is_new_turn(messages):
        # The stored conversation is the history: an item before the new turn would be dropped unseen.
        raise ApiError("with previous_response_id, input must be the function_call_output items answering the "
                       "previous response's calls, or one user message: the stored conversation holds the rest.",
                       param="input")
    return messages


def _is_new_turn(messages: list[dict]) -> bool:
    """Whether a continuation's input is one turn: tool outputs (stored together as one turn) or one user message.
    System and developer messages follow the character policy (chat/plans.py), they are not turns."""
    turns = [message for message in messages if message["role"] not in ("system", "developer")]
    return all(message["role"] == "tool" for message in turns) or (len(turns) == 1 and turns[0]["role"] == "user")


def chat_tools(tools) -> list | None:
    """Responses function tools ({"type": "function", "name", "parameters", ...}) in the chat shape."""
    if tools is None or tools == []:
        return None
    if not isinstance(tools, list):
        raise ApiError("tools must be a list of function tools.", param="tools")
    converted = []
    for index, tool in enumerate(tools):
        if not isinstance(tool, dict) or tool.get("type") != "function":
            raise ApiError(f"tools[{index}]: only function tools are supported.", param=f"tools[{index}].type")
        function = {key: tool[key] for key in ("name", "description", "parameters") if tool.get(key) is not None}
        converted.append({"type": "function", "function": function})
    return converted


def chat_tool_choice(choice):
    if isinstance(choice, dict) and choice.get("type") == "function":
        return {"type": "function", "function": {"name": choice.get("name")}}
    return choice


def chat_response_format(text) -> dict | None:
    """text.format in chat's response_format shape."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise ApiError('text must be an object, e.g. {"format": {"type": "json_schema", ...}}.', param="text")
    form = text.get("format")
    if form is None:
        return None
    kind = form.get("type") if isinstance(form, dict) else None
    if kind in ("text", "json_object"):
        return {"type": kind}
    if kind == "json_schema":
        if not isinstance(form.get("schema"), dict):
            raise ApiError("text.format.schema must be a JSON Schema object.", param="text.format.schema")
        return {"type": "json_schema", "json_schema": {"name": form.get("name", ""), "schema": form["schema"]}}
    raise ApiError("text.format.type must be text, json_object or json_schema.", param="text.format.type")


class ResponsesView(GeneratingView):
    """Create a response (OpenAI's Responses API), optionally streamed as its typed server-sent events."""

    @extend_schema(request=ResponseRequestSerializer, responses={
        200: OpenApiResponse(ResponseObjectSerializer, description="A response object; with stream=true, "
                             "text/event-stream of response.* events ending in response.completed (or "
                             "response.incomplete), whose `response` is this object."),
        **ERRORS})
    def post(self, request):
        serializer = ResponseRequestSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        data = dict(serializer.validated_data)
        echo = data.pop("echo")
        started = response_create(user=request.user, api_key=api_key_of(request), data=data,
                                  cache_allowed="no-cache" not in request.headers.get("Cache-Control", ""))
        if started.generation is not None:
            return reply_stream_response(started.record, response_events(started=started, echo=echo))
        return logged(Response(response_body(started=started, echo=echo)), started.record)


class ResponseDetailView(APIView):
    """A stored response of the caller: GET it, or DELETE it (with the later exchanges of its conversation)."""

    @extend_schema(responses={200: ResponseObjectSerializer, 404: ERRORS[404]})
    def get(self, request, response_id):
        return Response(stored_response_body(response_get(user=request.user, response_id=response_id)))

    @extend_schema(responses={200: ResponseDeletedSerializer, 404: ERRORS[404]})
    def delete(self, request, response_id):
        response_delete(user=request.user, response_id=response_id)
        return Response({"id": response_id, "object": "response", "deleted": True})
