"""POST /v1/chat/completions with n > 1: the choices' chat.completion body, or their chunks streamed with each
choice's `index` (OpenAI's shapes); usage counts the prompt once and every choice's completion tokens."""

from __future__ import annotations

from contextlib import aclosing

from asgiref.sync import sync_to_async
from rest_framework.response import Response

from chat.errors import error_from_exception
from chat.replies import completion_body

from .sse import sse, sse_response


def choices_body(run) -> dict:
    record = run.record
    plan = record.plan
    bodies = [completion_body(completion_id=plan.completion_id, created=plan.created, model=plan.model_name,
                              completion=completion, scenarios=plan.prompt.scenarios_used,
                              conversation_id=str(record.conversation.pk) if record.conversation else None,
                              shorthand=False, tools=plan.tools)
              for completion in record.completions]
    body = bodies[0]
    body["choices"] = [{**other["choices"][0], "index": index} for index, other in enumerate(bodies)]
    body["usage"] = run.usage()
    return body


def choices_response(run, *, stream: bool, include_usage: bool):
    if not stream:
        run.wait()
        return Response(choices_body(run))
    return sse_response(_chunks(run, include_usage=include_usage))


async def _chunks(run, *, include_usage: bool):
    async with aclosing(_events_as_chunks(run, include_usage=include_usage)) as chunks:
        async for data in chunks:
            yield data
    yield sse("[DONE]")


async def _events_as_chunks(run, *, include_usage: bool):
    plan = run.record.plan

    def chunk(index: int, delta: dict, finish_reason=None, **extra) -> dict:
        return {"id": plan.completion_id, "object": "chat.completion.chunk", "created": plan.created,
                "model": plan.model_name, "system_fingerprint": None,
                "choices": [{"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}],
                **extra}

    async with aclosing(run.events()) as events:  # closed (this listener detached) however the stream ends
        async for event in events:
            if event[0] == "text":
                for index, text in enumerate(event[1]):
                    yield sse(chunk(index, {"role": "assistant", "content": text}))
            elif event[0] == "delta":
                yield sse(chunk(event[1], {"content": event[2]}))
            elif event[0] == "keepalive":
                yield b": keep-alive\n\n"
            elif event[0] == "error":
                yield sse(error_from_exception(event[1])[1])
            else:
                body = await sync_to_async(choices_body)(run)
                for choice in body["choices"]:
                    yield sse(chunk(choice["index"], {}, choice["finish_reason"], scenarios=body["scenarios"],
                                    conversation=body["conversation"]))
                if include_usage:
                    yield sse({**chunk(0, {}), "choices": [], "usage": body["usage"]})
