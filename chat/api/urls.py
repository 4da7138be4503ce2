from django.urls import include, path

from . import conversation_ops, views

urlpatterns = [
    path("chat/completions", views.ChatCompletionsView.as_view(), name="chat-completions"),
    path("completions", views.CompletionsView.as_view(), name="completions"),
    path("jobs/<uuid:pk>", views.JobView.as_view(), name="job"),
    path("usage", views.UsageView.as_view(), name="usage"),
    path("usage/", views.UsageSlashView.as_view()),
    path("models", views.ModelListView.as_view(), name="models"),
    path("models/<path:model_id>", views.ModelDetailView.as_view(), name="model-detail"),
    path("characters/", views.CharacterListView.as_view(), name="character-list"),
    path("characters/<slug:slug>/", views.CharacterDetailView.as_view(), name="character-detail"),
    path("conversations/", views.ConversationListView.as_view(), name="conversation-list"),
    path("conversations/<uuid:pk>/", views.ConversationDetailView.as_view(), name="conversation-detail"),
    path("conversations/<uuid:pk>/messages/", views.ConversationMessagesView.as_view(), name="conversation-messages"),
    path("conversations/<uuid:pk>/", include(conversation_ops.urlpatterns)),  # the tree's operations
]
