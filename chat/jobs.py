"""Background chat completions: submit, run in a Celery worker, report, cancel.

Delivery: tasks are acknowledged late and rejected when their worker process dies, so the broker
delivers them again (chat/tasks.py); a job whose worker stopped reporting for
JOB_HEARTBEAT_TIMEOUT seconds is marked failed, so nothing stays "running" forever.
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from .errors import NotFound, error_from_exception
from .models import ApiKey, Job
from .response_cache import cached_completion, remember_completion
from .services import chat_completion_body, chat_exchange_store, chat_request_prepare, generate_observed

logger = logging.getLogger("llmsite.jobs")

ACTIVE = (Job.Status.QUEUED, Job.Status.RUNNING)
MAX_ATTEMPTS = 3
PROGRESS_INTERVAL = 1.0  # seconds between progress writes while generating


def wants_background(data: dict) -> bool:
    max_tokens = data.get("max_completion_tokens") or data.get("max_tokens") or 0
    return bool(data.get("background")) or max_tokens > settings.BACKGROUND_MAX_TOKENS_THRESHOLD


def api_key_of(request) -> ApiKey | None:
    return request.auth if isinstance(request.auth, ApiKey) else None


def job_submit(*, user, api_key: ApiKey | None, payload: dict) -> Job:
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
    _fail_if_worker_lost(job)
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


def job_run(*, job_id: str) -> None:
    """The worker's side: generate, reporting progress, and store the result (or the error)."""
    started = Job.objects.filter(pk=job_id, status__in=ACTIVE, attempts__lt=MAX_ATTEMPTS).update(
        status=Job.Status.RUNNING, started_at=timezone.now(), heartbeat_at=timezone.now(),
        attempts=F("attempts") + 1, worker_pid=os.getpid(), partial_text="", completion_tokens=0)
    if not started:
        _fail_exhausted(job_id)
        return
    job = Job.objects.select_related("owner").get(pk=job_id)
    try:
        from .serializers import ChatCompletionRequestSerializer

        serializer = ChatCompletionRequestSerializer(data=job.request)
        serializer.is_valid(raise_exception=True)
        plan = chat_request_prepare(user=job.owner, data=serializer.validated_data)
        completion = cached_completion(plan) or _generate_with_progress(job, plan)
        if completion is None:  # cancelled while generating
            return
        remember_completion(plan, completion)
        conversation = chat_exchange_store(plan=plan, completion=completion)
        result = chat_completion_body(plan=plan, completion=completion, conversation=conversation)
        Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(
            status=Job.Status.DONE, result=result, finished_at=timezone.now(), partial_text="",
            completion_tokens=completion.completion_tokens)
    except Exception as exc:  # every failure ends as a stored error object, never as "running"
        status, body, _ = error_from_exception(exc)
        Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(
            status=Job.Status.FAILED, error=body["error"] | {"status": status}, finished_at=timezone.now())


def _generate_with_progress(job: Job, plan):
    """Generate, writing progress (text so far, a heartbeat) about once a second; None when cancelled."""
    parts: list[str] = []
    last_report = 0.0  # the first text is reported at once: clients see the job has started

    def report(delta: str) -> bool:
        nonlocal last_report
        parts.append(delta)
        if time.monotonic() - last_report < PROGRESS_INTERVAL:
            return True
        last_report = time.monotonic()
        # Zero rows updated: cancelled (DELETE) or failed by the stale-worker check.
        return bool(Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING).update(
            heartbeat_at=timezone.now(), completion_tokens=len(parts), partial_text="".join(parts)))

    return generate_observed(plan, on_text=report)


def _fail_if_worker_lost(job: Job) -> None:
    if job.status != Job.Status.RUNNING or job.heartbeat_at is None:
        return
    if timezone.now() - job.heartbeat_at > timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT):
        Job.objects.filter(pk=job.pk, status=Job.Status.RUNNING, heartbeat_at=job.heartbeat_at).update(
            status=Job.Status.FAILED, finished_at=timezone.now(),
            error={"message": "The worker running this job stopped responding.", "type": "server_error",
                   "param": None, "code": "worker_lost", "status": 503})
        job.refresh_from_db()


def _fail_exhausted(job_id: str) -> None:
    Job.objects.filter(pk=job_id, status__in=ACTIVE, attempts__gte=MAX_ATTEMPTS).update(
        status=Job.Status.FAILED, finished_at=timezone.now(),
        error={"message": f"The job was interrupted {MAX_ATTEMPTS} times; giving up.", "type": "server_error",
               "param": None, "code": "worker_lost", "status": 503})


def jobs_purge_expired() -> int:
    return Job.objects.filter(expires_at__lte=timezone.now()).delete()[0]
