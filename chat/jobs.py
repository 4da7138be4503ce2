"""Background chat completions: submit, run in a Celery worker, report, cancel.

Only a request with `background: true` becomes a job. Delivery: tasks are acknowledged late and
rejected when their worker process dies, so the broker delivers them again (chat/tasks.py); that
is the only way a job runs again, so no job runs twice at once unless it outlives the broker's
visibility timeout. Each delivery claims the job as a new attempt, and every later write of an
attempt (heartbeat, progress, result) is conditioned on that attempt number: a superseded attempt
can neither report nor store anything. While an attempt runs, a timer thread writes a heartbeat
every JOB_HEARTBEAT_TIMEOUT / 4 seconds, prompt evaluation included. A running job with no
heartbeat for JOB_HEARTBEAT_TIMEOUT seconds has lost its worker: polls show it queued (waiting for
its re-delivery; failed with no broker, which would never re-deliver it), and a delivery after
MAX_ATTEMPTS reports it failed, so no job stays "running" or is silently dropped. The exchange is
stored in the same transaction that marks the job done, so it is stored exactly once.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from datetime import timedelta

from django.conf import settings
from django.db import DatabaseError, close_old_connections, connection, transaction
from django.utils import timezone

from .errors import NotFound, error_from_exception
from .models import ApiKey, Job
from .response_cache import cached_completion, remember_completion
from .serializers import ChatCompletionRequestSerializer
from .services import chat_completion_body, chat_exchange_store, chat_request_prepare, generate_observed

logger = logging.getLogger("llmsite.jobs")

ACTIVE = (Job.Status.QUEUED, Job.Status.RUNNING)
MAX_ATTEMPTS = 3
PROGRESS_INTERVAL = 1.0  # seconds between progress writes while generating


def api_key_of(request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


def job_submit(*, user, api_key: ApiKey | None, payload: dict) -> Job:
    # chat.tasks wraps job_run from this module, so it can only be imported once this module is loaded.
    from .tasks import run_chat_job

    payload = {key: value for key, value in payload.items() if key not in ("background", "stream", "stream_options")}
    job = Job.objects.create(owner=user, api_key=api_key, request=payload,
                             expires_at=timezone.now() + timedelta(seconds=settings.JOB_TTL_SECONDS))
    transaction.on_commit(lambda: run_chat_job.delay(str(job.pk)))
    return job


def job_get_visible(*, user, api_key: ApiKey | None, job_id) -> Job:
    job = Job.objects.filter(pk=job_id, owner=user, api_key=api_key, expires_at__gt=timezone.now()).first()
    if job is None:
        raise NotFound(f"No job {job_id}.", param="job", code="job_not_found")
    _recover_if_worker_lost(job)
    return job


def job_cancel(*, job: Job) -> Job:
    Job.objects.filter(pk=job.pk, status__in=ACTIVE).update(status=Job.Status.CANCELLED, finished_at=timezone.now())
    job.refresh_from_db()
    return job


def job_body(job: Job) -> dict:
    body = {"id": str(job.pk), "object": "chat.completion.job", "status": job.status,
            "created": int(job.created_at.timestamp()), "url": job_url(job),
            "completion_tokens": job.completion_tokens, "attempts": job.attempts}
    if job.status == Job.Status.RUNNING:
        body["text_so_far"] = job.partial_text
    if job.result is not None:
        body["result"] = job.result
    if job.error is not None:
        body["error"] = job.error
    return body


def job_url(job: Job) -> str:
    return f"/v1/jobs/{job.pk}"


# --- The worker's side ----------------------------------------------------------------------------


def job_run(*, job_id: str) -> None:
    """Run one delivery of a job: claim it as a new attempt, generate, store the result or the error."""
    attempt = _claim(job_id)
    if attempt is None:
        return
    job = Job.objects.select_related("owner").get(pk=job_id)
    heartbeat = Heartbeat(job_id=job.pk, attempt=attempt)
    heartbeat.start()
    try:
        serializer = ChatCompletionRequestSerializer(data=job.request)
        serializer.is_valid(raise_exception=True)
        plan = chat_request_prepare(user=job.owner, data=serializer.validated_data)
        completion = cached_completion(plan) or _generate_with_progress(job, attempt, plan, heartbeat)
        if completion is None:  # cancelled, or superseded by a newer attempt, while generating
            return
        if _finish(job_id=job.pk, attempt=attempt, plan=plan, completion=completion):
            remember_completion(plan, completion)
    except Exception as exc:  # every failure ends as a stored error object, never as "running"
        status, body, _ = error_from_exception(exc)
        _mine(job.pk, attempt).update(status=Job.Status.FAILED, error=body["error"] | {"status": status},
                                      finished_at=timezone.now())
    finally:
        heartbeat.stop()


def _mine(job_id, attempt: int):
    """The job's row while this attempt still owns it: not ended, and no newer attempt has claimed it.

    It may read "queued" when a poll missed a heartbeat; the attempt's next write sets "running" again.
    """
    return Job.objects.filter(pk=job_id, status__in=ACTIVE, attempts=attempt)


def _claim(job_id: str) -> int | None:
    """Start a new attempt; None when there is nothing to run (the job ended) or attempts are used up."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.status not in ACTIVE:
        # Delivered again after it ended (done, failed, cancelled, purged): its outcome is already reported.
        logger.info("job %s delivered again after it ended (%s); nothing to run", job_id,
                    job.status if job else "gone")
        return None
    if job.attempts >= MAX_ATTEMPTS:
        Job.objects.filter(pk=job_id, status__in=ACTIVE).update(
            status=Job.Status.FAILED, finished_at=timezone.now(),
            error={"message": f"The job was interrupted {MAX_ATTEMPTS} times; giving up.", "type": "server_error",
                   "param": None, "code": "worker_lost", "status": 503})
        return None
    # A running job delivered again lost its worker (the broker re-delivers only unacknowledged
    # tasks): the new attempt takes over, and the old one, if it still lives, is fenced off.
    now = timezone.now()
    claimed = Job.objects.filter(pk=job_id, status__in=ACTIVE, attempts=job.attempts).update(
        status=Job.Status.RUNNING, started_at=now, heartbeat_at=now, attempts=job.attempts + 1,
        worker_pid=os.getpid(), partial_text="", completion_tokens=0)
    if not claimed:  # another delivery claimed it between our read and our write: that one runs it
        logger.info("job %s claimed by another delivery", job_id)
        return None
    return job.attempts + 1


