"""Background jobs in-process: inline with no broker (the embedded default), re-delivery, exactly-once storage."""

import pytest
from tests.factories import import_demo_resources, make_api_client

pytestmark = [pytest.mark.smollm2, pytest.mark.django_db]


def test_large_max_tokens_is_answered_at_once_not_as_a_job(django_user_model):
    client = make_api_client("big")
    response = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Say hello."}],
                                                    "max_tokens": 1500, "temperature": 0.5}, format="json")
    assert response.status_code == 200 and response.json()["object"] == "chat.completion"


def test_background_job_runs_inline_without_redis(django_user_model, settings, django_capture_on_commit_callbacks):
    from chat.models import Job

    assert settings.CELERY_TASK_ALWAYS_EAGER
    client = make_api_client("solo")
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8, "background": True},
            format="json")
    assert response.status_code == 202
    job = client.get(response.json()["url"]).json()
    assert job["status"] == "done" and job["result"]["choices"][0]["message"]["content"]
    assert client.delete(response.json()["url"]).json()["status"] == "done"  # finished jobs stay finished
    assert Job.objects.get().request == {}  # nothing reads it once the job has ended
    other = make_api_client("other")
    assert other.get(response.json()["url"]).status_code == 404


def test_expired_jobs_are_invisible_and_purged(django_user_model):
    from datetime import timedelta
    from io import StringIO

    from django.core.management import call_command
    from django.utils import timezone

    from chat.models import Job

    client = make_api_client("old")
    job = Job.objects.create(owner=client.user, api_key=client.key, request={}, status=Job.Status.DONE,
                             expires_at=timezone.now() - timedelta(seconds=1))
    assert client.get(f"/v1/jobs/{job.pk}").status_code == 404
    out = StringIO()
    call_command("purge_jobs", stdout=out)
    assert "Deleted 1 expired job" in out.getvalue() and not Job.objects.exists()


def _job(user, request, **fields):
    from datetime import timedelta

    from django.utils import timezone

    from chat.models import Job

    return Job.objects.create(owner=user, request=request, expires_at=timezone.now() + timedelta(hours=1), **fields)


CHAT_JOB = {"messages": [{"role": "user", "content": "Ciao! What do you cook today?"}], "character": "chef-luca",
            "max_tokens": 12, "temperature": 0.9}


def test_a_re_delivered_job_runs_again_and_its_exchange_is_stored_once(django_user_model):
    """The broker delivers a job again when its worker died mid-attempt; a later duplicate finds it done."""
    from django.utils import timezone

    from chat.tasks import job_run
    from chat.models import Message

    import_demo_resources()
    user = django_user_model.objects.create_user("redelivered")
    # Attempt 1 claimed the job and died before storing anything.
    job = _job(user, CHAT_JOB, status="running", attempts=1, started_at=timezone.now(), heartbeat_at=timezone.now())
    job_run(job_id=str(job.pk))  # the re-delivery
    job.refresh_from_db()
    assert (job.status, job.attempts) == ("done", 2), job.error
    conversation = job.result["conversation"]
    stored = list(Message.objects.filter(conversation_id=conversation).values_list("role", "content"))
    assert stored == [("user", "Ciao! What do you cook today?"),
                      ("assistant", job.result["choices"][0]["message"]["content"])]
    assert job.request == {}  # dropped when the job ended: the duplicate delivery below must not need it
    job_run(job_id=str(job.pk))  # a duplicate delivery after the job ended changes nothing
    job.refresh_from_db()
    assert (job.status, job.attempts, job.request) == ("done", 2, {})
    assert Message.objects.filter(conversation_id=conversation).count() == 2


def test_a_job_out_of_attempts_is_reported_failed_not_dropped(django_user_model):
    from chat.tasks import MAX_ATTEMPTS, job_run

    job = _job(django_user_model.objects.create_user("unlucky"), CHAT_JOB, status="running", attempts=MAX_ATTEMPTS)
    job_run(job_id=str(job.pk))
    job.refresh_from_db()
    assert job.status == "failed" and job.error["code"] == "worker_lost" and job.result is None
    assert job.request == {}


