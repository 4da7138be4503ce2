"""Reads of chat data for the API: what a user may see."""

import re
import uuid

from django.db.models import Count, Q

from .errors import ApiError, NotFound
from .models import Conversation, Message


def _visible_to(user) -> Q:
    """The user's own conversations and the group conversations they take part in."""
    joined = Conversation.participants.through.objects.filter(user=user).values("conversation_id")
    return Q(owner=user) | Q(pk__in=joined)


def conversations_of(*, user):
    return (Conversation.objects.filter(_visible_to(user)).select_related("character", "group")
            .prefetch_related("members").annotate(message_count=Count("messages")))


def uuid_from(value) -> uuid.UUID | None:
    """`value` (a UUID, or an id as a client sent it) as a UUID; None when it cannot be one, so that a lookup
    answers a malformed id with its resource's 404 instead of a database error."""
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        return None


def missing_id_text(value, *, parsed) -> str:
    """An id in a 404's message: as it is, or, not parsed (malformed), quoted and marked so."""
    return str(value) if parsed is not None else f"{str(value)[:80]!r} (not a valid id)"


def conversation_get_owned(*, user, conversation_id, owner_only: bool = False) -> Conversation:
    """The user's conversation (or one they take part in); another user's looks exactly like a missing one, and
    so does a malformed id. `owner_only`: what only the owner may do (the tree's operations, docs/API.md): a
    participant gets 403 not_conversation_owner."""
    parsed = uuid_from(conversation_id)
    conversation = None if parsed is None else (
        Conversation.objects.select_related("character").filter(_visible_to(user), pk=parsed).first())
    if conversation is None:
        raise NotFound(f"No conversation {missing_id_text(conversation_id, parsed=parsed)}.", param="conversation",
                       code="conversation_not_found")
    if owner_only and conversation.owner_id != user.pk:
        raise ApiError("Only the conversation's owner may change or delete it; participants send messages.",
                       param="conversation", code="not_conversation_owner", status=403)
    return conversation


def user_display_name(user) -> str:
    """What {{user}} is for a logged-in user: their first name, else their username."""
    if user is None or not getattr(user, "is_authenticated", False):
        return ""
    return (user.get_short_name() or user.get_username()).strip()


def conversation_get_listed(*, user, conversation_id) -> Conversation:
    """The user's conversation as the list shows it (with its message count)."""
    conversation = conversation_get_owned(user=user, conversation_id=conversation_id)  # another user's: the same 404
    listed = conversations_of(user=user).filter(pk=conversation.pk).first()
    if listed is None:  # deleted between the two reads
        raise NotFound(f"No conversation {conversation.pk}.", param="conversation", code="conversation_not_found")
    return listed


# --- Stored responses (the Responses API): "resp_<conversation hex>_<n>" is the conversation's n-th reply ---

RESPONSE_ID = re.compile(r"^resp_([0-9a-f]{32})_([1-9][0-9]{0,8})$")
UNSTORED_RESPONSE_ID = re.compile(r"^resp_[0-9a-f]{32}$")  # chat/services.py gives an unstored response a random one


def response_id_of(*, conversation_id: uuid.UUID, ordinal: int) -> str:
    return f"resp_{conversation_id.hex}_{ordinal}"


def response_message_get(*, user, response_id: str, param: str = "response_id") -> tuple[Message, int]:
    """(the assistant message, its ordinal among the conversation's replies) of a stored response of the user;
    another user's, a deleted or a malformed id all look missing."""
    match = RESPONSE_ID.match(response_id or "")
    conversation = None
    if match:
        conversation = Conversation.objects.select_related("character").filter(
            pk=uuid.UUID(match.group(1)), owner=user).first()
    reply = None
    if conversation is not None:
        ordinal = int(match.group(2))
        reply = conversation.messages.filter(role=Message.Role.ASSISTANT).order_by("id")[ordinal - 1:ordinal].first()
    if reply is None:
        unstored = " Responses without a character (or with store: false) are not stored: they cannot be " \
                   "retrieved or continued." if UNSTORED_RESPONSE_ID.match(response_id or "") else ""
        raise NotFound(f"No response {str(response_id)[:80]!r}.{unstored}", param=param, code="response_not_found")
    return reply, ordinal


def replies_count(*, conversation) -> int:
    """How many replies (assistant messages) the conversation holds."""
    return conversation.messages.filter(role=Message.Role.ASSISTANT).count()


# --- The conversation as a tree (chat/models.py: Message.parent, Conversation.active) ----------------


def message_get_owned(*, user, conversation_id, message_id, owner_only: bool = False) -> tuple[Conversation, Message]:
    """(conversation, message) of the user's conversation; another user's looks like a missing one."""
    conversation = conversation_get_owned(user=user, conversation_id=conversation_id, owner_only=owner_only)
    parsed = message_id if isinstance(message_id, int) else None  # the URL's text when it is not a number
    message = None if parsed is None else conversation.messages.filter(pk=parsed).first()
    if message is None:
        raise NotFound(f"No message {missing_id_text(message_id, parsed=parsed)} in conversation {conversation.pk}.",
                       param="message", code="message_not_found")
    return conversation, message


def conversation_path(conversation: Conversation, *, leaf_id: int | None = None) -> list[Message]:
    """The messages from the root to `leaf_id` (default: the active leaf), oldest first: what the model sees."""
    leaf_id = conversation.active_id if leaf_id is None else leaf_id
    if leaf_id is None:
        return []
    messages = {m.pk: m for m in conversation.messages.prefetch_related("scenarios")}
    path, node = [], messages.get(leaf_id)
    while node is not None:
        path.append(node)
        node = messages.get(node.parent_id)
    return path[::-1]


def message_alternatives(message: Message) -> list[Message]:
    """The message and its siblings (same parent, same role), oldest first: the swipes or edits to pick from."""
    return list(Message.objects.filter(conversation_id=message.conversation_id, parent_id=message.parent_id,
                                       role=message.role).prefetch_related("scenarios").order_by("id"))


def message_subtree_ids(message: Message) -> list[int]:
    """The message's id and every id under it, gathered from one read of the conversation's (id, parent) pairs:
    no query or stack frame per level, however deep the tree (a long conversation is a chain)."""
    children: dict[int, list[int]] = {}
    for pk, parent in Message.objects.filter(conversation_id=message.conversation_id).values_list("id", "parent_id"):
        children.setdefault(parent, []).append(pk)
    ids, pending = [], [message.pk]
    while pending:
        pk = pending.pop()
        ids.append(pk)
        pending.extend(children.get(pk, ()))
    return ids


def newest_leaf_under(conversation: Conversation, message_id: int | None) -> int | None:
    """The newest leaf of the subtree of `message_id` (the whole tree when None): where selecting a message
    (an alternative, a branch) takes the conversation. Down from it, each step goes to the child whose
    subtree holds the newest message (a child is always newer than its parent)."""
    parents = dict(conversation.messages.values_list("id", "parent_id"))
    newest = {pk: pk for pk in parents}  # the newest message of each subtree
    for pk in sorted(parents, reverse=True):
        parent = parents[pk]
        if parent is not None:
            newest[parent] = max(newest[parent], newest[pk])
    children: dict[int | None, list[int]] = {}
    for pk, parent in parents.items():
        children.setdefault(parent, []).append(pk)
    if message_id is None:
        if not children.get(None):
            return None
        node = max(children[None], key=newest.get)
    else:
        node = message_id
    while children.get(node):
        node = max(children[node], key=newest.get)
    return node
