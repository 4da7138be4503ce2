"""Producing a plan's reply: from the cache or the engine, streamed or whole; storing the exchange;
the reply's OpenAI shapes (chat.completion body, usage, logprobs).

A `ReplyRecord` says what became of one plan (cache result, timing, completion, stored
conversation); it is written as the reply is produced and read by the request log. A reply
generated for a known caller (`tenant`) is admitted under its quotas and settled in the usage
ledger when it ends (chat/tenancy/metering.py); the engine learns only the caller's owner label.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import IntegrityError, transaction

from characters.models import Character, CharacterGroup
from scenarios.models import Scenario

from .engine import Completion
from .errors import ApiError
from .metrics import record_generation
from .models import Conversation, Message
from .plans import ChatPlan
from .response_cache import BYPASS, MISS, ReplayedGeneration, cached_completion, remember_completion
from .tenancy.metering import Meter, MeteredGeneration, meter_open
from .tenancy.owners import Tenant, owner_label
from .tenancy.quotas import Hold
from .tenancy.conversation_lock import conversation_advance
from .tooling.calls import RepeatStoppingGeneration, tool_finish_reason, tool_reply
from .tooling.requests import ToolRequest

logger = logging.getLogger("llmsite.chat")


class ContentDeleted(ApiError):
    """A character or group the reply belongs to was deleted while it was generated: nothing is stored."""

    status = 409
    code = "character_deleted"


@dataclass
class GenerationTiming:
    """When a live generation started, produced its first text, and ended (perf_counter seconds)."""

    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished: float | None = None

    def saw_text(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    def finish(self, *, model: str, completion: Completion) -> None:
        self.finished = time.perf_counter()
        record_generation(model=model, completion=completion, started=self.started,
                          first_token_at=self.first_token_at, finished=self.finished)


@dataclass
class ReplyRecord:
    """What became of one plan, filled in as its reply is produced (read by chat/ops/middleware.py)."""

    plan: ChatPlan
    cache_status: str = BYPASS
    timing: GenerationTiming | None = None   # set when generated live (not from the cache)
    completion: Completion | None = None     # set when finished
    conversation: Conversation | None = None  # the stored conversation, once stored
    tenant: Tenant | None = None              # the caller: quotas, usage ledger, fair admission
    meter: Meter | None = None                # set when a live generation was admitted for the tenant
    completions: list | None = None           # every choice's Completion when the plan asked for several (`n`)
    stopped: bool = False                     # stopped on purpose: what was generated is stored, marked stopped
    stored: list = field(default_factory=list)  # the reply Messages stored (one per choice)

    def __post_init__(self):
        if self.conversation is None:  # a continued chat's conversation is known before anything is stored
            self.conversation = self.plan.conversation

    @property
    def owner(self) -> str:
        """The engine's owner label: requests are admitted round-robin between owners."""
        return self.tenant.owner if self.tenant is not None else owner_label(self.plan.user)


# --- Producing the reply --------------------------------------------------------------------------
# A plan that continues a conversation holds its lease (chat/tenancy/conversation_lock.py) until its exchange is
# stored (exchange_store), or until its reply fails or is cancelled (below, and in reply_stream).


def reply_lookup(plan: ChatPlan, *, tenant: Tenant | None = None, admitted: Hold | None = None) -> ReplyRecord:
    """A record for `plan`, holding the cached reply when there is one. A reply to generate for a
    `tenant` is admitted under its quotas now, a slot and max_tokens per choice (QuotaExceeded: 429),
    unless it was `admitted` earlier (a background job, when submitted)."""
    record = ReplyRecord(plan, tenant=tenant)
    with _released_on_error(plan):
        record.completion, record.cache_status = cached_completion(plan)
        if record.completion is None and tenant is not None:
            record.meter = meter_open(tenant=tenant, model=plan.model_name, character=plan.character,
                                      prompt_tokens=plan.prompt.prompt_tokens, max_tokens=plan.params.max_tokens,
                                      sequences=plan.choices, admitted=admitted)
        elif admitted is not None:
            admitted.settle(0)  # answered from the cache: nothing generated
    return record