def _finish(*, job_id, attempt: int, plan, completion) -> bool:
    """Mark the job done and store the exchange in one transaction; False when the attempt lost the job."""
    with transaction.atomic():
        # The conditional update comes first: it locks the row, so a cancel or a newer attempt
        # waits for this transaction or wins before it, and the exchange is stored at most once.
        if not _mine(job_id, attempt).update(status=Job.Status.DONE, finished_at=timezone.now(), partial_text="",
                                             completion_tokens=completion.completion_tokens):
            return False
        conversation = chat_exchange_store(plan=plan, completion=completion)
        result = chat_completion_body(plan=plan, completion=completion, conversation=conversation)
        Job.objects.filter(pk=job_id).update(result=result)
    return True


def _generate_with_progress(job: Job, attempt: int, plan, heartbeat: "Heartbeat"):
    """Generate, writing the text so far about once a second; None when cancelled or superseded."""
    parts: list[str] = []
    last_report = 0.0  # the first text is reported at once: clients see the job has started

    def report(delta: str) -> bool:
        nonlocal last_report
        parts.append(delta)
        if heartbeat.lost:
            return False
        if time.monotonic() - last_report < PROGRESS_INTERVAL:
            return True
        last_report = time.monotonic()
        # Zero rows updated: cancelled (DELETE), or a newer attempt took over.
        return bool(_mine(job.pk, attempt).update(status=Job.Status.RUNNING, completion_tokens=len(parts),
                                                  partial_text="".join(parts)))

    return generate_observed(plan, on_text=report)


class Heartbeat:
    """A timer thread that tells pollers this attempt is alive, whatever the generation is doing."""

    def __init__(self, *, job_id, attempt: int):
        self.job_id, self.attempt = job_id, attempt
        self.interval = max(settings.JOB_HEARTBEAT_TIMEOUT / 4, 0.05)
        self.lost = False  # the job was cancelled or taken over: the generation should stop
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"job-heartbeat-{job_id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join(timeout=self.interval + 5)

    def _run(self) -> None:
        try:
            while not self._stopped.wait(self.interval):
                try:
                    beat = _mine(self.job_id, self.attempt).update(status=Job.Status.RUNNING,
                                                                   heartbeat_at=timezone.now())
                except DatabaseError:  # e.g. a locked database: the next beat tries again
                    logger.warning("job %s: heartbeat not written", self.job_id, exc_info=True)
                    close_old_connections()
                    continue
                if not beat:
                    self.lost = True
                    return
        finally:
            connection.close()  # this thread's own connection


def _recover_if_worker_lost(job: Job) -> None:
    """A running job whose heartbeat stopped lost its worker: show it queued for its re-delivery."""
    if job.status != Job.Status.RUNNING or job.heartbeat_at is None:
        return
    if timezone.now() - job.heartbeat_at <= timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT):
        return
    stale = Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, attempts=job.attempts,
                               heartbeat_at=job.heartbeat_at)
    if settings.CELERY_TASK_ALWAYS_EAGER:
        # No broker: the job ran inside a web request whose process died; nothing will deliver it again.
        stale.update(status=Job.Status.FAILED, finished_at=timezone.now(),
                     error={"message": "The worker running this job stopped responding.", "type": "server_error",
                            "param": None, "code": "worker_lost", "status": 503})
    elif stale.update(status=Job.Status.QUEUED, partial_text="", completion_tokens=0):
        logger.warning("job %s: no heartbeat from attempt %s; waiting for its re-delivery", job.pk, job.attempts)
    job.refresh_from_db()


def jobs_purge_expired() -> int:
    return Job.objects.filter(expires_at__lte=timezone.now()).delete()[0]
