"""Streaming a reply to a client, for server-sent events (HTTP) and WebSocket alike.

Runs on the ASGI event loop (no thread per stream). A client that disconnects cancels the
consuming task; `reply_stream` then cancels the generation so the scheduler frees its sequence,
and nothing is stored as a complete reply.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from asgiref.sync import sync_to_async
from django.conf import settings

from .errors import error_from_exception
from .inference import get_engine
from .logprobs import LegacyLogprobs, chat_logprobs
from .response_cache import MISS, ReplayedGeneration, cached_completion, remember_completion
from .services import ChatPlan, GenerationTiming, chat_exchange_store, sampling_params_for, scenarios_used, usage_of
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
    def chunk(delta: dict, finish_reason=None, logprobs=None, **extra) -> dict:
        return {"id": plan.completion_id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model_name, "system_fingerprint": None,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": logprobs}],
                **extra}

    # Logprobs ride with the text that completes their tokens (never from the cache: those requests bypass it).
    with_logprobs = plan.params.logprobs is not None

    # A reply that may call tools is read as it streams: tool_calls deltas instead of its raw text.
    tool_reader = ToolCallReader() if plan.tools is not None and plan.tools.may_call else None
    yield sse(chunk({"role": "assistant", "content": ""}))
    try:
        async for kind, value in reply_stream(plan, generation):
            if kind == "keepalive":
                yield b": keep-alive\n\n"
            elif kind == "delta":
                if with_logprobs:  # never with tools that may be called (refused)
                    yield sse(chunk({"content": value}, logprobs=chat_logprobs(generation.take_logprobs())))
                    continue
                for delta in tool_reader.feed(value) if tool_reader else [{"content": value}]:
                    yield sse(chunk(delta))
            else:
                completion, conversation = value
                end = end_fields(plan, completion, conversation)
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


# --- /v1/completions ------------------------------------------------------------------------------


def text_generation_start(*, data: dict):
    """(engine, generation) for a plain text completion; raises before anything streams (sync)."""
    engine = get_engine(data.get("model") or None)
    params = sampling_params_for(data=data, character=None, engine=engine, legacy=True)
    return engine, engine.submit(data["prompt"], params)


async def text_completion_events(*, engine, generation, include_usage: bool, with_logprobs: bool = False):
    """OpenAI's streamed text_completion objects, then the usage chunk if asked for, then [DONE]."""
    completion_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    legacy = LegacyLogprobs() if with_logprobs else None

    def chunk(text: str, finish_reason=None) -> dict:
        logprobs = legacy.shape(generation.take_logprobs()) if legacy is not None else None
        return {"id": completion_id, "object": "text_completion", "created": created, "model": engine.spec.name,
                "choices": [{"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": logprobs}]}

    finished = False
    try:
        async for delta in deltas_with_keepalive(generation, settings.SSE_KEEPALIVE_SECONDS):
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
