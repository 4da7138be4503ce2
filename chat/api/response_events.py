"""The Responses API's shapes: the response object (created, streamed or retrieved) and its typed stream events,
as the openai SDK parses them (openai/types/responses/): response.created, response.in_progress,
response.output_item.added, response.content_part.added, response.output_text.delta / .done,
response.function_call_arguments.delta / .done, response.output_item.done, then response.completed (or
response.incomplete when max_output_tokens cut the reply); an error is an `error` event."""

from __future__ import annotations

import json

from chat.errors import error_from_exception
from chat.replies import reply_stream
from chat.services import ResponseStarted, StoredResponse, response_call_id
from chat.tooling.calls import ToolCallReader, tool_reply


def _usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    return {"input_tokens": prompt_tokens, "input_tokens_details": {"cached_tokens": cached, "cache_write_tokens": 0},
            "output_tokens": completion_tokens, "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": prompt_tokens + completion_tokens}


def _message_item(response_id: str, text: str, status: str) -> dict:
    content = [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}] if text is not None else []
    return {"type": "message", "id": f"msg_{response_id.removeprefix('resp_')}", "role": "assistant",
            "status": status, "content": content}


def _call_item(response_id: str, index: int, name: str, arguments: str, status: str) -> dict:
    return {"type": "function_call", "id": f"fc_{response_id.removeprefix('resp_')}_{index}",
            "call_id": response_call_id(response_id, index), "name": name, "arguments": arguments, "status": status}


def output_items(response_id: str, text: str, *, read_calls: bool, status: str = "completed") -> list[dict]:
    """The output of a finished reply: its text as a message, its tool calls as function_call items."""
    content, calls = tool_reply(text) if read_calls else (text, [])
    items = [_message_item(response_id, content, status)] if content or not calls else []
    items += [_call_item(response_id, index, call["function"]["name"], call["function"]["arguments"], "completed")
              for index, call in enumerate(calls)]
    return items


def _response(*, response_id: str, created_at: int, model: str, status: str, output: list, usage: dict | None,
              previous_response_id: str | None, conversation_id, echo: dict) -> dict:
    return {
        "id": response_id, "object": "response", "created_at": created_at, "status": status,
        "model": model, "output": output, "usage": usage, "error": None,
        "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
        "previous_response_id": previous_response_id,
        "conversation": {"id": str(conversation_id)} if conversation_id else None,
        "instructions": echo.get("instructions"), "metadata": echo.get("metadata") or {},
        "max_output_tokens": echo.get("max_output_tokens"), "parallel_tool_calls": echo.get("parallel_tool_calls", True),
        "temperature": echo.get("temperature"), "top_p": echo.get("top_p"), "tools": echo.get("tools") or [],
        "tool_choice": echo.get("tool_choice") or "auto", "store": echo.get("store", True),
        "text": echo.get("text") or {"format": {"type": "text"}}, "truncation": "disabled", "user": echo.get("user"),
        "background": False, "reasoning": None,
    }


def _status_of(finish_reason: str) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


def response_body(*, started: ResponseStarted, echo: dict, output: list | None = None) -> dict:
    """The response object of a finished reply (the non-streamed answer, and the completed event's)."""
    record = started.record
    completion, plan = record.completion, record.plan
    stored = record.conversation is not None and plan.store
    status = _status_of(completion.finish_reason)
    if output is None:
        output = output_items(started.response_id, completion.text, status=status,
                              read_calls=plan.tools is not None and plan.tools.may_call)
    return _response(response_id=started.response_id, created_at=started.created_at, model=plan.model_name,
                     status=status, output=output,
                     usage=_usage(completion.prompt_tokens, completion.completion_tokens,
                                  completion.cached_prompt_tokens),
                     previous_response_id=started.previous_response_id,
                     conversation_id=record.conversation.pk if stored else None, echo={**echo, "store": stored})


def stored_response_body(stored: StoredResponse) -> dict:
    """A retrieved response, rebuilt from its stored reply (the request's tools and settings are not kept)."""
    message = stored.message
    status = _status_of(message.finish_reason)
    return _response(response_id=stored.response_id, created_at=int(message.created_at.timestamp()),
                     model=message.model_name, status=status,
                     output=output_items(stored.response_id, message.content, read_calls=True, status=status),
                     usage=_usage(message.prompt_tokens or 0, message.completion_tokens or 0),
                     previous_response_id=stored.previous_response_id, conversation_id=message.conversation_id,
                     echo={"store": True})


def _event(payload: dict) -> bytes:
    return f"event: {payload['type']}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n".encode()


