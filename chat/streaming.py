"""Server-sent events for streamed chat completions, served by the ASGI event loop (no thread per stream).

A client that disconnects cancels the stream's task; the `finally` cancels the generation so
the scheduler frees its sequence, and nothing is stored as a complete reply.
"""

from __future__ import annotations

import asyncio
import json
import logging

from asgiref.sync import sync_to_async
from django.conf import settings

from .errors import error_from_exception
from .response_cache import MISS, remember_completion
from .services import ChatPlan, chat_exchange_store, scenarios_used, usage_of

logger = logging.getLogger("llmsite.api")


def sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


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


async def chat_completion_events(*, plan: ChatPlan, generation, include_usage: bool):
    def chunk(delta: dict, finish_reason=None, **extra) -> dict:
        return {"id": plan.completion_id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}], **extra}

    finished = False
    try:
        yield sse(chunk({"role": "assistant", "content": ""}))
        async for delta in deltas_with_keepalive(generation, settings.SSE_KEEPALIVE_SECONDS):
            if delta is None:
                yield b": keep-alive\n\n"
            elif delta:
                yield sse(chunk({"content": delta}))
        completion = generation.result
        finished = True
        if plan.cache_status == MISS:
            await sync_to_async(remember_completion)(plan, completion)
        conversation = await sync_to_async(chat_exchange_store)(plan=plan, completion=completion)
        yield sse(chunk({}, completion.finish_reason, scenarios=scenarios_used(plan),
                        conversation=str(conversation.pk) if conversation else None))
        if include_usage:
            usage_chunk = chunk({})
            usage_chunk["choices"] = []
            usage_chunk["usage"] = usage_of(completion)
            yield sse(usage_chunk)
    except asyncio.CancelledError:
        logger.info("client disconnected; generation %s cancelled", generation.id)
        raise
    except Exception as exc:  # engine errors keep their message; anything else is logged, answered generically
        finished = True
        _, body, _ = error_from_exception(exc)
        yield sse(body)
    finally:
        if not finished:
            generation.cancel()
    yield sse("[DONE]")
