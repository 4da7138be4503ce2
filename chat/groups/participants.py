"""Several humans in one conversation: its owner lets other users read and write into it."""

from __future__ import annotations

from django.contrib.auth import get_user_model

from chat.errors import ApiError, NotFound
from chat.models import Conversation


def conversation_participant_add(*, conversation: Conversation, by, username: str):
    """Add the user named `username` to the conversation's participants; only its owner may."""
    if conversation.owner_id != by.pk:
        raise NotFound(f"No conversation {conversation.pk}.", param="conversation", code="conversation_not_found")
    user = get_user_model().objects.filter(username=username, is_active=True).first()
    if user is None:
        raise ApiError(f"No user {username!r}.", param="username", code="user_not_found")
    if user.pk != conversation.owner_id:
        conversation.participants.add(user)
    return user
