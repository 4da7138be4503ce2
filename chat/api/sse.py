"""Server-sent events: a streamed reply as OpenAI's chunk objects, ending in `data: [DONE]`.

Runs on the ASGI event loop (no thread per stream); a client that disconnects cancels the
consuming task, which cancels the generation (chat/replies.py).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from django.conf import settings
from django.http import StreamingHttpResponse

from chat.errors import error_from_exception
from chat.replies import LegacyLogprobs, ReplyRecord, chat_logprobs, deltas_for_client, end_fields, reply_stream, usage_of
from chat.tooling.calls import ToolCallReader, tool_finish_reason

logger = logging.getLogger("llmsite.api")


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


class ContentChunks:
    """One stream's content chunks, pre-encoded: the JSON around the text is built once, not per token.
    `template` is the chunk with `MARK` as the text; the bytes equal those of sse(chunk) for any text."""

    MARK = "\x00text"

    def __init__(self, template: dict):
        encoded = json.dumps(template, ensure_ascii=False)
        marker = json.dumps(self.MARK, ensure_ascii=False)
        head, tail = encoded.split(marker)
        self._head, self._tail = f"data: {head}", f"{tail}\n\n"

    def __call__(self, text: str) -> bytes:
        return (self._head + json.dumps(text, ensure_ascii=False) + self._tail).encode()


def sse_response(events) -> StreamingHttpResponse:
    response = StreamingHttpResponse(events, content_type="text/event-stream")
    response["Cache-Control"] = "no-cache"
    response["X-Accel-Buffering"] = "no"  # nginx: pass events through as they come
    return response


async def chat_completion_events(*, record: ReplyRecord, generation, include_usage: bool):
    plan = record.plan

    def chunk(delta: dict, finish_reason=None, logprobs=None, **extra) -> dict:
        return {"id": plan.completion_id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
                **extra}

    # Logprobs ride with the text that completes their tokens (never from the cache: those requests bypass it).
    with_logprobs = plan.params.logprobs is not None

    # A reply that may call tools is read as it streams: tool_calls deltas instead of its raw text.
    tool_reader = ToolCallReader() if plan.tools is not None and plan.tools.may_call else None
    content_chunk = ContentChunks(chunk({"content": ContentChunks.MARK}))
    yield sse(chunk({"role": "assistant", "content": ""}))
    try:
        async for kind, value in reply_stream(record, generation):
            if kind == "keepalive":
                yield b": keep-alive\n\n"
            elif kind == "delta":
                if with_logprobs:  # never with tools that may be called (refused)
                    yield sse(chunk({"content": value}, logprobs=chat_logprobs(generation.take_logprobs())))
                    continue
                if tool_reader is None:
                    yield content_chunk(value)
                    continue
                for delta in tool_reader.feed(value):
                    yield sse(chunk(delta))
            else:
                end = end_fields(record)
                leftover = generation.take_logprobs() if with_logprobs else []
                if leftover:  # tokens of a stop string's cut, or of no text at all
                    yield sse(chunk({"content": ""}, logprobs=chat_logprobs(leftover)))
                if tool_reader:
                    for delta in tool_reader.finish():
                        yield sse(chunk(delta))
                    end["finish_reason"] = tool_finish_reason(end["finish_reason"], bool(tool_reader.calls))
                yield sse(chunk({}, end["finish_reason"], scenarios=end["scenarios"],
                                conversation=end["conversation"]))
                if include_usage:
                    yield sse({**chunk({}), "choices": [], "usage": end["usage"]})
    except Exception as exc:  # engine errors keep their message; anything else is logged, answered generically
        _, body, _ = error_from_exception(exc)
        yield sse(body)
    yield sse("[DONE]")


async def text_completion_events(*, engine, generation, include_usage: bool, with_logprobs: bool = False,
                                 echo: str = ""):
    """OpenAI's streamed text_completion objects (the first is `echo`, the prompt, when asked for), then the usage
    chunk if asked for, then [DONE]."""
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    legacy = LegacyLogprobs() if with_logprobs else None

    def chunk(text: str, finish_reason=None) -> dict:
        logprobs = legacy.shape(generation.take_logprobs()) if legacy is not None else None
        return {"id": completion_id, "object": "text_completion", "created": created, "model": engine.spec.name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}

    finished = False
    if echo:
        yield sse(chunk(echo))
    try:
        async for delta in deltas_for_client(generation, settings.SSE_KEEPALIVE_SECONDS):
            if delta is None:
                yield b": keep-alive\n\n"
            elif delta:
                yield sse(chunk(delta))
        finished = True
        completion = generation.result
        yield sse(chunk("", completion.finish_reason))  # carries the logprobs of a stop string's cut, if any
        if include_usage:
            yield sse({**chunk(""), "choices": [], "usage": usage_of(completion)})
    except asyncio.CancelledError:
        logger.info("client went away; text generation %s cancelled", generation.id)
        raise
    except Exception as exc:  # as for chat streams: an error event in the one shape, then [DONE]
        _, body, _ = error_from_exception(exc)
        yield sse(body)
    finally:
        if not finished:
            generation.cancel()
    yield sse("[DONE]")
