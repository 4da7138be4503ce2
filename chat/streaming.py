"""Streaming a reply to a client, for server-sent events (HTTP) and WebSocket alike.

Runs on the ASGI event loop (no thread per stream). A client that disconnects cancels the
consuming task; `reply_stream` then cancels the generation so the scheduler frees its sequence,
and nothing is stored as a complete reply.
"""

from __future__ import annotations

import asyncio
import json
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

from .errors import error_from_exception
from .response_cache import MISS, ReplayedGeneration, cached_completion, remember_completion
from .services import ChatPlan, GenerationTiming, chat_exchange_store, scenarios_used, usage_of
from .tool_calls import ToolCallReader, tool_finish_reason

logger = logging.getLogger("llmsite.api")


def generation_for(plan: ChatPlan):
    """A cached reply replayed, or a live generation submitted to the engine (sync: reads the cache)."""
    cached = cached_completion(plan)
    if cached is not None:
        return ReplayedGeneration(cached)
    plan.timing = GenerationTiming()
    return plan.engine.submit(plan.prompt.text, plan.params)


async def deltas_with_keepalive(generation, interval: float):
    """Yield text deltas, or None when nothing arrived for `interval` seconds (time for a keep-alive)."""
    iterator = generation.__aiter__()
    pending = asyncio.ensure_future(iterator.__anext__())
    try:
        while True:
            done, _ = await asyncio.wait({pending}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                delta = pending.result()
            except StopAsyncIteration:
                return
            yield delta
            pending = asyncio.ensure_future(iterator.__anext__())
    finally:
        if not pending.done():
            pending.cancel()


async def reply_stream(plan: ChatPlan, generation, *, keepalive: float | None = None):
    """Yield ("delta", text), ("keepalive", None), then ("end", (completion, conversation)) once stored."""
    finished = False
    try:
        async for delta in deltas_with_keepalive(generation, keepalive or settings.SSE_KEEPALIVE_SECONDS):
            if delta is None:
                yield "keepalive", None
            elif delta:
                if plan.timing is not None:
                    plan.timing.saw_text()
                yield "delta", delta
        completion = plan.completion = generation.result
        finished = True
        if plan.timing is not None:
            plan.timing.finish(model=plan.model_name, completion=completion)
        if plan.cache_status == MISS:
            await sync_to_async(remember_completion)(plan, completion)
        conversation = await sync_to_async(chat_exchange_store)(plan=plan, completion=completion)
        yield "end", (completion, conversation)
    except asyncio.CancelledError:
        logger.info("client went away; generation %s cancelled", generation.id)
        raise
    finally:
        if not finished:
            generation.cancel()


def end_fields(plan: ChatPlan, completion, conversation) -> dict:
    return {"finish_reason": completion.finish_reason, "usage": usage_of(completion),
            "scenarios": scenarios_used(plan), "conversation": str(conversation.pk) if conversation else None}


# --- Server-sent events ---------------------------------------------------------------------------


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def chat_completion_events(*, plan: ChatPlan, generation, include_usage: bool):
    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        return {"id": plan.completion_id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}

    # A reply that may call tools is read as it streams: tool_calls deltas instead of its raw text.
    tool_reader = ToolCallReader() if plan.tools is not None and plan.tools.may_call else None
    yield sse(chunk({"role": "assistant", "content": ""}))
    try:
        async for kind, value in reply_stream(plan, generation):
            if kind == "keepalive":
                yield b": keep-alive\n\n"
            elif kind == "delta":
                for delta in tool_reader.feed(value) if tool_reader else [{"content": value}]:
                    yield sse(chunk(delta))
            else:
                completion, conversation = value
                end = end_fields(plan, completion, conversation)
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
