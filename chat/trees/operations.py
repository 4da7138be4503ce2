"""The operations on a stored conversation's tree, one use case each. Owner-only: another user's
conversation or message is a 404; a participant of a group conversation (who may read it and send messages)
gets 403 not_conversation_owner.

Every operation takes the conversation's lease (chat/tenancy/conversation_lock.py) and stores under its
version check, as a continuation does: two operations at once on one conversation get 409
conversation_busy for the second, and nothing either stored is lost. A generating operation holds the
lease until its reply is stored (chat/trees/running.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from chat.errors import ApiError, NotFound
from chat.models import ApiKey, Conversation, Message
from chat.plans import Branch, chat_request_prepare
from chat.replies import reply_lookup, reply_start_choices
from chat.selectors import (conversation_get_owned, message_get_owned, message_subtree_ids, newest_leaf_under,
                            uuid_from)
from chat.tenancy.conversation_lock import ConversationBusy, conversation_leased
from chat.tenancy.owners import Tenant

from .running import (CANCEL, KEEP, ReplyRun, announced_starter, reply_run_announced, reply_run_of,
                      reply_stop_request)

STOP_WAIT_SECONDS = 30  # how long a stop waits for the stopped reply to be stored


def chat_reply_run(*, user, api_key: ApiKey | None, data: dict, user_name: str = "",
                   on_disconnect: str = KEEP) -> ReplyRun:
    """A chat message answered by a run of its own (the WebSocket): it follows the conversation's active leaf,
    or opens a new conversation with the character's greeting."""
    plan = chat_request_prepare(user=user, data=data, greet=True, user_name=user_name)
    record = reply_lookup(plan, tenant=Tenant(user=user, api_key=api_key))
    return ReplyRun(record, reply_start_choices(record), on_disconnect=on_disconnect, kind="reply").start()


def chat_completion_choices(*, user, api_key: ApiKey | None, data: dict) -> ReplyRun:
    """POST /v1/chat/completions with n > 1: n choices of one prompt (never from the response cache); with a stored
    conversation, stored as alternatives of one another. A client that goes away cancels them (OpenAI's way)."""
    plan = chat_request_prepare(user=user, data=data, cache_allowed=False)
    record = reply_lookup(plan, tenant=Tenant(user=user, api_key=api_key, end_user=plan.end_user))
    return ReplyRun(record, reply_start_choices(record), on_disconnect=CANCEL, kind="reply").start()


def reply_regenerate(*, user, api_key: ApiKey | None, conversation_id, message_id, data: dict,
                     on_disconnect: str = KEEP) -> ReplyRun:
    """A new alternative ("swipe") of an assistant reply: its user message answered again (data["n"] of them),
    beside the old ones; the conversation's active leaf becomes the (first) new one."""
    _, message = _owners_message(user=user, conversation_id=conversation_id, message_id=message_id)
    parent = message.parent
    if message.role != Message.Role.ASSISTANT or parent is None or parent.role != Message.Role.USER:
        raise ApiError("Only a reply to a user message can be regenerated.", param="message", code="not_regenerable")
    if message.speaker_id is not None and not data.get("speaker"):
        data = {**data, "speaker": str(message.speaker_id)}  # a group chat's swipe is the same character's
    return _reply_run(user=user, api_key=api_key, conversation_id=conversation_id, data=data, kind="regenerate",
                      branch=Branch(leaf_id=parent.pk, answer_leaf=True, target_id=message.pk), on_disconnect=on_disconnect)


def message_edit(*, user, api_key: ApiKey | None, conversation_id, message_id, content: str, data: dict,
                 on_disconnect: str = KEEP) -> ReplyRun:
    """A user message edited: the new text becomes a sibling of the old (a new branch from their parent) and is
    answered at once; the old branch stays, one arrow away."""
    _, message = _owners_message(user=user, conversation_id=conversation_id, message_id=message_id)
    if message.role != Message.Role.USER:
        raise ApiError("Only a user message can be edited.", param="message", code="not_editable")
    return _reply_run(user=user, api_key=api_key, conversation_id=conversation_id,
                      data={**data, "messages": [{"role": "user", "content": content}]}, kind="edit",
                      branch=Branch(leaf_id=message.parent_id, new_message=True, target_id=message.pk), on_disconnect=on_disconnect)