class _EventWriter:
    """Numbers the events and tracks the open output item (a message, or a function call) of a streamed reply."""

    def __init__(self, response_id: str):
        self.response_id = response_id
        self.sequence = 0
        self.output: list[dict] = []  # finished items
        self.open: dict | None = None  # the item being written
        self._pieces: list[str] = []  # its text or arguments so far, joined when it closes (not copied per token)
        self.calls = 0

    def event(self, type: str, **fields) -> bytes:
        payload = {"type": type, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return _event(payload)

    def text(self, delta: str) -> list[bytes]:
        events = []
        if self.open is None or self.open["type"] != "message":
            events += self.close()
            self.open = _message_item(self.response_id, None, "in_progress")
            events.append(self.event("response.output_item.added", output_index=len(self.output), item=self.open))
            events.append(self.event("response.content_part.added", item_id=self.open["id"],
                                     output_index=len(self.output), content_index=0,
                                     part={"type": "output_text", "text": "", "annotations": [], "logprobs": []}))
            self._pieces = []
        self._pieces.append(delta)
        events.append(self.event("response.output_text.delta", item_id=self.open["id"], output_index=len(self.output),
                                 content_index=0, delta=delta, logprobs=[]))
        return events

    def call_start(self, name: str) -> list[bytes]:
        events = self.close()
        self.open = _call_item(self.response_id, self.calls, name, "", "in_progress")
        self._pieces = []
        self.calls += 1
        events.append(self.event("response.output_item.added", output_index=len(self.output), item=self.open))
        return events

    def call_arguments(self, fragment: str) -> list[bytes]:
        self._pieces.append(fragment)
        return [self.event("response.function_call_arguments.delta", item_id=self.open["id"],
                           output_index=len(self.output), delta=fragment)]

    def close(self, status: str = "completed") -> list[bytes]:
        """End the open item: its done events; it joins the output."""
        item, self.open = self.open, None
        if item is None:
            return []
        index, events = len(self.output), []
        written = "".join(self._pieces)
        if item["type"] == "message":
            item.pop("text", None)
            text = written
            part = {"type": "output_text", "text": text, "annotations": [], "logprobs": []}
            events.append(self.event("response.output_text.done", item_id=item["id"], output_index=index,
                                     content_index=0, text=text, logprobs=[]))
            events.append(self.event("response.content_part.done", item_id=item["id"], output_index=index,
                                     content_index=0, part=part))
            item = {**item, "status": status, "content": [part]}
        else:
            events.append(self.event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                                     name=item["name"], arguments=written))
            item = {**item, "arguments": written, "status": "completed"}
        events.append(self.event("response.output_item.done", output_index=index, item=item))
        self.output.append(item)
        return events


async def response_events(*, started: ResponseStarted, echo: dict):
    """The typed events of a streamed response (runs on the event loop, like chat/api/sse.py's streams)."""
    record, writer = started.record, _EventWriter(started.response_id)
    plan = record.plan
    reader = ToolCallReader() if plan.tools is not None and plan.tools.may_call else None
    pending = _response(response_id=started.response_id, created_at=started.created_at, model=plan.model_name,
                        status="in_progress", output=[], usage=None, previous_response_id=started.previous_response_id,
                        conversation_id=None, echo=echo)
    yield writer.event("response.created", response=pending)
    yield writer.event("response.in_progress", response=pending)
    try:
        async for kind, value in reply_stream(record, started.generation):
            if kind == "keepalive":
                yield b": keep-alive\n\n"
            elif kind == "delta":
                for event in _deltas(writer, reader.feed(value) if reader else [{"content": value}]):
                    yield event
            else:
                for event in _deltas(writer, reader.finish() if reader else []):
                    yield event
                status = _status_of(record.completion.finish_reason)
                for event in writer.close(status):
                    yield event
                body = response_body(started=started, echo=echo, output=writer.output)
                yield writer.event("response.incomplete" if status == "incomplete" else "response.completed",
                                   response=body)
    except Exception as exc:  # engine errors keep their message; anything else is logged, answered generically
        _, body, _ = error_from_exception(exc)
        error = body["error"]
        yield writer.event("error", code=error["code"], message=error["message"], param=error["param"])


def _deltas(writer: _EventWriter, deltas: list[dict]):
    for delta in deltas:
        if "content" in delta:
            if delta["content"]:
                yield from writer.text(delta["content"])
            continue
        for call in delta["tool_calls"]:
            if "id" in call:
                yield from writer.call_start(call["function"]["name"])
            fragment = call.get("function", {}).get("arguments")
            if fragment:
                yield from writer.call_arguments(fragment)
