"""The Celery side of background jobs: one task per delivery, which claims the job as a new attempt,
generates with progress and a heartbeat, and stores the result or the error (see chat/jobs.py).

An entry point like the API views: it validates the job's stored request with the API's serializer.
"""

from __future__ import annotations

import logging
import os
import threading
import time

from celery import shared_task
from django.conf import settings
from django.db import DatabaseError, IntegrityError, close_old_connections, connection, transaction
from django.dispatch import receiver
from django.utils import timezone
from rest_framework.exceptions import AuthenticationFailed

from .api.keys import api_keys_valid
from .api.serializers import ChatCompletionRequestSerializer
from .errors import error_from_exception
from .jobs import ACTIVE, job_attempt_rows, job_ended_fields, job_queued, job_turn_is_owners
from .models import Job
from .plans import chat_request_prepare
from .replies import (ReplyRecord, chat_completion_body, content_deleted_late, exchange_store, reply_generate,
                      reply_lookup, reply_remember)
from .tenancy.owners import Tenant
from .tenancy.quotas import quota_job_hold, quota_job_release

logger = logging.getLogger("llmsite.jobs")

MAX_ATTEMPTS = 3
PROGRESS_INTERVAL = 1.0  # seconds between progress writes while generating, at least
# Each write stores the whole text so far, so a long reply's writes would grow with it (a 32K-token job wrote ~100 MB
# a second apart): past this rate the interval grows with the text, the bytes written stay linear in time.
PROGRESS_BYTES_PER_SECOND = 64 * 1024
MAX_DEFERRALS = 64  # times one delivery may go back to the end of the queue to let other owners' jobs go first


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chat_job(job_id: str, deferrals: int = 0) -> None:
    # Not its owner's turn: sent to the back of the queue, where the owner whose turn it is has a delivery too.
    # Bounded, so a job whose turn never comes (that owner's delivery lost with a flushed broker) still runs.
    if (not settings.CELERY_TASK_ALWAYS_EAGER and deferrals < MAX_DEFERRALS
            and not job_turn_is_owners(job_id)):
        run_chat_job.apply_async((job_id,), {"deferrals": deferrals + 1})
        return
    job_run(job_id=job_id)


@receiver(job_queued, dispatch_uid="chat-job-queued")
def enqueue_chat_job(*, job_id: str, **kwargs) -> None:
    run_chat_job.delay(job_id)


def job_run(*, job_id: str) -> None:
    """Run one delivery of a job: claim it as a new attempt, generate, store the result or the error."""
    attempt = _claim(job_id)
    if attempt is None:
        return
    job = Job.objects.select_related("owner", "api_key").get(pk=job_id)
    heartbeat = Heartbeat(job_id=job.pk, attempt=attempt)
    heartbeat.start()
    record = None
    try:
        _creator_still_valid(job)
        serializer = ChatCompletionRequestSerializer(data=job.request)
        serializer.is_valid(raise_exception=True)
        # Metered in the usage ledger; admitted under its quotas when it was submitted (its Job row holds its
        # slots, its reserved tokens are settled by this generation).
        plan = chat_request_prepare(user=job.owner, data=serializer.validated_data, lease_holder=f"job:{job.pk}")
        tenant = Tenant(user=job.owner, api_key=job.api_key, end_user=job.request.get("user") or "")
        admitted = quota_job_hold(tenant, job_id=job.pk,
                                  tokens=plan.prompt.prompt_tokens + plan.params.max_tokens * plan.choices)
        record = reply_lookup(plan, tenant=tenant, admitted=admitted)
        completion = _generate_with_progress(job, attempt, record, heartbeat)
        if completion is None:
            return  # cancelled, or superseded by a newer attempt, while generating
        if completion.finish_reason == "cancelled":
            # Its generation was cancelled from outside: inline (no broker), by the request it ran in, whose client
            # left. Nothing is stored, as for any cancelled reply, and the job says so rather than "done".
            job_attempt_rows(job.pk, attempt).update(**job_ended_fields(Job.Status.CANCELLED))
            return
        if _finish(job_id=job.pk, attempt=attempt, record=record):
            reply_remember(record)
    except Exception as exc:  # every failure ends as a stored error object, never as "running"
        status, body, _ = error_from_exception(exc)
        job_attempt_rows(job.pk, attempt).update(**job_ended_fields(Job.Status.FAILED,
                                                                    error=body["error"] | {"status": status}))
    finally:
        heartbeat.stop()
        quota_job_release(job.pk)  # failed before generating: its reserved tokens go back
        if record is not None:
            record.plan.release_conversation()  # stored, failed, cancelled or superseded: the next may continue