def _submit(record: ReplyRecord, params=None):
    """Submit the plan to the engine under the caller's owner label; metered when the record has a meter."""
    plan = record.plan
    try:
        generation = plan.engine.submit(plan.prompt.text, params or plan.params, owner=record.owner)
    except BaseException:
        if record.meter is not None:
            record.meter.abandon()  # refused before generating (context overflow, overloaded): not a generation
        raise
    if record.meter is not None:
        generation = MeteredGeneration(generation, record.meter, count_tokens=plan.engine.count_tokens)
    if plan.tools is not None and plan.tools.may_call and plan.tools.parallel:
        generation = RepeatStoppingGeneration(generation)  # an exact repeat of a call ends the reply
    return generation


def reply_start(record: ReplyRecord):
    """The record's cached reply replayed, or a live generation submitted to the engine (sync)."""
    if record.completion is not None:
        return ReplayedGeneration(record.completion)
    record.timing = GenerationTiming()
    with _released_on_error(record.plan):
        return _submit(record)


SEED_RANGE = 2**32  # llama.cpp's sampler seeds are 32-bit


def reply_start_choices(record: ReplyRecord) -> list:
    """The plan's `choices` generations of the one prompt, with seeds seed, seed+1, ... (a random base when the
    request has no seed), admitted together: the engine evaluates the prompt once and forks the other choices
    from it (chat/engine/backends/llama_cpp.py). Choice 0 carries the record's meter; each other choice takes
    one of its slots and max_tokens of its reservation, and charges only its reply tokens, so the prompt is
    counted once (sync)."""
    plan = record.plan
    if plan.choices == 1:
        return [reply_start(record)]
    record.timing = GenerationTiming()
    base = plan.params.seed if plan.params.seed is not None else random.randrange(SEED_RANGE)
    generations = []
    with _released_on_error(plan), plan.engine.admission_held():  # admitted together: the prompt is evaluated once
        try:
            for index in range(plan.choices):
                params = dataclasses.replace(plan.params, seed=(base + index) % SEED_RANGE)
                if index == 0:
                    generations.append(_submit(record, params))
                    continue
                generation = plan.engine.submit(plan.prompt.text, params, owner=record.owner)
                if record.meter is not None:
                    meter = _ExtraChoiceMeter(tenant=record.meter.tenant, model=record.meter.model,
                                              character_id=record.meter.character_id, prompt_tokens=0,
                                              hold=record.meter.hold.split(slots=1, tokens=params.max_tokens))
                    generation = MeteredGeneration(generation, meter, count_tokens=plan.engine.count_tokens)
                generations.append(generation)
        except BaseException:
            for generation in generations:
                generation.cancel()
            raise
    return generations


class _ExtraChoiceMeter(Meter):
    """The ledger entry of a choice after the first: its prompt is choice 0's, charged there once."""

    def settle(self, *, outcome: str, completion=None, completion_tokens: int = 0) -> None:
        if completion is not None:
            completion_tokens = completion.completion_tokens
        super().settle(outcome=outcome, completion_tokens=completion_tokens)


@contextmanager
def _released_on_error(plan: ChatPlan):
    try:
        yield
    except BaseException:
        plan.release_conversation()
        raise


def reply_generate(record: ReplyRecord, *, on_text=None) -> Completion | None:
    """The whole reply (blocking): the cached one, or generated and timed; `on_text(delta)` may return
    False to stop, and then the result is None."""
    if record.completion is not None:
        return record.completion
    plan = record.plan
    record.timing = GenerationTiming()
    generation = _submit(record)
    deltas = iter(generation)
    try:
        for delta in deltas:
            if delta:
                record.timing.saw_text()
            if on_text is not None and on_text(delta) is False:
                generation.cancel()
                return None
    finally:
        if hasattr(deltas, "close"):
            deltas.close()  # a reply stopped early is settled (metered) now, not when collected
    record.completion = generation.result
    record.timing.finish(model=plan.model_name, completion=record.completion)
    return record.completion


