"""Several humans in one conversation: its owner lets other users read and write into it, and takes them out."""

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


def conversation_participant_remove(*, conversation: Conversation, by, username: str) -> None:
    """Take the user named `username` out of the conversation's participants: its owner may take anyone out, a
    participant only itself (leaving). Their messages stay, with their author."""
    if conversation.owner_id != by.pk and by.get_username() != username:
        raise ApiError("Only the conversation's owner may remove participants; a participant may remove itself.",
                       param="username", code="not_conversation_owner", status=403)
    user = conversation.participants.filter(username=username).first()
    if user is None:
        raise NotFound(f"{username!r} is not a participant of this conversation.", param="username",
                       code="participant_not_found")
    conversation.participants.remove(user)
