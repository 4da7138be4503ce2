"""Reads of chat data for the API: what a user may see."""

from django.db.models import Count, Q

from .errors import NotFound
from .models import Conversation


def _visible_to(user) -> Q:
    """The user's own conversations and the group conversations they take part in."""
    joined = Conversation.participants.through.objects.filter(user=user).values("conversation_id")
    return Q(owner=user) | Q(pk__in=joined)


def conversations_of(*, user):
    return (Conversation.objects.filter(_visible_to(user)).select_related("character", "group")
            .prefetch_related("members").annotate(message_count=Count("messages")))


def conversation_get_owned(*, user, conversation_id) -> Conversation:
    """The user's conversation (or one they take part in); another user's looks exactly like a missing one."""
    conversation = Conversation.objects.select_related("character").filter(_visible_to(user),
                                                                             pk=conversation_id).first()
    if conversation is None:
        raise NotFound(f"No conversation {conversation_id}.", param="conversation", code="conversation_not_found")
    return conversation


def user_display_name(user) -> str:
    """What {{user}} is for a logged-in user: their first name, else their username."""
    if user is None or not getattr(user, "is_authenticated", False):
        return ""
    return (user.get_short_name() or user.get_username()).strip()


def conversation_get_listed(*, user, conversation_id) -> Conversation:
    """The user's conversation as the list shows it (with its message count)."""
    conversation_get_owned(user=user, conversation_id=conversation_id)  # another user's: the same 404
    return conversations_of(user=user).get(pk=conversation_id)
