"""Group chats over HTTP: the character groups on offer, and inviting, admitting or removing a human of a
conversation."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from characters.models import CharacterGroup
from chat.groups.participants import (conversation_invite, conversation_participant_remove,
                                     conversation_pending_invitations, invitation_accept, invitation_decline,
                                     invitations_of)
from chat.selectors import conversation_get_owned
from chat.trees.running import reply_viewer_removed


class GroupSerializer(serializers.ModelSerializer):
    members = serializers.SerializerMethodField()

    class Meta:
        model = CharacterGroup
        fields = ["slug", "name", "scenario", "turn_mode", "members"]

    def get_members(self, group) -> list[dict]:
        return [{"slug": member.slug, "name": member.name, "avatar": member.avatar.url if member.avatar else ""}
                for member in group.member_list() if member.is_active]


class GroupListView(generics.ListAPIView):
    """The active character groups: send a group's slug as a chat request's `character` for a group chat."""

    serializer_class = GroupSerializer
    pagination_class = None

    def get_queryset(self):
        return CharacterGroup.objects.filter(is_active=True)


class ParticipantSerializer(serializers.Serializer):
    username = serializers.CharField(max_length=150)


def _participants_body(conversation, user) -> dict:
    """Who is in the conversation; the owner also sees the usernames invited and not yet answered."""
    body = {"conversation": str(conversation.pk), "owner": conversation.owner.get_username(),
            "participants": sorted(conversation.participants.values_list("username", flat=True))}
    if conversation.owner_id == user.pk:
        body["invited"] = conversation_pending_invitations(conversation=conversation)
    return body


class ConversationParticipantsView(APIView):
    """GET: who takes part. POST: the owner invites a user by username; they join once they accept
    (`/v1/invitations/`). The answer is the same whether or not such a user exists."""

    @extend_schema(responses={200: dict})
    def get(self, request, pk):
        conversation = conversation_get_owned(user=request.user, conversation_id=pk)
        return Response(_participants_body(conversation, request.user))

    @extend_schema(request=ParticipantSerializer, responses={200: dict})
    def post(self, request, pk):
        body = ParticipantSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        conversation = conversation_get_owned(user=request.user, conversation_id=pk)
        conversation_invite(conversation=conversation, by=request.user, username=body.validated_data["username"])
        return Response(_participants_body(conversation, request.user))


class ConversationParticipantView(APIView):
    """DELETE: the owner takes a participant out or withdraws an invitation (a participant may take itself out);
    their messages stay."""

    @extend_schema(responses={200: dict})
    def delete(self, request, pk, username):
        conversation = conversation_get_owned(user=request.user, conversation_id=pk)
        removed = conversation_participant_remove(conversation=conversation, by=request.user, username=username)
        if removed is not None:  # a reply running meanwhile streams no more of its text to them
            reply_viewer_removed(conversation.pk, removed.pk)
        return Response({**_participants_body(conversation, request.user), "removed": username})


class InvitationSerializer(serializers.Serializer):
    id = serializers.UUIDField()
    conversation = serializers.UUIDField(source="conversation_id")
    title = serializers.CharField(source="conversation.title")
    character = serializers.CharField(source="conversation.character.slug")
    group = serializers.CharField(source="conversation.group.slug", default=None)
    invited_by = serializers.CharField(source="conversation.owner.username")
    created_at = serializers.DateTimeField()


class InvitationListView(generics.ListAPIView):
    """The invitations addressed to the caller, oldest first and paginated (others can send them): accept one to
    join its conversation, or decline it."""

    serializer_class = InvitationSerializer

    def get_queryset(self):
        return invitations_of(user=self.request.user)


class InvitationView(APIView):
    """DELETE: decline the invitation."""

    @extend_schema(responses={200: dict})
    def delete(self, request, pk):
        invitation_decline(user=request.user, invitation_id=pk)
        return Response({"invitation": str(pk), "declined": True})


class InvitationAcceptView(APIView):
    """POST: join the invitation's conversation; it then appears in `/v1/conversations/`."""

    @extend_schema(request=None, responses={200: dict})
    def post(self, request, pk):
        conversation = invitation_accept(user=request.user, invitation_id=pk)
        return Response({"invitation": str(pk), "conversation": str(conversation.pk), "joined": True})
