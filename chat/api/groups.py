"""Group chats over HTTP: the character groups on offer, and adding or removing a human of a conversation."""

from __future__ import annotations

from drf_spectacular.utils import extend_schema
from rest_framework import generics, serializers
from rest_framework.response import Response
from rest_framework.views import APIView

from characters.models import CharacterGroup
from chat.groups.participants import conversation_participant_add, conversation_participant_remove
from chat.selectors import conversation_get_owned


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


class ConversationParticipantsView(APIView):
    """The owner adds another user, who may then read and write into the conversation."""

    @extend_schema(request=ParticipantSerializer, responses={200: dict})
    def post(self, request, pk):
        body = ParticipantSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        conversation = conversation_get_owned(user=request.user, conversation_id=pk)
        user = conversation_participant_add(conversation=conversation, by=request.user,
                                            username=body.validated_data["username"])
        return Response({"conversation": str(conversation.pk), "participants":
                         sorted(conversation.participants.values_list("username", flat=True)), "added": user.username})


class ConversationParticipantView(APIView):
    """DELETE: the owner takes a participant out (a participant may take itself out); their messages stay."""

    @extend_schema(responses={200: dict})
    def delete(self, request, pk, username):
        conversation = conversation_get_owned(user=request.user, conversation_id=pk)
        conversation_participant_remove(conversation=conversation, by=request.user, username=username)
        return Response({"conversation": str(conversation.pk), "participants":
                         sorted(conversation.participants.values_list("username", flat=True)), "removed": username})