def reply_remember(record: ReplyRecord) -> None:
    """Cache a freshly generated reply (a no-op for a cached one or one that may not be cached)."""
    if record.cache_status == MISS and record.completion is not None:
        remember_completion(record.plan, record.completion)


def exchange_store(record: ReplyRecord) -> Conversation | None:
    """Store the new turns and the reply (each choice's, as alternatives) together, or nothing: a cancelled
    reply is not stored unless it was stopped on purpose (`record.stopped`), and then what it had is kept.
    The new turns follow the plan's parent message and the conversation's active leaf becomes the (first) reply;
    a continuation extends its message instead."""
    plan = record.plan
    completions = record.completions or ([record.completion] if record.completion is not None else [])
    kept = [c for c in completions if c.finish_reason in ("stop", "length")
            or (record.stopped and c.finish_reason == "cancelled" and c.text)]
    if not plan.store or not kept:
        return record.conversation
    # Counted before the transaction: with SQLite it holds the one write lock, which a megabyte of turns being
    # tokenized (a remote model's: upstream requests) would keep from every other tenant.
    turn_tokens = [plan.engine.count_tokens(turn["content"]) for turn in plan.new_turns]
    try:
        with transaction.atomic():
            # Content may have been deleted while the reply was generated: the rows below would break their foreign
            # keys at commit (an IntegrityError, a 500 with nothing stored).
            _characters_and_group_still_there(plan)
            scenarios = list(Scenario.objects.filter(pk__in=[scenario.pk for scenario in plan.prompt.scenarios]))
            conversation = plan.conversation
            if conversation is None:
                first_user = next((t["content"] for t in plan.new_turns if t["role"] == "user"), "")
                conversation = Conversation.objects.create(
                    id=plan.new_conversation_id, character=plan.members[0] if plan.members else plan.character,
                    owner=plan.user, title=_title_from(first_user), user_name=plan.user_name, group=plan.group)
                if plan.members:  # a member deleted meanwhile is left out, as its deletion would have done
                    conversation.members.set(Character.objects.filter(pk__in=[member.pk for member in plan.members]))
            else:
                conversation_advance(conversation)  # 409 if another exchange was stored since the history was read
            author = plan.user if getattr(plan.user, "pk", None) else None
            parent_id = plan.parent_id
            for turn, tokens in zip(plan.new_turns, turn_tokens):
                parent_id = Message.objects.create(conversation=conversation, parent_id=parent_id, role=turn["role"],
                                                   content=turn["content"], completion_tokens=tokens,
                                                   author=author if turn["role"] == "user" else None).pk
            if plan.continued is not None:
                replies = [_extended(plan.continued, kept[0], stopped=record.stopped,
                                     world_info_state=plan.prompt.world_info_state)]
            else:
                replies = [_reply_message(conversation, parent_id, completion, plan=plan, stopped=record.stopped,
                                          scenarios=scenarios) for completion in kept]
            Conversation.objects.filter(pk=conversation.pk).update(active=replies[0])
            conversation.active = replies[0]
            if plan.conversation is None:
                conversation.save(update_fields=["updated_at"])
            transaction.on_commit(plan.release_conversation)  # the next continuation reads this exchange
    except IntegrityError:  # deleted after the check, before the commit (PostgreSQL checks foreign keys then)
        raise content_deleted_late() from None
    record.conversation = conversation
    record.stored = replies
    return conversation


def content_deleted_late() -> ContentDeleted:
    """The error of a store whose transaction failed its foreign keys at commit: something it refers to was deleted
    after it was checked (also raised where an outer transaction commits, e.g. a background job's)."""
    return ContentDeleted("Something this reply refers to (its character, group or a scenario) was deleted while it "
                          "was stored; nothing was stored.", code="content_deleted")


