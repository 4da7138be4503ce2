"""Celery application: settings come from Django's (CELERY_*), tasks from each app's tasks.py."""

import os
import signal
import threading

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


_drain_timer: threading.Timer | None = None


@signals.worker_shutting_down.connect(weak=False)
def bound_the_warm_shutdown(how: str = "", **_):
    """SIGTERM starts Celery's warm shutdown, which waits for the running job however long it takes. After
    WORKER_DRAIN_TIMEOUT seconds this turns it into a cold shutdown: the job's process stops, and its message,
    acknowledged late, goes back to the broker for another worker (the job's next attempt)."""
    from django.conf import settings

    global _drain_timer
    if how != "Warm" or settings.WORKER_DRAIN_TIMEOUT <= 0 or _drain_timer is not None:
        return  # a second SIGTERM does not move the bound
    _drain_timer = threading.Timer(settings.WORKER_DRAIN_TIMEOUT, os.kill, (os.getpid(), signal.SIGQUIT))
    _drain_timer.daemon = True
    _drain_timer.start()


@signals.worker_process_shutdown.connect(weak=False)
def close_the_engines(**_):
    """A pool process that ends closes its models: with `state_dir` set, every slot's conversation goes to disk."""
    from chat.engines import reset_registry

    reset_registry()