def _creator_still_valid(job: Job) -> None:
    """A job acts as its creator when it runs, perhaps long after it was queued: a key revoked or expired since, or
    an owner deactivated, fails it as that request would fail now (401 invalid_api_key), before generating."""
    if not job.owner.is_active or (job.api_key_id is not None
                                   and not api_keys_valid().filter(pk=job.api_key_id).exists()):
        raise AuthenticationFailed("The API key that created this job was revoked or has expired, or its user was "
                                   "deactivated, before the job ran; nothing was generated.")


def _claim(job_id: str) -> int | None:
    """Start a new attempt; None when there is nothing to run (the job ended) or attempts are used up."""
    job = Job.objects.filter(pk=job_id).first()
    if job is None or job.status not in ACTIVE:
        # Delivered again after it ended (done, failed, cancelled, purged): its outcome is already reported.
        logger.info("job %s delivered again after it ended (%s); nothing to run", job_id,
                    job.status if job else "gone")
        return None
    if job.attempts >= MAX_ATTEMPTS:
        Job.objects.filter(pk=job_id, status__in=ACTIVE).update(**job_ended_fields(
            Job.Status.FAILED, error={"message": f"The job was interrupted {MAX_ATTEMPTS} times; giving up.",
                                      "type": "server_error", "param": None, "code": "worker_lost", "status": 503}))
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


def _finish(*, job_id, attempt: int, record: ReplyRecord) -> bool:
    """Mark the job done and store the exchange in one transaction; False when the attempt lost the job."""
    try:
        with transaction.atomic():
            # The conditional update comes first: it locks the row, so a cancel or a newer attempt
            # waits for this transaction or wins before it, and the exchange is stored at most once.
            if not job_attempt_rows(job_id, attempt).update(**job_ended_fields(
                    Job.Status.DONE, completion_tokens=record.completion.completion_tokens)):
                return False
            exchange_store(record)
            Job.objects.filter(pk=job_id).update(result=chat_completion_body(record))
    except IntegrityError:  # exchange_store's own check is a savepoint here: foreign keys fail at this commit
        raise content_deleted_late() from None
    return True


def _generate_with_progress(job: Job, attempt: int, record: ReplyRecord, heartbeat: "Heartbeat"):
    """Generate, writing the text so far about once a second; None when cancelled or superseded."""
    parts: list[str] = []
    last_report = last_text = 0.0  # the first text is reported at once: clients see the job has started
    text_length = 0  # characters of the text so far: what each write of it stores

    def report(delta: str) -> bool:
        nonlocal last_report, last_text, text_length
        parts.append(delta)
        text_length += len(delta)
        if heartbeat.lost:
            return False
        now = time.monotonic()
        if now - last_report < PROGRESS_INTERVAL:
            return True
        last_report = now
        fields = {"status": Job.Status.RUNNING, "completion_tokens": len(parts)}
        # The text only as often as its length allows; the small write still finds a cancel within the interval
        # (the heartbeat alone would take JOB_HEARTBEAT_TIMEOUT / 4).
        if now - last_text >= text_length / PROGRESS_BYTES_PER_SECOND:
            last_text = now
            fields["partial_text"] = "".join(parts)
        # Zero rows updated: cancelled (DELETE), or a newer attempt took over.
        return bool(job_attempt_rows(job.pk, attempt).update(**fields))

    return reply_generate(record, on_text=report)


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
                    beat = job_attempt_rows(self.job_id, self.attempt).update(status=Job.Status.RUNNING,
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