@pytest.mark.parametrize(("eager", "expected"), [(False, "queued"), (True, "failed")])
def test_a_job_without_heartbeat_waits_for_its_re_delivery(django_user_model, settings, eager, expected):
    """With a broker the job shows queued until delivered again; without one nothing would run it: failed."""
    from datetime import timedelta

    from django.utils import timezone

    settings.CELERY_TASK_ALWAYS_EAGER = eager
    settings.JOB_HEARTBEAT_TIMEOUT = 5
    client = make_api_client("lost")
    user, key = client.user, client.key
    long_ago = timezone.now() - timedelta(seconds=6)
    job = _job(user, CHAT_JOB, api_key=key, status="running", attempts=1, heartbeat_at=long_ago)
    fresh = _job(user, CHAT_JOB, api_key=key, status="running", attempts=1, heartbeat_at=timezone.now())
    assert client.get(f"/v1/jobs/{job.pk}").json()["status"] == expected
    assert client.get(f"/v1/jobs/{fresh.pk}").json()["status"] == "running"
    job.refresh_from_db()
    assert job.request == ({} if expected == "failed" else CHAT_JOB)  # a job waiting for re-delivery still needs it


def test_a_cancelled_job_stores_nothing_when_its_attempt_ends(django_user_model):
    """The attempt's result is written only while it owns the job: a cancel in between wins."""
    from django.utils import timezone

    from chat import tasks
    from chat.models import Conversation, Job
    from chat.api.serializers import ChatCompletionRequestSerializer
    from chat.plans import chat_request_prepare
    from chat.replies import reply_generate, reply_lookup

    import_demo_resources()
    user = django_user_model.objects.create_user("canceller")
    job = _job(user, CHAT_JOB, status="running", attempts=1, heartbeat_at=timezone.now())
    serializer = ChatCompletionRequestSerializer(data=CHAT_JOB)
    serializer.is_valid(raise_exception=True)
    record = reply_lookup(chat_request_prepare(user=user, data=serializer.validated_data))
    reply_generate(record)
    Job.objects.filter(pk=job.pk).update(status="cancelled")  # DELETE /v1/jobs/<id> while it generated
    assert not tasks._finish(job_id=job.pk, attempt=1, record=record)
    assert not Conversation.objects.exists()
    Job.objects.filter(pk=job.pk).update(status="running", attempts=2)  # or a newer attempt took over
    assert not tasks._finish(job_id=job.pk, attempt=1, record=record)
    assert not Conversation.objects.exists()
    assert tasks._finish(job_id=job.pk, attempt=2, record=record)
    assert Conversation.objects.get().messages.count() == 2


def test_a_cancelled_job_drops_its_stored_request(django_user_model):
    """An ended job takes no place under API_MAX_ACTIVE_JOBS but stays until purged: a loop of submit and cancel
    must not store every request (up to a megabyte each) for a day."""
    from chat.models import Job
    from chat.tasks import job_run

    client = make_api_client("looper")
    body = {"messages": [{"role": "user", "content": "x" * 1_000}], "max_tokens": 4, "background": True}
    url = client.post("/v1/chat/completions", body, format="json").json()["url"]  # queued: not run (no commit)
    job = Job.objects.get()
    assert job.request["messages"][0]["content"] == "x" * 1_000
    assert client.delete(url).json()["status"] == "cancelled"
    job.refresh_from_db()
    assert (job.status, job.request) == ("cancelled", {})
    job_run(job_id=str(job.pk))  # its delivery, arriving after the cancel, runs nothing
    job.refresh_from_db()
    assert (job.status, job.attempts, job.result) == ("cancelled", 0, None)