def reply_continue(*, user, api_key: ApiKey | None, conversation_id, message_id, data: dict,
                   on_disconnect: str = KEEP) -> ReplyRun:
    """An assistant reply extended: its turn is prefilled with its text, left open, and the model goes on;
    the text generated is appended to the message."""
    conversation, message = _owners_message(user=user, conversation_id=conversation_id, message_id=message_id)
    if message.role != Message.Role.ASSISTANT or message.children.exists():
        raise ApiError("Only the last reply of a branch can be continued.", param="message", code="not_continuable")
    return _reply_run(user=user, api_key=api_key, conversation_id=conversation_id, data=data, kind="continue",
                      branch=Branch(leaf_id=message.pk, continue_leaf=True), on_disconnect=on_disconnect)


def _reply_run(*, user, api_key, conversation_id, data: dict, kind: str, branch: Branch,
               on_disconnect: str) -> ReplyRun:
    data = {"messages": [], **data, "conversation": conversation_id}
    # Never from the response cache: an alternative is asked for because the old reply is not wanted.
    plan = chat_request_prepare(user=user, data=data, cache_allowed=False, branch=branch)
    record = reply_lookup(plan, tenant=Tenant(user=user, api_key=api_key))
    return ReplyRun(record, reply_start_choices(record), on_disconnect=on_disconnect, kind=kind).start()


def message_select(*, user, conversation_id, message_id) -> Conversation:
    """Show a message's branch: an alternative, or any message of another branch. The active leaf becomes the
    newest leaf under it (the branch as it was last continued)."""
    conversation, message = _owners_message(user=user, conversation_id=conversation_id, message_id=message_id)
    with conversation_leased(conversation):
        _check_still_there(conversation, message)
        conversation.active_id = newest_leaf_under(conversation, message.pk)
        Conversation.objects.filter(pk=conversation.pk).update(active_id=conversation.active_id)
    return conversation


def message_delete(*, user, conversation_id, message_id) -> Conversation:
    """Delete a message and every message under it. If the active leaf was among them, the conversation shows
    the newest remaining branch beside them (under the deleted message's parent)."""
    conversation, message = _owners_message(user=user, conversation_id=conversation_id, message_id=message_id)
    with conversation_leased(conversation):
        _check_still_there(conversation, message)
        parent_id = message.parent_id
        # One delete of the whole subtree: message.delete() would let Django's collector follow Message.parent
        # level by level, a recursion as deep as the conversation is long. Conversation.active is set null if
        # it was among them (SET_NULL), and set again below.
        Message.objects.filter(pk__in=message_subtree_ids(message)).delete()
        if not conversation.messages.filter(pk=conversation.active_id).exists():
            conversation.active_id = newest_leaf_under(conversation, parent_id)
            Conversation.objects.filter(pk=conversation.pk).update(active_id=conversation.active_id)
    return conversation


def conversation_delete(*, user, conversation_id) -> None:
    """Delete a whole conversation: its messages, invitations and participants. Its owner's alone; under its
    lease, so a reply running meanwhile (409 conversation_busy) is never stored under nothing."""
    try:
        conversation = conversation_get_owned(user=user, conversation_id=conversation_id, owner_only=True)
    except NotFound:
        _busy_if_first_reply_runs(user=user, conversation_id=conversation_id)
        raise
    with conversation_leased(conversation):
        Conversation.objects.filter(pk=conversation.pk).delete()


