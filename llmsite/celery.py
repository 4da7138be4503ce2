"""Celery application: settings come from Django's (CELERY_*), tasks from each app's tasks.py."""

import os

from celery import Celery, signals

from llmsite import log_context

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")

app = Celery("llmsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

# Log lines of a task carry the id of the request that queued it (llmsite/log_context.py).
signals.before_task_publish.connect(log_context.attach_to_task_message, weak=False)
signals.task_prerun.connect(log_context.bind_from_task, weak=False)
signals.task_postrun.connect(log_context.unbind_after_task, weak=False)


@signals.celeryd_init.connect(weak=False)
def serve_worker_metrics(**_):
    """A worker's generations are counted in its pool processes; WORKER_METRICS_PORT serves their sum."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT:
        from llmsite.worker_metrics import worker_metrics_serve

        worker_metrics_serve(host=settings.WORKER_METRICS_HOST, port=settings.WORKER_METRICS_PORT)
