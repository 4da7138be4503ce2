from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"
    # No model loading here: ready() runs for every management command (see chat/inference.py).