def _characters_and_group_still_there(plan: ChatPlan) -> None:
    """409 character_deleted (or group_deleted) when the conversation's character, the speaker of a group reply or
    a new conversation's group was deleted since the plan was made. A stored conversation's character and group
    are protected from deletion, a speaker only once it has spoken: checked all the same, one query each."""
    characters = {character.pk: character for character in (plan.character, *plan.members[:1]) if character}
    gone = set(characters) - set(Character.objects.filter(pk__in=characters).values_list("pk", flat=True))
    if gone:
        slug = characters[gone.pop()].slug
        raise ContentDeleted(f"The character {slug!r} was deleted while this reply was generated; nothing was "
                             "stored.", param="character")
    if plan.group is not None and not CharacterGroup.objects.filter(pk=plan.group.pk).exists():
        raise ContentDeleted(f"The group {plan.group.slug!r} was deleted while this reply was generated; nothing "
                             "was stored.", param="group", code="group_deleted")


def _reply_message(conversation: Conversation, parent_id: int | None, completion: Completion, *, plan: ChatPlan,
                   stopped: bool, scenarios: list[Scenario]) -> Message:
    reply = Message.objects.create(
        conversation=conversation, parent_id=parent_id, role=Message.Role.ASSISTANT, content=completion.text,
        prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
        finish_reason=completion.finish_reason, model_name=plan.model_name,
        stopped=stopped and completion.finish_reason == "cancelled", speaker=plan.character if plan.members else None,
        world_info_state=plan.prompt.world_info_state)
    reply.scenarios.set(scenarios)  # those of the prompt's that still exist
    return reply


def _extended(message: Message, completion: Completion, *, stopped: bool, world_info_state: dict) -> Message:
    """A continued reply: its text extended by the completion's, its counts, finish and World Info state updated
    (the continuation was evaluated as the reply it extends, chat/plans.py)."""
    message.refresh_from_db()
    message.content += completion.text
    message.completion_tokens = (message.completion_tokens or 0) + completion.completion_tokens
    message.prompt_tokens = completion.prompt_tokens
    message.finish_reason = completion.finish_reason
    message.stopped = stopped and completion.finish_reason == "cancelled"
    message.world_info_state = world_info_state
    message.save(update_fields=["content", "completion_tokens", "prompt_tokens", "finish_reason", "stopped",
                                "world_info_state"])
    return message


def reply_complete(record: ReplyRecord) -> dict:
    """Generate the whole reply (blocking), cache it, store it, and return the chat.completion object."""
    try:
        reply_generate(record)
        reply_remember(record)
        exchange_store(record)
    finally:
        record.plan.release_conversation()
    return chat_completion_body(record)


def deltas_for_client(generation, keepalive: float):
    """The generation's text deltas as a client is sent them: at most every STREAM_INTERVAL_MS (tokens decoded
    meanwhile together; the first at once), and None when nothing arrived for `keepalive` seconds (time for a
    keep-alive). The generation keeps one timer for each: no task per token."""
    generation.keep_alive_every(keepalive)
    generation.deliver_every(settings.STREAM_INTERVAL_MS / 1000)
    return generation


async def reply_stream(record: ReplyRecord, generation, *, keepalive: float | None = None):
    """Yield ("delta", text), ("keepalive", None), then ("end", None) once the exchange is stored.

    Runs on the ASGI event loop. A client that disconnects cancels the consuming task; the
    generation is then cancelled so the scheduler frees its sequence, and nothing is stored.
    """
    finished = False
    try:
        async for delta in deltas_for_client(generation, keepalive or settings.SSE_KEEPALIVE_SECONDS):
            if delta is None:
                yield "keepalive", None
            elif delta:
                if record.timing is not None:
                    record.timing.saw_text()
                yield "delta", delta
        record.completion = generation.result
        finished = True
        if record.timing is not None:
            record.timing.finish(model=record.plan.model_name, completion=record.completion)
        await sync_to_async(reply_remember)(record)
        await sync_to_async(exchange_store)(record)
        yield "end", None
    except asyncio.CancelledError:
        logger.info("client went away; generation %s cancelled", generation.id)
        raise
    finally:
        if not finished:
            generation.cancel()
        record.plan.release_conversation()


