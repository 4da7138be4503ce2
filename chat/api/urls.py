"""Routes of /v1/. Every endpoint answers with and without a trailing slash (OpenAI-style clients build paths
without one, Django-style ones with one); the second spelling is served directly, never redirected (a redirected
POST loses its body), and left out of the schema so each operation is documented once."""

import uuid

from django.urls import path, register_converter
from drf_spectacular.utils import extend_schema

from llmsite.digits import is_decimal

from . import conversation_ops, groups, responses, views


class UUIDLookupConverter:
    """Any one segment: a UUID when it reads as one, else the text as sent, which the lookup answers with its
    resource's 404 (`conversation_not_found`, `job_not_found`...), not the catch-all's "No API endpoint"."""

    regex = "[^/]+"

    def to_python(self, value: str) -> uuid.UUID | str:
        try:
            return uuid.UUID(value)
        except ValueError:
            return value

    def to_url(self, value) -> str:
        return str(value)


class IntLookupConverter:
    """Any one segment: an int when it is a number that a 64-bit id may be, else the text as sent, answered
    `message_not_found` by the lookup."""

    regex = "[^/]+"

    def to_python(self, value: str) -> int | str:
        return int(value) if is_decimal(value, max_digits=19) else value

    def to_url(self, value) -> str:
        return str(value)


# Documented as what they look up (llmsite/settings.py: SPECTACULAR_SETTINGS["PATH_CONVERTER_OVERRIDES"]).
register_converter(UUIDLookupConverter, "lookup_uuid")
register_converter(IntLookupConverter, "lookup_int")


def both(route: str, view_class, name: str | None = None, *, slash: bool = False) -> list:
    """`route` as documented (with a trailing slash when `slash`), and its other spelling as an undocumented alias."""
    alias = extend_schema(exclude=True)(type(f"{view_class.__name__}Alias", (view_class,), {}))
    documented, other = (route + "/", route) if slash else (route, route + "/")
    return [path(documented, view_class.as_view(), name=name), path(other, alias.as_view())]


MESSAGE = "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>"

urlpatterns = [
    *both("chat/completions", views.ChatCompletionsView, "chat-completions"),
    *both("completions", views.CompletionsView, "completions"),
    *both("responses", responses.ResponsesView, "responses"),
    *both("responses/<str:response_id>", responses.ResponseDetailView, "response-detail"),
    *both("jobs/<lookup_uuid:pk>", views.JobView, "job"),
    *both("usage", views.UsageView, "usage"),
    *both("models", views.ModelListView, "models"),
    # A model id may contain slashes ("org/name"): the alias with the trailing slash goes first, or the id would
    # swallow the slash.
    *reversed(both("models/<path:model_id>", views.ModelDetailView, "model-detail")),
    *both("characters", views.CharacterListView, "character-list", slash=True),
    *both("characters/<str:slug>", views.CharacterDetailView, "character-detail", slash=True),
    *both("conversations", views.ConversationListView, "conversation-list", slash=True),
    *both("conversations/<lookup_uuid:pk>", views.ConversationDetailView, "conversation-detail", slash=True),
    *both("conversations/<lookup_uuid:pk>/messages", views.ConversationMessagesView, "conversation-messages",
          slash=True),
    *both("conversations/<lookup_uuid:pk>/participants", groups.ConversationParticipantsView,
          "conversation-participants", slash=True),
    *both("conversations/<lookup_uuid:pk>/participants/<str:username>", groups.ConversationParticipantView,
          "conversation-participant", slash=True),
    *both("invitations", groups.InvitationListView, "invitation-list", slash=True),
    *both("invitations/<lookup_uuid:pk>", groups.InvitationView, "invitation-detail", slash=True),
    *both("invitations/<lookup_uuid:pk>/accept", groups.InvitationAcceptView, "invitation-accept", slash=True),
    *both("groups", groups.GroupListView, "group-list", slash=True),
    # The tree's operations (chat/api/conversation_ops.py).
    *both("conversations/<lookup_uuid:pk>/path", conversation_ops.ConversationPathView, "conversation-path",
          slash=True),
    *both("conversations/<lookup_uuid:pk>/stop", conversation_ops.StopView, "conversation-stop", slash=True),
    *both("conversations/<lookup_uuid:pk>/reply", conversation_ops.RunningReplyView, "conversation-reply",
          slash=True),
    *both(MESSAGE, conversation_ops.MessageDetailView, "message-detail", slash=True),
    *both(f"{MESSAGE}/alternatives", conversation_ops.MessageAlternativesView, "message-alternatives", slash=True),
    *both(f"{MESSAGE}/select", conversation_ops.MessageSelectView, "message-select", slash=True),
    *both(f"{MESSAGE}/regenerate", conversation_ops.RegenerateView, "message-regenerate", slash=True),
    *both(f"{MESSAGE}/edit", conversation_ops.EditView, "message-edit", slash=True),
    *both(f"{MESSAGE}/continue", conversation_ops.ContinueView, "message-continue", slash=True),
]
