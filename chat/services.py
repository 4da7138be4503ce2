"""The use cases the surfaces call: one function per API view (the WebSocket's and the conversation tree's are in
chat/trees/operations.py).

Each takes validated request data and returns what the surface shapes into its reply; the steps
live in chat/plans.py (decide), chat/replies.py (produce and store) and chat/jobs.py (background).
"""

from __future__ import annotations

import dataclasses
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass

from .engine import Completion, InvalidRequest, ModelUnavailable, UnsupportedFeature

from .engines import get_engine
from .errors import ApiError
from .jobs import job_submit
from .models import ApiKey, Conversation, Job
from .plans import chat_request_prepare, sampling_params_for
from .replies import LegacyLogprobs, ReplyRecord, completion_body, reply_complete, reply_lookup, reply_start, usage_of
from .response_cache import HIT, cached_request, request_cache_key
from .selectors import newest_leaf_under, replies_count, response_id_of, response_message_get
from .tenancy.conversation_lock import conversation_leased
from .tenancy.metering import MeteredGeneration, meter_open
from .tenancy.owners import Tenant
from .tenancy.quotas import quota_admit_job, quota_precheck
from .tooling.calls import tool_reply
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
    tenant = Tenant(user=user, api_key=api_key, end_user=data.get("user") or "")
    quota_precheck(tenant, slots=data.get("n") or 1)  # a caller at its limit costs no prompt work
    # Prepared even for a job: a request that cannot run is refused now, not reported failed later.
    plan = chat_request_prepare(user=user, data=data, cache_allowed=cache_allowed, request_key=request_key)
    if background:
        plan.release_conversation()  # the worker takes the conversation's lease when it runs the job
        # Admitted now: its slots count from here (its Job row once committed), its tokens are reserved.
        job_id = uuid.uuid4()
        with quota_admit_job(tenant, job_id=job_id, slots=plan.choices,
                             tokens=plan.prompt.prompt_tokens + plan.params.max_tokens * plan.choices):
            job = job_submit(user=user, api_key=api_key, payload=payload, job_id=job_id)
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
    """POST /v1/completions: plain text continuation of each prompt (`prompts`), no character or template.
    Every prompt is submitted before any is read, so the engine decodes them as one batch; one choice each."""
    prompts = data.get("prompts") or [data["prompt"]]
    started = []
    choices, usage = [], {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
    with _cancelled_on_failure(started):
        for prompt in prompts:
            started.append(text_generation_start(user=user, api_key=api_key, data=data, prompt=prompt))
        for index, (prompt, (engine, generation)) in enumerate(zip(prompts, started)):
            for _ in generation:
                pass
            completion = generation.result
            logprobs = LegacyLogprobs().shape(completion.logprobs) if completion.logprobs is not None else None
            text = prompt + completion.text if data.get("echo") else completion.text
            choices.append({"index": index, "text": text, "finish_reason": completion.finish_reason,
                            "logprobs": logprobs})
            usage = {key: usage[key] + value for key, value in usage_of(completion).items() if key in usage}
    return {
        "id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
        "model": started[0][0].spec.name, "choices": choices, "usage": usage,
    }


@contextmanager
def _cancelled_on_failure(started: list):
    """Cancel every (engine, generation) of `started` when the block fails, whether starting the next prompt or
    reading one: the request is answered with the error, so nothing may go on decoding (and holding its quota
    slot) for it."""
    try:
        yield
    except BaseException:
        for _, generation in started:
            generation.cancel()
        raise


def text_generation_start(*, user, api_key: ApiKey | None, data: dict, prompt: str | None = None):
    """(engine, generation) for a plain text completion of `prompt` (default: the request's), admitted under the
    caller's quotas and metered; raises before anything streams (sync)."""
    engine = get_engine(data.get("model") or None)
    params = sampling_params_for(data=data, character=None, engine=engine, legacy=True)
    tenant = Tenant(user=user, api_key=api_key, end_user=data.get("user") or "")
    prompt = data["prompt"] if prompt is None else prompt
    meter = meter_open(tenant=tenant, model=engine.spec.name, prompt_tokens=engine.count_tokens(prompt),
                       max_tokens=params.max_tokens)
    try:
        generation = engine.submit(prompt, params, owner=tenant.owner)
    except BaseException:
        meter.abandon()
        raise
    return engine, MeteredGeneration(generation, meter, count_tokens=engine.count_tokens)


MAX_TOKEN_PIECES = 8192  # tokens /tokenize answers with their pieces


def text_tokenize(*, model: str | None, content: str, add_special: bool, parse_special: bool,
                  with_pieces: bool) -> dict:
    """POST /tokenize (llama-server's shape): the tokens of `content` for the model named or the default.
    `add_special` adds what the model puts before a prompt (BOS), so the count of a plain prompt equals the
    usage.prompt_tokens of /v1/completions; `parse_special` reads control-token texts as control tokens."""
    engine = get_engine(model or None)
    try:
        tokens = engine.tokenize(content, special=parse_special, exact=True)
    except ModelUnavailable:
        _tokens_are_the_models(engine)  # the plainer reason, where there is one (no tokenize endpoint)
        raise
    _tokens_are_the_models(engine)
    if add_special:
        prefix = engine.prompt_tokens("")  # BOS where the model wants one
        if tokens[:len(prefix)] != prefix:
            tokens = prefix + tokens
    if not with_pieces:
        return {"tokens": tokens}
    if len(tokens) > MAX_TOKEN_PIECES:  # a piece each is a detokenize call (an upstream request for a remote model)
        raise InvalidRequest(f"with_pieces answers at most {MAX_TOKEN_PIECES} tokens; this content has {len(tokens)}. "
                             "Ask for the ids alone, or tokenize it in parts.", param="with_pieces")
    pieces = {token: engine.detokenize([token]) for token in dict.fromkeys(tokens)}
    return {"tokens": [{"id": token, "piece": pieces[token]} for token in tokens]}


def _tokens_are_the_models(engine) -> None:
    """Refuse to answer a remote model's token ids when they are not its upstream's: without a tokenize endpoint
    (or with no upstream answering) the engine counts by an estimate whose ids are placeholders."""
    if engine.spec.backend != "openai_compatible":  # a local model's tokenizer is its own
        return
    counted_by = engine.stats()["tokenizer"]  # the upstream's tokenize dialect (chat/engine/remote.py)
    if counted_by == "estimate":
        raise UnsupportedFeature(f"Model {engine.spec.name!r}: its upstream server offers no tokenize endpoint, so "
                                 "this server cannot tell its token ids.")
    if counted_by == "unknown":
        raise ModelUnavailable(engine.spec.name, "upstream pool", "no upstream server answered the tokenize request.")


def tokens_detokenize(*, model: str | None, tokens: list[int]) -> dict:
    """POST /detokenize (llama-server's shape): the text of `tokens`."""
    return {"content": get_engine(model or None).detokenize(tokens)}


# --- The Responses API: a reply of the chat pipeline, stored as a conversation's n-th reply ----------


@dataclass(frozen=True)
class ResponseStarted:
    """A Responses API request as it began: its id (stored: "resp_<conversation hex>_<n>", else a random one that
    retrieve never finds), its record, and a `generation` to stream (None once the reply is complete)."""

    response_id: str
    record: ReplyRecord
    created_at: int
    previous_response_id: str | None = None
    generation: object | None = None


def response_create(*, user, api_key: ApiKey | None, data: dict, cache_allowed: bool) -> ResponseStarted:
    """POST /v1/responses. `data` is a chat request (chat/api/responses.py translates the Responses shapes) plus
    `previous_response_id`: the stored conversation it continues; `store: false` stores nothing."""
    data = dict(data)
    previous_id = data.pop("previous_response_id", None)
    previous = None
    if previous_id:
        previous, _ = response_message_get(user=user, response_id=previous_id, param="previous_response_id")
        data["conversation"] = previous.conversation_id
        data["messages"] = _naming_previous_calls(data["messages"], previous=previous, previous_id=previous_id)
    plan = chat_request_prepare(user=user, data=data, cache_allowed=cache_allowed)
    try:
        if previous is not None and replies_count(conversation=plan.conversation) != int(previous_id.rsplit("_", 1)[1]):
            raise ApiError("previous_response_id must be the latest response of its conversation.",
                           param="previous_response_id", code="previous_response_not_latest", status=409)
        if not data.get("store", True) and plan.store:
            plan = dataclasses.replace(plan, store=False)  # continued, but this exchange is not kept
        response_id = _response_id_for(plan)
    except BaseException:
        plan.release_conversation()
        raise
    record = reply_lookup(plan, tenant=Tenant(user=user, api_key=api_key, end_user=data.get("user") or ""))
    started = ResponseStarted(response_id=response_id, record=record, created_at=plan.created,
                              previous_response_id=previous_id or None)
    if data.get("stream"):
        return dataclasses.replace(started, generation=reply_start(record))
    reply_complete(record)
    return started


def response_get(*, user, response_id: str) -> StoredResponse:
    """GET /v1/responses/<id>: a stored response of the caller."""
    reply, ordinal = response_message_get(user=user, response_id=response_id)
    previous = response_id_of(conversation_id=reply.conversation_id, ordinal=ordinal - 1) if ordinal > 1 else None
    return StoredResponse(response_id=response_id, message=reply, previous_response_id=previous)


def response_delete(*, user, response_id: str) -> None:
    """DELETE /v1/responses/<id>: the response's exchange and every later one of its conversation (so the ids of
    the earlier responses stay valid); the conversation too when nothing is left of it."""
    reply, _ = response_message_get(user=user, response_id=response_id)
    conversation = reply.conversation
    # Under the conversation's lease, like a tree operation: a reply running meanwhile (409 conversation_busy)
    # would otherwise lose the messages it is stored under.
    with conversation_leased(conversation):
        earlier = conversation.messages.filter(role="assistant", id__lt=reply.id).order_by("-id").first()
        conversation.messages.filter(id__gt=earlier.id if earlier else 0).delete()
        if not conversation.messages.exists():
            conversation.delete()
        elif not conversation.messages.filter(pk=conversation.active_id).exists():  # branched by the tree API
            Conversation.objects.filter(pk=conversation.pk).update(active_id=newest_leaf_under(conversation, None))


@dataclass(frozen=True)
class StoredResponse:
    response_id: str
    message: object  # the reply (chat.models.Message)
    previous_response_id: str | None


def response_call_id(response_id: str, index: int) -> str:
    """The call_id of a response's index-th function call: the same when streamed, returned and retrieved, so a
    function_call_output answering it can be matched to the call (and its name) in the stored reply."""
    return f"call_{response_id.removeprefix('resp_')}_{index}"


def _response_id_for(plan) -> str:
    if not plan.store:
        return f"resp_{uuid.uuid4().hex}"
    conversation_id = plan.conversation.pk if plan.conversation is not None else plan.new_conversation_id
    earlier = replies_count(conversation=plan.conversation) if plan.conversation is not None else 0
    earlier += sum(1 for turn in plan.new_turns if turn["role"] == "assistant")  # stored before the reply
    return response_id_of(conversation_id=conversation_id, ordinal=earlier + 1)


def _naming_previous_calls(messages: list[dict], *, previous, previous_id: str) -> list[dict]:
    """The input with the previous response's calls put before the outputs that answer them, so each output is
    labelled with its function's name in the prompt (the stored history is what the model reads)."""
    _, calls = tool_reply(previous.content)
    if not calls or not any(message["role"] == "tool" for message in messages):
        return messages
    known = [{**call, "id": response_call_id(previous_id, index)} for index, call in enumerate(calls)]
    first_output = next(index for index, message in enumerate(messages) if message["role"] == "tool")
    return [*messages[:first_output], {"role": "assistant", "content": "", "tool_calls": known},
            *messages[first_output:]]
