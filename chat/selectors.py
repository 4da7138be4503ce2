"""Reads for the API: what a user may see."""

from django.db.models import Count

from characters.models import Character

from .errors import NotFound
from .models import Conversation


def character_get_active(*, slug_or_id: str) -> Character:
    queryset = Character.objects.filter(is_active=True)
    character = queryset.filter(slug=slug_or_id).first()
    if character is None and str(slug_or_id).isdigit():
        character = queryset.filter(pk=int(slug_or_id)).first()
    if character is None:
        raise NotFound(f"No active character {slug_or_id!r}.", param="character", code="character_not_found")
    return character


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
