from django.apps import AppConfig


class ChatConfig(AppConfig):
    name = "chat"
    verbose_name = "Chat"
    # No model loading here: ready() runs for every management command (see chat/engines.py).

    def ready(self):
        from django.db.models.signals import post_delete, post_save

        from characters.models import Character, SystemPrompt
        from scenarios.models import Scenario

        from . import tasks  # noqa: F401  connects job_queued: a submitted job goes to a Celery worker
        from .response_cache import content_changed

        for model in (Character, Scenario, SystemPrompt):
            post_save.connect(content_changed, sender=model, dispatch_uid=f"content-version-save-{model.__name__}")
            post_delete.connect(content_changed, sender=model, dispatch_uid=f"content-version-del-{model.__name__}")
