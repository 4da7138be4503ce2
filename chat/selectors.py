"""Reads of chat data for the API: what a user may see."""

from django.db.models import Count

from .errors import NotFound
from .models import Conversation


def conversations_of(*, user):
    return (Conversation.objects.filter(owner=user).select_related("character")
            .annotate(message_count=Count("messages")))


def conversation_get_owned(*, user, conversation_id) -> Conversation:
    """The user's conversation; another user's looks exactly like a missing one."""
    conversation = Conversation.objects.select_related("character").filter(pk=conversation_id, owner=user).first()
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