def _busy_if_first_reply_runs(*, user, conversation_id) -> None:
    """409 conversation_busy, as for any reply on its way, when the user's new conversation is not stored yet but
    its first reply runs under its id (a start event names it): a 404 would say it is gone, then it is stored."""
    parsed = uuid_from(conversation_id)
    if parsed is None:
        return
    run = reply_run_of(parsed)
    if run is not None:
        starter = str(run.starter_id)
    else:  # a run in another process
        announced = reply_run_announced(parsed)
        starter = announced_starter(announced) if announced else None
    if starter == str(user.pk):
        raise ConversationBusy(parsed)


def conversation_rename(*, user, conversation_id, title: str) -> Conversation:
    """Set a conversation's title (the owner's alone). Not an exchange: the conversation's version, which a
    running reply is stored against, stays as it is."""
    conversation = conversation_get_owned(user=user, conversation_id=conversation_id, owner_only=True)
    Conversation.objects.filter(pk=conversation.pk).update(title=title)
    return conversation


@dataclass(frozen=True)
class Stopped:
    """What a stop did: the stopped reply's conversation and the messages it stored."""

    conversation_id: str
    messages: list


def reply_stop(*, user, conversation_id) -> Stopped:
    """Stop the reply running for the conversation, in this process or another; what it generated is stored,
    marked stopped. The owner may stop any reply; a participant of a group chat the one it started (403
    not_conversation_owner for another's). 404 reply_not_running when none runs."""
    run = running_reply_of(user=user, conversation_id=conversation_id)
    if run is not None:
        if run.starter_id != user.pk:
            conversation_get_owned(user=user, conversation_id=conversation_id, owner_only=True)
        run.stop()
        run.finished.wait(STOP_WAIT_SECONDS)
        return Stopped(run.conversation_id, list(run.record.stored))
    conversation = conversation_get_owned(user=user, conversation_id=conversation_id)
    announced = reply_run_announced(conversation.pk)
    if announced is not None and announced_starter(announced) != str(user.pk):
        conversation_get_owned(user=user, conversation_id=conversation_id, owner_only=True)
    if announced is None or not reply_stop_request(conversation.pk):
        raise NotFound(f"No reply is running for conversation {conversation.pk}.", param="conversation",
                       code="reply_not_running")
    deadline = time.monotonic() + STOP_WAIT_SECONDS
    while reply_run_announced(conversation.pk) == announced and time.monotonic() < deadline:
        time.sleep(0.1)
    try:
        conversation.refresh_from_db(fields=["active"])
    except Conversation.DoesNotExist:  # stored, then deleted (by another page) before this read: stopped all the same
        return Stopped(str(conversation.pk), [])
    active = conversation.active
    return Stopped(str(conversation.pk), [active] if active is not None and active.stopped else [])


def running_reply_of(*, user, conversation_id, owner_only: bool = False) -> ReplyRun | None:
    """The reply running in this process for a conversation the user may see (`owner_only`: change), or None;
    404 when the user may not. A new conversation's first reply runs before its conversation is stored: it is
    its starter's alone."""
    run = reply_run_of(conversation_id)
    if run is not None and run.record.plan.conversation is None:
        if getattr(run.record.plan.user, "pk", None) == user.pk:
            return run
        raise NotFound(f"No conversation {conversation_id}.", param="conversation", code="conversation_not_found")
    conversation_get_owned(user=user, conversation_id=conversation_id, owner_only=owner_only)
    return run


def _owners_message(*, user, conversation_id, message_id):
    """(conversation, message) for an operation on the tree: the owner's alone (a participant gets 403)."""
    return message_get_owned(user=user, conversation_id=conversation_id, message_id=message_id, owner_only=True)


def _check_still_there(conversation: Conversation, message: Message) -> None:
    """Checked again once the lease is held: a delete may have come between the first check and the lease."""
    if not conversation.messages.filter(pk=message.pk).exists():
        raise NotFound(f"No message {message.pk} in conversation {conversation.pk}.", param="message",
                       code="message_not_found")