def test_an_owner_has_a_bounded_number_of_jobs_queued_or_running(django_user_model, settings,
                                                                  django_capture_on_commit_callbacks):
    """The broker's queue is first come, first served: one key must not queue thousands ahead of everyone."""
    from datetime import timedelta

    from django.utils import timezone

    from chat.models import Job

    settings.API_MAX_ACTIVE_JOBS = 2
    body = {"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 4, "background": True}
    client, other = make_api_client("queuer"), make_api_client("neighbour")
    _job(client.user, {}, status=Job.Status.QUEUED)
    _job(client.user, {}, status=Job.Status.RUNNING)
    _job(client.user, {}, status=Job.Status.DONE)  # ended jobs and expired ones take no place
    Job.objects.create(owner=client.user, request={}, status=Job.Status.QUEUED,
                       expires_at=timezone.now() - timedelta(seconds=1))
    refused = client.post("/v1/chat/completions", body, format="json")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "too_many_jobs"
    assert int(refused["Retry-After"]) > 0 and Job.objects.filter(owner=client.user).count() == 4
    with django_capture_on_commit_callbacks(execute=True):
        assert other.post("/v1/chat/completions", body, format="json").status_code == 202
    Job.objects.filter(owner=client.user, status=Job.Status.RUNNING).update(status=Job.Status.DONE)
    with django_capture_on_commit_callbacks(execute=True):
        assert client.post("/v1/chat/completions", body, format="json").status_code == 202


def test_queued_jobs_take_turns_between_owners():
    """The broker delivers first come, first served; a delivery runs only on its owner's turn (tasks.py sends
    it to the back of the queue otherwise): the owner with a job queued and the fewest running, then whose
    latest job started longest ago, then whose oldest queued job is oldest."""
    from datetime import timedelta

    from django.utils import timezone

    from chat.jobs import job_turn_is_owners
    from chat.models import Job

    ann, ben, cy = (make_api_client(name).user for name in ("ann", "ben", "cy"))
    now = timezone.now()
    ann_jobs = [_job(ann, {}, status=Job.Status.QUEUED) for _ in range(3)]
    assert all(job_turn_is_owners(job.pk) for job in ann_jobs)  # one owner waiting: its jobs run in order
    ben_job = _job(ben, {}, status=Job.Status.QUEUED)
    # Neither has run a job: the owner whose oldest queued job is oldest goes first.
    assert job_turn_is_owners(ann_jobs[0].pk) and not job_turn_is_owners(ben_job.pk)
    Job.objects.filter(pk=ann_jobs[0].pk).update(status=Job.Status.DONE, started_at=now - timedelta(seconds=5))
    # ann had a turn: ben's job, sent after all of ann's, goes next.
    assert job_turn_is_owners(ben_job.pk) and not job_turn_is_owners(ann_jobs[1].pk)
    Job.objects.filter(pk=ben_job.pk).update(status=Job.Status.RUNNING, started_at=now)
    assert job_turn_is_owners(ann_jobs[1].pk)  # ben's only job runs: ann's turn again
    cy_job = _job(cy, {}, status=Job.Status.QUEUED)
    # Fewest running first: cy and ann run none, ben one; cy never started one.
    assert job_turn_is_owners(cy_job.pk) and not job_turn_is_owners(ann_jobs[1].pk)
    # What is not queued is never held back: a running job delivered again (its worker lost), an ended one.
    assert job_turn_is_owners(ben_job.pk) and job_turn_is_owners(ann_jobs[0].pk)


def test_a_delivery_out_of_its_owners_turn_goes_to_the_back_of_the_queue(monkeypatch, settings):
    from chat import tasks
    from chat.models import Job

    settings.CELERY_TASK_ALWAYS_EAGER = False
    ann, ben = make_api_client("ann").user, make_api_client("ben").user
    first, later = _job(ann, {}, status=Job.Status.QUEUED), _job(ben, {}, status=Job.Status.QUEUED)
    sent, ran = [], []
    monkeypatch.setattr(tasks.run_chat_job, "apply_async", lambda args, kwargs: sent.append((args, kwargs)))
    monkeypatch.setattr(tasks, "job_run", lambda job_id: ran.append(job_id))
    tasks.run_chat_job(str(later.pk))
    assert sent == [((str(later.pk),), {"deferrals": 1})] and ran == []
    tasks.run_chat_job(str(first.pk))
    assert ran == [str(first.pk)]
    # However often it comes back, a delivery runs after MAX_DEFERRALS (the other owner's may be lost).
    tasks.run_chat_job(str(later.pk), deferrals=tasks.MAX_DEFERRALS)
    assert ran == [str(first.pk), str(later.pk)] and len(sent) == 1


def test_a_long_jobs_progress_writes_stay_linear_in_time(monkeypatch):
    """Each progress write stores the whole text so far: one a second made a long reply's writes grow with it
    (a 32K-token job wrote ~100 MB). Past PROGRESS_BYTES_PER_SECOND the interval grows with the text."""
    from chat import tasks

    clock, stored = [1000.0], []

    class Rows:
        def update(self, **fields):
            if "partial_text" in fields:
                stored.append(len(fields["partial_text"]))
            return 1

    def generate(record, on_text):
        for _ in range(3000):  # 300,000 characters over 150 seconds
            clock[0] += 0.05
            assert on_text("x" * 100)
        return "done"

    monkeypatch.setattr(tasks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(tasks, "job_attempt_rows", lambda job_id, attempt: Rows())
    monkeypatch.setattr(tasks, "reply_generate", generate)
    heartbeat = type("Beat", (), {"lost": False})()
    assert tasks._generate_with_progress(type("J", (), {"pk": 1})(), 1, None, heartbeat) == "done"
    assert stored[0] == 100 and stored == sorted(stored)  # the first text at once, then the text as it grows
    assert sum(stored) <= tasks.PROGRESS_BYTES_PER_SECOND * 150 + 300_000  # a write a second: 22.6 MB
    assert len(stored) >= 20  # still reported as it goes


def test_a_long_job_still_finds_its_cancel_within_the_progress_interval(monkeypatch):
    """Its text is written less often as it grows, but every PROGRESS_INTERVAL a small write still finds a
    cancel (zero rows): the heartbeat alone would take JOB_HEARTBEAT_TIMEOUT / 4."""
    from chat import tasks

    clock, cancelled_at, stopped_at = [1000.0], [], []

    class Rows:
        def update(self, **fields):
            return 0 if cancelled_at else 1

    def generate(record, on_text):
        for step in range(10_000):  # 1,000,000 characters over 500 seconds
            clock[0] += 0.05
            if step == 8_000:
                cancelled_at.append(clock[0])  # a DELETE: the attempt's row is no longer running
            if not on_text("x" * 100):
                stopped_at.append(clock[0])
                return None
        return "done"

    monkeypatch.setattr(tasks.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(tasks, "job_attempt_rows", lambda job_id, attempt: Rows())
    monkeypatch.setattr(tasks, "reply_generate", generate)
    heartbeat = type("Beat", (), {"lost": False})()
    assert tasks._generate_with_progress(type("J", (), {"pk": 1})(), 1, None, heartbeat) is None
    assert stopped_at[0] - cancelled_at[0] <= tasks.PROGRESS_INTERVAL + 0.05


def test_a_job_keeps_only_the_fields_the_api_reads_and_refuses_what_it_cannot_store(django_user_model):
    from chat.models import Job

    client = make_api_client("junk")
    response = client.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Say hello.", "x": {"a": [[1]]}}], "max_tokens": 4,
        "background": True, "junk": "j" * 10_000}, format="json")
    assert response.status_code == 202, response.content
    stored = Job.objects.get().request
    assert "junk" not in stored and set(stored["messages"][0]) == {"role", "content"}
    # Nested about as deep as the body parser takes, inside a field the API reads: never a database error. The
    # parser's limit depends on the stack in use, so the depth is found: the deepest body that parses.
    for depth in range(990, 0, -10):
        deep = "[" * depth + "]" * depth
        schema = '{"type": "string", "examples": [%s]}' % deep
        body = ('{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "background": true, '
                '"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": %s}}}' % schema)
        answer = client.generic("POST", "/v1/chat/completions", body, content_type="application/json")
        if answer.status_code != 400 or answer.json()["error"]["code"] != "parse_error":
            break
    assert answer.status_code in (202, 400), answer.content


@pytest.mark.parametrize("lapse", ["revoked", "expired", "owner deactivated"])
def test_a_job_whose_key_lapsed_before_it_ran_fails_as_unauthenticated_without_generating(lapse):
    """A queued job may wait long after the request that made it: it runs only as a key that is still valid."""
    from datetime import timedelta

    from django.utils import timezone

    from chat.models import ApiKey, Conversation, UsageRecord
    from chat.tasks import job_run

    import_demo_resources()
    client = make_api_client("lapsed")
    job = _job(client.user, CHAT_JOB, api_key=client.key, status="queued")
    if lapse == "owner deactivated":
        type(client.user).objects.filter(pk=client.user.pk).update(is_active=False)
    else:
        field = {"revoked": "revoked_at", "expired": "expires_at"}[lapse]
        ApiKey.objects.filter(pk=client.key.pk).update(**{field: timezone.now() - timedelta(seconds=1)})
    job_run(job_id=str(job.pk))
    job.refresh_from_db()
    assert job.status == "failed" and (job.error["status"], job.error["code"]) == (401, "invalid_api_key")
    assert job.result is None and not Conversation.objects.exists() and not UsageRecord.objects.exists()
    assert job.request == {}


@pytest.mark.django_db(transaction=True)
async def test_an_inline_job_whose_client_left_is_cancelled_not_done(endless_site, monkeypatch):
    """Without a broker a job runs inside the request that made it; a client that leaves cancels the request's
    generations, the job's too: nothing is stored, and the job reads cancelled."""
    import asyncio
    import threading
    import time

    from asgiref.sync import sync_to_async
    from django.test import AsyncClient

    from chat.engine.faults import Faults
    from chat.engines import get_engine
    from chat.models import Conversation, Job
    from tests.factories import make_character

    endless_site(4096)

    steps = []
    generating = threading.Event()

    def slow_step(step) -> None:  # still running when the client leaves; says when it has generated for a while
        steps.append(step)
        if len(steps) >= 10:
            generating.set()
        time.sleep(0.02)

    def slow_site() -> str:
        make_character("mira")
        monkeypatch.setattr(get_engine(), "faults", Faults(step=slow_step))
        return make_api_client("leaver").raw_key

    raw_key = await sync_to_async(slow_site)()
    request = asyncio.ensure_future(AsyncClient().post(
        "/v1/chat/completions", {"character": "mira", "max_tokens": 600, "background": True,
                                 "messages": [{"role": "user", "content": "Hi"}]},
        content_type="application/json", headers={"Authorization": f"Bearer {raw_key}", "Cache-Control": "no-cache"}))
    # Waited for without reading the database meanwhile: the test database is SQLite in memory, where a read from
    # another thread can lock the job's table under the job's own progress write.
    assert await sync_to_async(generating.wait, thread_sensitive=False)(60)
    request.cancel()  # the client leaves
    with pytest.raises(asyncio.CancelledError):
        await request
    job = await sync_to_async(lambda: Job.objects.first(), thread_sensitive=False)()
    assert (job.status, job.result, job.request) == ("cancelled", None, {})
    assert not await sync_to_async(Conversation.objects.exists, thread_sensitive=False)()
