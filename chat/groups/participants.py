"""Several humans in one conversation: its owner invites other users by username, an invitee accepts (and may
then read and write into it) or declines, and the owner takes participants out.

An invitation is stored for any username, existing or not, and answered alike: adding users directly told an
owner which usernames exist (200 or 400) and put anyone into a conversation without asking them."""

from __future__ import annotations

from django.contrib.auth import get_user_model
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from chat.errors import ApiError, NotFound
from chat.models import Conversation, Invitation
from chat.selectors import missing_id_text, uuid_from

# Pending invitations a conversation may hold: enough for a table of players, too few to spam every account.
INVITATIONS_PER_CONVERSATION = 20
# And all of one owner's conversations together: a new conversation costs one chat request, so without this an
# account could pile invitations (and stored usernames) on anyone by opening conversations.
INVITATIONS_PER_OWNER = 100


def _owner_only(conversation: Conversation, by) -> None:
    if conversation.owner_id != by.pk:  # a participant: as if the conversation were missing, as before
        raise NotFound(f"No conversation {conversation.pk}.", param="conversation", code="conversation_not_found")


def conversation_invite(*, conversation: Conversation, by, username: str) -> None:
    """Invite whoever holds `username`; only the owner may. Inviting a participant or someone already invited
    changes nothing."""
    _owner_only(conversation, by)
    if conversation.group_id is None and not conversation.members.exists():
        # A one-character chat's prompt has no names on its lines: a participant would write as the owner.
        raise ApiError("Only a group conversation takes participants.", param="conversation",
                       code="not_a_group_chat")
    _check_username(username)
    if username == by.get_username() or conversation.participants.filter(username=username).exists():
        return
    # Bound to the account holding the name now: a name renamed or deleted and taken again later is someone
    # else, who must not find this conversation's invitation.
    invitee = get_user_model().objects.filter(username=username, is_active=True).first()
    with transaction.atomic():
        # Locks the owner's row so that two invitations at once, into one conversation or two, cannot both pass
        # the counts.
        list(get_user_model().objects.select_for_update().filter(pk=by.pk).values_list("pk", flat=True))
        if conversation.invitations.filter(username=username).exists():
            return
        if conversation.invitations.count() >= INVITATIONS_PER_CONVERSATION:
            raise ApiError(f"A conversation holds at most {INVITATIONS_PER_CONVERSATION} pending invitations; "
                           "withdraw some first.", param="username", code="too_many_invitations")
        if Invitation.objects.filter(conversation__owner=by).count() >= INVITATIONS_PER_OWNER:
            raise ApiError(f"At most {INVITATIONS_PER_OWNER} of your invitations may be pending at once; "
                           "withdraw some first.", param="username", code="too_many_invitations")
        try:
            with transaction.atomic():
                Invitation.objects.create(conversation=conversation, username=username, invitee=invitee)
        except IntegrityError:  # the same invitation, sent twice at once
            pass


def _check_username(username: str) -> None:
    """A name no account could hold (e.g. with a slash) is refused as such, without looking up accounts: an
    invitation to it could never be accepted, nor withdrawn by its URL."""
    try:
        get_user_model().username_validator(username)
    except ValidationError:
        raise ApiError("Not a valid username: letters, digits and @/./+/-/_ only.", param="username",
                       code="invalid_username") from None


def conversation_pending_invitations(*, conversation: Conversation) -> list[str]:
    return sorted(conversation.invitations.values_list("username", flat=True))


def invitations_of(*, user):
    """The invitations addressed to the user, oldest first."""
    return (Invitation.objects.filter(invitee=user).order_by("created_at", "pk")
            .select_related("conversation__character", "conversation__group", "conversation__owner"))


def _invitation_of(*, user, invitation_id) -> Invitation:
    parsed = uuid_from(invitation_id)
    invitation = None if parsed is None else invitations_of(user=user).filter(pk=parsed).first()
    if invitation is None:  # another user's looks exactly like a missing one, and so does a malformed id
        raise NotFound(f"No invitation {missing_id_text(invitation_id, parsed=parsed)}.", param="invitation",
                       code="invitation_not_found")
    return invitation


def invitation_accept(*, user, invitation_id) -> Conversation:
    """Join the conversation the invitation is for; the invitation is used up."""
    with transaction.atomic():
        invitation = _invitation_of(user=user, invitation_id=invitation_id)
        conversation = invitation.conversation
        # Deleted first: an invitation the owner withdraws meanwhile admits nobody.
        used, _ = Invitation.objects.filter(pk=invitation.pk).delete()
        if not used:
            raise NotFound(f"No invitation {invitation_id}.", param="invitation", code="invitation_not_found")
        if conversation.owner_id != user.pk:
            conversation.participants.add(user)
    return conversation


def invitation_decline(*, user, invitation_id) -> None:
    _invitation_of(user=user, invitation_id=invitation_id).delete()


def conversation_participant_remove(*, conversation: Conversation, by, username: str):
    """Take the user named `username` out of the conversation's participants, or withdraw their invitation: its
    owner may take anyone out, a participant only itself (leaving). Their messages stay, with their author.
    Returns the user taken out (None: an invitation withdrawn)."""
    if conversation.owner_id != by.pk and by.get_username() != username:
        raise ApiError("Only the conversation's owner may remove participants; a participant may remove itself.",
                       param="username", code="not_conversation_owner", status=403)
    user = conversation.participants.filter(username=username).first()
    if user is not None:
        conversation.participants.remove(user)
        return user
    withdrawn = 0
    if conversation.owner_id == by.pk:
        withdrawn, _ = conversation.invitations.filter(username=username).delete()
    if not withdrawn:
        raise NotFound(f"{username!r} is not a participant of this conversation.", param="username",
                       code="participant_not_found")
    return None
