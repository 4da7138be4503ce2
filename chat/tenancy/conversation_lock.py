"""One continuation at a time per stored conversation: never two replies built on the same history.

A request that continues a stored conversation takes its lease (`conversation_lease_take`) before it
reads the history and gives it back once its reply is stored, has failed or was cancelled. The lease
is a key added atomically to the shared cache (`cache.add`, Redis in production), so it holds across
web instances and workers; a second continuation meanwhile is refused with 409 conversation_busy. A
lease whose process died expires after LEASE_SECONDS.

Behind the lease, storing checks the history's version (`conversation_advance`): the exchange is
stored only if the conversation has not moved since its history was read (its updated_at), so a
lease that expired, or a cache that is down or not shared (local memory, several processes), still
cannot fork a conversation: the late reply gets the same 409 and nothing is stored.
"""

from __future__ import annotations

import logging
import uuid
from contextlib import contextmanager

from django.core.cache import cache
from django.db import transaction
from django.utils import timezone

from chat.errors import ApiError, NotFound
from chat.models import Conversation

logger = logging.getLogger("llmsite.chat")

# Longer than any reply takes; only a process that died without giving its lease back waits this out.
LEASE_SECONDS = 600


class ConversationBusy(ApiError):
    status = 409
    code = "conversation_busy"

    def __init__(self, conversation_id):
        super().__init__(f"Conversation {conversation_id} is busy with another reply; send the message again once "
                         "that reply has ended.", param="conversation")


class ConversationLease:
    """Held while one request continues a conversation; `release` is idempotent and safe from any thread."""

    def __init__(self, key: str, token: str):
        self.key, self.token = key, token
        self.released = False

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        try:
            if cache.get(self.key) == self.token:  # not a lease that expired and was taken by another request
                cache.delete(self.key)
        except Exception:  # a cache outage: the lease expires by itself
            logger.warning("could not release %s", self.key, exc_info=True)


def conversation_lease_take(*, conversation: Conversation, holder: str | None = None) -> ConversationLease | None:
    """The conversation's lease, or ConversationBusy (409); None when the cache cannot say (it is down):
    then only the version check of `conversation_advance` guards the conversation. A named `holder` (a
    background job) takes over a lease it already holds: the retry of a job whose worker died is not
    refused by the dead attempt's lease."""
    key, token = f"conversation-lease:{conversation.pk}", holder or uuid.uuid4().hex
    taken = cache.add(key, token, timeout=LEASE_SECONDS)
    if taken is None:  # django-redis with IGNORE_EXCEPTIONS: Redis did not answer
        logger.warning("no conversation lease for %s: the cache is unavailable", conversation.pk)
        return None
    if not taken and not (holder is not None and cache.get(key) == holder):
        raise ConversationBusy(conversation.pk)
    if not taken:
        cache.set(key, token, timeout=LEASE_SECONDS)  # taken over: a fresh expiry for this attempt
    return ConversationLease(key, token)


def conversation_advance(conversation: Conversation) -> None:
    """In the transaction that stores an exchange: move the conversation on from the version whose history
    was read, or raise ConversationBusy when another exchange was stored since (the transaction rolls back)."""
    now = timezone.now()
    if not Conversation.objects.filter(pk=conversation.pk, updated_at=conversation.updated_at).update(updated_at=now):
        raise ConversationBusy(conversation.pk)
    conversation.updated_at = now


def conversation_reread(conversation: Conversation) -> None:
    """Read the conversation's version and active leaf again once its lease is held; 404 conversation_not_found
    when it was deleted between the caller's ownership check and the lease (a delete that held the lease then)."""
    try:
        conversation.refresh_from_db(fields=["updated_at", "active"])
    except Conversation.DoesNotExist:
        raise NotFound(f"No conversation {conversation.pk}.", param="conversation",
                       code="conversation_not_found") from None


@contextmanager
def conversation_leased(conversation: Conversation):
    """An operation that changes a stored conversation outside a reply (a tree operation, a deleted response):
    its lease (409 conversation_busy while a reply or another operation holds it), then a transaction that moves
    its version on (409 if it moved since). The operation's writes go in that transaction."""
    lease = conversation_lease_take(conversation=conversation)
    try:
        conversation_reread(conversation)
        with transaction.atomic():
            conversation_advance(conversation)
            yield conversation
    finally:
        if lease is not None:
            lease.release()