# --- OpenAI shapes --------------------------------------------------------------------------------


def chat_completion_body(record: ReplyRecord) -> dict:
    plan = record.plan
    return completion_body(completion_id=plan.completion_id, created=plan.created, model=plan.model_name,
                           completion=record.completion, scenarios=plan.prompt.scenarios_used,
                           conversation_id=str(record.conversation.pk) if record.conversation else None,
                           shorthand=plan.shorthand, tools=plan.tools,
                           speaker=plan.character if plan.members else None)


def speaker_of(character) -> dict:
    """A group chat's speaker as replies report it: slug, name and avatar URL ("" without one)."""
    return {"slug": character.slug, "name": character.name, "avatar": character.avatar.url if character.avatar else ""}


def completion_body(*, completion_id: str, created: int, model: str, completion: Completion, scenarios: list,
                    conversation_id: str | None, shorthand: bool, tools: ToolRequest | None = None,
                    speaker=None) -> dict:
    message, finish_reason = {"role": "assistant", "content": completion.text}, completion.finish_reason
    if tools is not None and tools.may_call:
        message["content"], calls = tool_reply(completion.text)
        if calls:
            message["tool_calls"] = calls
        finish_reason = tool_finish_reason(finish_reason, bool(calls))
    body = {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": finish_reason,
                     "logprobs": chat_logprobs(completion.logprobs)}],
        "usage": usage_of(completion),
        "system_fingerprint": None,
        "scenarios": scenarios,
        "conversation": conversation_id,
    }
    if speaker is not None:  # a group chat: who replied
        message["name"] = speaker.name
        body["speaker"] = speaker_of(speaker)
    if shorthand:
        body["text"] = completion.text
    return body


def end_fields(record: ReplyRecord) -> dict:
    """What the last chunk of a stream reports: finish reason, usage, scenarios, conversation."""
    completion, conversation = record.completion, record.conversation
    fields = {"finish_reason": completion.finish_reason, "usage": usage_of(completion),
              "scenarios": record.plan.prompt.scenarios_used,
              "conversation": str(conversation.pk) if conversation else None}
    if record.plan.members:
        fields["speaker"] = speaker_of(record.plan.character)
    return fields


def usage_of(completion: Completion) -> dict:
    """OpenAI's usage object; cached_tokens: prompt tokens taken from a slot or a saved state, not evaluated."""
    return {"prompt_tokens": completion.prompt_tokens, "completion_tokens": completion.completion_tokens,
            "total_tokens": completion.prompt_tokens + completion.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": completion.cached_prompt_tokens}}


def chat_logprobs(records) -> dict | None:
    """`choices[].logprobs` of a chat completion (or chunk): None when none were asked for."""
    if records is None:
        return None
    return {"content": [_logprob_entry(record, top_logprobs=[_logprob_entry(other) for other in record.top])
                        for record in records], "refusal": None}


def _logprob_entry(record, **extra) -> dict:
    return {"token": record.token, "logprob": record.logprob, "bytes": list(record.bytes), **extra}


class LegacyLogprobs:
    """`choices[].logprobs` of /v1/completions (tokens, token_logprobs, top_logprobs, text_offset); keeps the
    text offset across the chunks of a stream."""

    def __init__(self):
        self.offset = 0  # characters of the reply before the next token

    def shape(self, records) -> dict:
        body = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for record in records:
            body["tokens"].append(record.token)
            body["token_logprobs"].append(record.logprob)
            # As in the OpenAI API, the sampled token is always among its step's entries.
            body["top_logprobs"].append({**{other.token: other.logprob for other in record.top},
                                         record.token: record.logprob})
            body["text_offset"].append(self.offset)
            self.offset += len(record.token)
        return body


def _title_from(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= 60 else text[:57] + "..."
