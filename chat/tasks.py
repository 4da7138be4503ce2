"""Celery tasks: thin wrappers that call a service."""

from celery import shared_task

from .jobs import job_run


@shared_task(acks_late=True, reject_on_worker_lost=True, ignore_result=True)
def run_chat_job(job_id: str) -> None:
    job_run(job_id=job_id)
