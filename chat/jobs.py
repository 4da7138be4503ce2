"""Background chat completions: submit, report, cancel (the worker's side is chat/tasks.py).

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

A job belongs to its owner, the user the creating key acts as (chat/tenancy/owners.py): like
conversations and cached replies, any key of that user sees it, another user's is a 404. An owner has at most
API_MAX_ACTIVE_JOBS jobs queued or running: the broker's queue is first come, first served, so without a bound
one key could queue thousands and put everyone else's jobs behind them. Within the bound, jobs take turns between
owners: a delivery whose owner's turn it is not goes back to the end of the queue (job_turn_is_owners, tasks.py).
"""

from __future__ import annotations

import logging
import uuid
from datetime import timedelta

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Count, Max, Min
from django.dispatch import Signal
from django.utils import timezone

from .errors import ApiError, NotFound
from .models import ApiKey, Job
from .selectors import missing_id_text, uuid_from
from .tenancy.quotas import quota_job_release

logger = logging.getLogger("llmsite.jobs")

ACTIVE = (Job.Status.QUEUED, Job.Status.RUNNING)

# Sent once a new job is committed, with job_id; chat/tasks.py hands it to a Celery worker.
job_queued = Signal()
TOO_MANY_JOBS_RETRY_AFTER = 10  # seconds: about what a job takes
MAX_STORED_NESTING = 200  # levels of lists and objects a stored request may have (JSON Schemas need far fewer)


class TooManyJobs(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "too_many_jobs"


def job_submit(*, user, api_key: ApiKey | None, payload: dict, job_id=None) -> Job:
    """Store the job (`job_id`: chosen by the caller, who admitted it under that id) and queue it on commit."""
    payload = {key: value for key, value in payload.items() if key not in ("background", "stream", "stream_options")}
    if _nesting(payload) > MAX_STORED_NESTING:  # the body parser takes ~940 levels; the JSON column's encoder fewer
        raise ApiError(f"A field of the request nests more than {MAX_STORED_NESTING} levels deep: too deep to be "
                       "stored with a background job.", param="background")
    with transaction.atomic():
        _check_room_for_a_job(user)
        job = Job.objects.create(id=job_id or uuid.uuid4(), owner=user, api_key=api_key, request=payload,
                                 expires_at=timezone.now() + timedelta(seconds=settings.JOB_TTL_SECONDS))
        transaction.on_commit(lambda: job_queued.send(sender=Job, job_id=str(job.pk)))
    return job


def _nesting(value) -> int:
    """How deep lists and objects nest in `value` (iterative: depth costs no stack)."""
    deepest, pending = 0, [(value, 1)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def _check_room_for_a_job(user) -> None:
    limit = settings.API_MAX_ACTIVE_JOBS
    if not limit:
        return
    # The owner's row locked: two submissions at once cannot both take the last place.
    list(get_user_model().objects.select_for_update().filter(pk=user.pk).values_list("pk", flat=True))
    if Job.objects.filter(owner=user, status__in=ACTIVE, expires_at__gt=timezone.now()).count() >= limit:
        raise TooManyJobs(f"At most {limit} of your background jobs may be queued or running at once; submit this "
                          "one when one of them has ended.", param="background", retry_after=TOO_MANY_JOBS_RETRY_AFTER)


def job_get_visible(*, user, job_id) -> Job:
    """The owner's job; another owner's looks exactly like a missing one, and so does a malformed id."""
    parsed = uuid_from(job_id)
    job = None if parsed is None else Job.objects.filter(pk=parsed, owner=user, expires_at__gt=timezone.now()).first()
    if job is None:
        raise NotFound(f"No job {missing_id_text(job_id, parsed=parsed)}.", param="job", code="job_not_found")
    _recover_if_worker_lost(job)
    return job


def job_cancel(*, user, job_id) -> Job:
    """Cancel a job the caller may see (a no-op for one that has ended)."""
    job = job_get_visible(user=user, job_id=job_id)
    Job.objects.filter(pk=job.pk, status__in=ACTIVE).update(**job_ended_fields(Job.Status.CANCELLED))
    quota_job_release(job.pk)  # cancelled while queued: its reserved tokens go back (a running one's are its worker's)
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


def job_turn_is_owners(job_id) -> bool:
    """Whether the queued job's owner is the one whose turn it is: the broker delivers jobs first come, first
    served, so one owner's API_MAX_ACTIVE_JOBS submitted at once would otherwise all run before another owner's
    one job sent a moment later. The turn is the owner with a job queued that has the fewest jobs running, then
    whose latest job started longest ago (never is longest), then whose oldest queued job is oldest. A job that
    is not queued (running again after its worker was lost, ended, gone) is not held back."""
    job = Job.objects.filter(pk=job_id, status=Job.Status.QUEUED).values("owner_id").first()
    if job is None:
        return True
    waiting = dict(Job.objects.filter(status=Job.Status.QUEUED, expires_at__gt=timezone.now())
                   .values("owner_id").annotate(oldest=Min("created_at")).values_list("owner_id", "oldest"))
    if set(waiting) <= {job["owner_id"]} or job["owner_id"] not in waiting:
        return True
    owners = list(waiting)
    running = dict(Job.objects.filter(status=Job.Status.RUNNING, owner_id__in=owners)
                   .values("owner_id").annotate(count=Count("pk")).values_list("owner_id", "count"))
    started = dict(Job.objects.filter(owner_id__in=owners, started_at__isnull=False)
                   .values("owner_id").annotate(last=Max("started_at")).values_list("owner_id", "last"))
    never = timezone.now() - timedelta(days=36500)
    turn = min(owners, key=lambda owner: (running.get(owner, 0), started.get(owner) or never, waiting[owner], owner))
    return turn == job["owner_id"]


def job_url(job: Job) -> str:
    return f"/v1/jobs/{job.pk}"


def job_ended_fields(status: str, **fields) -> dict:
    """The update that ends a job (done, failed or cancelled): its status, the time, and its stored request and
    text so far dropped.

    Nothing reads either once the job has ended (a re-delivery sees the status and stops: tasks._claim; a poll shows
    text so far only while running). An ended row stays until purge_jobs deletes it, JOB_TTL_SECONDS later, yet takes
    no place under API_MAX_ACTIVE_JOBS: kept, a loop of submit and cancel would store a request of up to a megabyte
    each time, tens of megabytes a minute.
    """
    return {"status": status, "finished_at": timezone.now(), "request": {}, "partial_text": "", **fields}


def job_attempt_rows(job_id, attempt: int):
    """The job's row while this attempt still owns it: not ended, and no newer attempt has claimed it.

    It may read "queued" when a poll missed a heartbeat; the attempt's next write sets "running" again.
    """
    return Job.objects.filter(pk=job_id, status__in=ACTIVE, attempts=attempt)


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
        stale.update(**job_ended_fields(
            Job.Status.FAILED, error={"message": "The worker running this job stopped responding.",
                                      "type": "server_error", "param": None, "code": "worker_lost", "status": 503}))
    elif stale.update(status=Job.Status.QUEUED, partial_text="", completion_tokens=0):
        logger.warning("job %s: no heartbeat from attempt %s; waiting for its re-delivery", job.pk, job.attempts)
    job.refresh_from_db()


def jobs_purge_expired() -> int:
    return Job.objects.filter(expires_at__lte=timezone.now()).delete()[0]
