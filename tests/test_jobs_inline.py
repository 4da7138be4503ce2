"""With no broker (the embedded default) background jobs run inline and the same endpoints work."""

import pytest
from rest_framework.test import APIClient

from chat.api_keys import api_key_create

pytestmark = [pytest.mark.smollm2, pytest.mark.django_db]


def test_background_job_runs_inline_without_redis(django_user_model, settings, django_capture_on_commit_callbacks):
    assert settings.CELERY_TASK_ALWAYS_EAGER
    _, raw_key = api_key_create(user=django_user_model.objects.create_user("solo"), name="k")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "background": True},
            format="json")
    assert response.status_code == 202
    job = client.get(response.json()["url"]).json()
    assert job["status"] == "done" and job["result"]["choices"][0]["message"]["content"]
    assert client.delete(response.json()["url"]).json()["status"] == "done"  # finished jobs stay finished
    other = APIClient()
    _, other_key = api_key_create(user=django_user_model.objects.create_user("other"), name="k")
    other.credentials(HTTP_AUTHORIZATION=f"Bearer {other_key}")
    assert other.get(response.json()["url"]).status_code == 404


def test_expired_jobs_are_invisible_and_purged(django_user_model):
    from datetime import timedelta
    from io import StringIO

    from django.core.management import call_command
    from django.utils import timezone

    from chat.models import Job

    user = django_user_model.objects.create_user("old")
    key, raw_key = api_key_create(user=user, name="k")
    job = Job.objects.create(owner=user, api_key=key, request={}, status=Job.Status.DONE,
                             expires_at=timezone.now() - timedelta(seconds=1))
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw_key}")
    assert client.get(f"/v1/jobs/{job.pk}").status_code == 404
    out = StringIO()
    call_command("purge_jobs", stdout=out)
    assert "Deleted 1 expired job" in out.getvalue() and not Job.objects.exists()
