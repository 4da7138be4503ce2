"""The use cases the surfaces call: one function per API view (the WebSocket's and the conversation tree's are in
chat/trees/operations.py).

Each takes validated request data and returns what the surface shapes into its reply; the steps
live in chat/plans.py (decide), chat/replies.py (produce and store) and chat/jobs.py (background).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .engine import Completion

from .engines import get_engine
from .jobs import job_submit
from .models import ApiKey, Job
from .plans import chat_request_prepare, sampling_params_for
from .replies import LegacyLogprobs, ReplyRecord, completion_body, reply_complete, reply_lookup, reply_start, usage_of
from .response_cache import HIT, cached_request, request_cache_key
from .tenancy.metering import MeteredGeneration, meter_open
from .tenancy.owners import Tenant
from .tenancy.quotas import quota_check_tokens
from .tooling.requests import tool_request_of


@dataclass(frozen=True)
class ChatCompletionStarted:
    """What a chat completion request became: a finished `body` (from the cache or generated), a queued
    `job`, or a `generation` to stream. `record` (None for the request-level cache) feeds the request log."""

    record: ReplyRecord | None = None
    body: dict | None = None
    job: Job | None = None
    generation: object | None = None

    @property
    def cache_status(self) -> str:
        return self.record.cache_status if self.record is not None else HIT


def chat_completion_create(*, user, api_key: ApiKey | None, data: dict, payload: dict,
                           cache_allowed: bool) -> ChatCompletionStarted:
    """POST /v1/chat/completions. `payload` is the request as sent: a background job keeps it to run later."""
    # Background only when asked for (never inferred from max_tokens): the client then expects a job.
    background = data.get("background", False)
    request_key = None
    if not (data.get("stream") or background):
        body, request_key = chat_completion_from_cache(data=data, cache_allowed=cache_allowed, user=user)
        if body is not None:
            return ChatCompletionStarted(body=body)
    # Prepared even for a job: a request that cannot run is refused now, not reported failed later.
    plan = chat_request_prepare(user=user, data=data, cache_allowed=cache_allowed, request_key=request_key)
    tenant = Tenant(user=user, api_key=api_key)
    if background:
        plan.release_conversation()  # the worker takes the conversation's lease when it runs the job
        quota_check_tokens(tenant)  # the worker meters the job when it runs; its budgets are checked now
        job = job_submit(user=user, api_key=api_key, payload=payload)
        job.refresh_from_db()  # inline mode (no broker) has already run it
        return ChatCompletionStarted(record=ReplyRecord(plan, tenant=tenant), job=job)
    record = reply_lookup(plan, tenant=tenant)
    if data.get("stream"):
        return ChatCompletionStarted(record=record, generation=reply_start(record))
    return ChatCompletionStarted(record=record, body=reply_complete(record))


def chat_completion_from_cache(*, data: dict, cache_allowed: bool, user) -> tuple[dict | None, str | None]:
    """(body, key): the stored reply of an identical stateless deterministic request of the same
    caller, before any prompt work; key is where the slow path should remember its reply (None when
    the request does not qualify)."""
    key = request_cache_key(data, allowed=cache_allowed, user=user)
    stored = cached_request(key)
    if stored is None:
        return None, key
    body = completion_body(completion_id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()),
                           model=stored["model"], completion=Completion(**stored["completion"]),
                           scenarios=stored["scenarios"], conversation_id=None,
                           shorthand=data.get("shorthand", False), tools=tool_request_of(data))
    return body, key


def text_completion_run(*, user, api_key: ApiKey | None, data: dict) -> dict:
    """POST /v1/completions: plain text continuation of `prompt`, no character or template."""
    engine, generation = text_generation_start(user=user, api_key=api_key, data=data)
    for _ in generation:
        pass
    completion = generation.result
    logprobs = LegacyLogprobs().shape(completion.logprobs) if completion.logprobs is not None else None
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": engine.spec.name,
        "choices": [{"index": 0, "text": completion.text, "finish_reason": completion.finish_reason,
                     "logprobs": logprobs}],
        "usage": usage_of(completion),
    }


def text_generation_start(*, user, api_key: ApiKey | None, data: dict):
    """(engine, generation) for a plain text completion, admitted under the caller's quotas and metered;
    raises before anything streams (sync)."""
    engine = get_engine(data.get("model") or None)
    params = sampling_params_for(data=data, character=None, engine=engine, legacy=True)
    tenant = Tenant(user=user, api_key=api_key)
    meter = meter_open(tenant=tenant, model=engine.spec.name)
    try:
        generation = engine.submit(data["prompt"], params, owner=tenant.owner)
    except BaseException:
        meter.abandon()
        raise
    return engine, MeteredGeneration(generation, meter, count_tokens=engine.count_tokens)
