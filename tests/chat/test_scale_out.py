"""Against real Redis and a real Celery worker process: background jobs, the response cache, outages."""

import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from tests.live import LiveServer, bearer_client, free_port, prepare_database, stop_process_group
from tests.subprocess_helpers import ROOT

pytestmark = pytest.mark.smollm2

ASK = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 12, "temperature": 0}
HEARTBEAT_TIMEOUT = 2  # seconds; far shorter than evaluating a long prompt on this machine
LONG_CONTEXT = 8192  # SmolLM2's trained context


class Worker:
    def __init__(self, server: LiveServer):
        self.server = server
        self.process = None

    def start(self, **env):
        log = open(self.server.workdir / "worker.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "llmsite", "worker", "--pool", "prefork", "--concurrency", "1",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env={**self.server.child_env(), **env}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)

    def stop(self):
        stop_process_group(self.process, timeout=20)


def long_context_config(folder) -> Path:
    """config.yaml with room for a prompt whose evaluation outlasts HEARTBEAT_TIMEOUT on any CPU here (SmolLM2
    evaluates ~1,500 tokens a second with AMX kernels: a 2,048-token context fills in about one second)."""
    text = (ROOT / "config.yaml").read_text()
    assert "context_length: 2048" in text and "parallel: 8" in text
    path = folder / "config.yaml"
    path.write_text(text.replace("context_length: 2048", f"context_length: {LONG_CONTEXT}")
                    .replace("parallel: 8", "parallel: 2"))
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory, redis_url, smollm2_path):
    """daphne + a Celery worker sharing one SQLite file, with Redis as broker, cache and channel layer."""
    import redis

    # TEST_REDIS_URL's database, so concurrent runs can each have their own.
    redis.Redis.from_url(redis_url).flushdb()  # no cached replies or queued tasks from earlier runs
    workdir = tmp_path_factory.mktemp("scale-out")
    server = LiveServer(workdir=workdir, env={
        "REDIS_URL": redis_url, "CELERY_QUEUE": f"test-{uuid.uuid4().hex[:8]}", "API_RATE_LIMIT": "",
        "JOB_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT), "LLMSITE_CONFIG": str(long_context_config(workdir))})
    keys = prepare_database(server, {"ann": ["ann"], "ben": ["ben"]})
    server.start()
    worker = Worker(server)
    worker.start()
    try:
        yield server, keys, worker
    finally:
        worker.stop()
        server.stop()


def wait_for(client, url, predicate, timeout=120):
    deadline = time.monotonic() + timeout
    body = None
    while time.monotonic() < deadline:
        body = client.get(url).json()
        if predicate(body):
            return body
        time.sleep(0.2)
    raise AssertionError(f"timed out; last state: {body}")


def test_background_job_from_submit_to_done(stack):
    server, keys, _ = stack
    client = bearer_client(server, keys["ann"])
    response = client.post("/v1/chat/completions", json={**ASK, "background": True, "max_tokens": 16})
    assert response.status_code == 202, response.text
    job = response.json()
    assert job["status"] in ("queued", "running") and response.headers["Location"] == job["url"]
    done = wait_for(client, job["url"], lambda b: b["status"] in ("done", "failed"))
    assert done["status"] == "done", done
    assert done["result"]["object"] == "chat.completion" and done["result"]["choices"][0]["message"]["content"]
    # Jobs belong to the key that made them.
    assert bearer_client(server, keys["ben"]).get(job["url"]).status_code == 404


def test_a_background_job_can_be_cancelled(stack):
    server, keys, _ = stack
    client = bearer_client(server, keys["ann"])
    response = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
        "max_tokens": 1500, "temperature": 0.8, "seed": 3, "background": True})
    assert response.status_code == 202
    url = response.json()["url"]
    running = wait_for(client, url, lambda b: b["status"] == "running" and b["completion_tokens"] > 0)
    assert running["text_so_far"]
    cancelled = client.delete(url).json()
    assert cancelled["status"] == "cancelled"
    time.sleep(2)
    after = client.get(url).json()
    assert after["status"] == "cancelled" and "result" not in after
    # The worker is free again: the next job completes.
    job = client.post("/v1/chat/completions", json={**ASK, "background": True}).json()
    assert wait_for(client, job["url"], lambda b: b["status"] in ("done", "failed"))["status"] == "done"


def test_jobs_take_turns_between_owners_on_one_worker(stack):
    """One worker runs one job at a time (--concurrency 1). ann submits four jobs, then ben one: ben's runs
    second, not after all of ann's (the broker alone delivers first come, first served)."""
    server, keys, _ = stack
    ann, ben = bearer_client(server, keys["ann"]), bearer_client(server, keys["ben"])
    job = {"messages": [{"role": "user", "content": "Count slowly from one to twenty."}], "max_tokens": 40,
           "temperature": 0.8, "background": True}
    ann_urls = [ann.post("/v1/chat/completions", json={**job, "seed": seed}).json()["url"] for seed in range(4)]
    ben_url = ben.post("/v1/chat/completions", json={**job, "seed": 9}).json()["url"]
    for client, url in [*((ann, url) for url in ann_urls), (ben, ben_url)]:
        assert wait_for(client, url, lambda b: b["status"] in ("done", "failed"), timeout=240)["status"] == "done"
    ids = [url.rsplit("/", 1)[-1] for url in (*ann_urls, ben_url)]
    started = server.manage("from chat.models import Job\n"
                            f"ids = {ids!r}\n"
                            "print(' '.join(str(j.pk) for j in Job.objects.filter(pk__in=ids).order_by('started_at')))")
    order = started.split()
    assert order.index(ids[-1]) <= 1, order  # ben's job first or second (ann's first may have started already)


def test_a_job_whose_prompt_evaluation_outlasts_the_heartbeat_timeout_completes(stack):
    server, keys, _ = stack
    client = bearer_client(server, keys["ann"])
    # A fresh prefix each run: nothing of this prompt is in the engine's prefix cache.
    text = f"Log {uuid.uuid4().hex}. " + "The sea was calm and the sky was grey that morning. " * 600  # ~7,200 tokens
    job = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": text + "Summarise the log in one sentence."}],
        "max_tokens": 8, "temperature": 0.8, "background": True}).json()
    states = []  # (time, status, tokens so far) at each poll; a poll is what used to declare the job lost

    def record(body):
        states.append((time.monotonic(), body["status"], body["completion_tokens"]))
        return body["status"] not in ("queued", "running")

    final = wait_for(client, job["url"], record, timeout=300)
    assert final["status"] == "done" and final["attempts"] == 1, final
    statuses = [status for _, status, _ in states]
    assert "queued" not in statuses[statuses.index("running"):], statuses  # never taken for lost
    evaluating = [at for at, status, tokens in states if status == "running" and tokens == 0]
    # The scenario really happened: the job sat in prompt evaluation for longer than the timeout.
    assert evaluating and evaluating[-1] - evaluating[0] > HEARTBEAT_TIMEOUT, states


def test_a_killed_worker_process_leaves_the_job_re_run_and_its_exchange_stored_once(stack):
    server, keys, worker = stack
    client = bearer_client(server, keys["ann"])
    # Not ASK: a reply cached here would turn the response-cache test's first MISS into a HIT.
    first = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Ciao! What shall we cook?"}], "character": "chef-luca",
        "max_tokens": 12}).json()
    conversation = first["conversation"]
    assert conversation, first
    for attempt in range(3):  # a job that finishes before the kill lands proves nothing: try again
        job = client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "Write a very long essay about the sea."}],
            "conversation": conversation, "max_tokens": 400, "temperature": 0.8, "seed": 3 + attempt,
            "background": True}).json()
        wait_for(client, job["url"], lambda b: b["status"] == "running", timeout=120)
        # The pool process running the job dies mid-job, having stored nothing (the worker's main process survives).
        subprocess.run(["pkill", "-KILL", "-P", str(worker.process.pid)], check=False)
        final = wait_for(client, job["url"], lambda b: b["status"] in ("done", "failed"), timeout=180)
        if final["attempts"] > 1:
            break
    assert final["status"] == "done" and final["attempts"] == 2, final
    assert final["result"]["conversation"] == conversation
    messages = client.get(f"/v1/conversations/{conversation}/messages/").json()["results"]
    # Each exchange exactly once: the first one, and one per job that ran (the killed attempt stored nothing).
    assert [m["role"] for m in messages] == ["user", "assistant"] * (2 + attempt), (attempt, messages)
    assert messages[-1]["content"] == final["result"]["choices"][0]["message"]["content"]
    assert [m["content"] for m in messages[2::2]] == ["Write a very long essay about the sea."] * (1 + attempt)


def test_response_cache_hits_and_an_admin_edit_misses(stack):
    server, keys, _ = stack
    client = bearer_client(server, keys["ann"])
    body = {**ASK, "character": "chef-luca", "store": False}
    first = client.post("/v1/chat/completions", json=body)
    second = client.post("/v1/chat/completions", json=body)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.json()["choices"] == first.json()["choices"]
    assert second.json()["id"] != first.json()["id"]
    seeded = {**body, "temperature": 0.9, "seed": 7}
    assert client.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "MISS"
    assert client.post("/v1/chat/completions", json=seeded).headers["X-Cache"] == "HIT"
    sampled = {**body, "temperature": 0.9}
    assert client.post("/v1/chat/completions", json=sampled).headers["X-Cache"] == "BYPASS"
    # An editor changes the character: the next identical request is generated afresh.
    server.manage("from characters.models import Character\nc = Character.objects.get(slug='chef-luca')\n"
                  "c.personality += ' Loves opera.'\nc.save()")
    assert client.post("/v1/chat/completions", json=body).headers["X-Cache"] == "MISS"
    # Streams are answered from the cache too.
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as stream:
        assert stream.headers["X-Cache"] == "HIT"
        assert "[DONE]" in stream.read().decode()


def test_service_keeps_working_when_redis_stops_and_recovers(tmp_path, smollm2_path, redis_url):
    port = free_port()
    redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no"], stdout=subprocess.DEVNULL)
    server = LiveServer(workdir=tmp_path, env={"REDIS_URL": f"redis://127.0.0.1:{port}/0", "API_RATE_LIMIT": "1000/min"})
    try:
        keys = prepare_database(server, {"cy": ["cy"]})
        server.start()
        client = bearer_client(server, keys["cy"])
        assert client.post("/v1/chat/completions", json=ASK).headers["X-Cache"] == "MISS"
        assert client.post("/v1/chat/completions", json=ASK).headers["X-Cache"] == "HIT"
        redis.terminate()
        redis.wait(timeout=10)
        down = client.post("/v1/chat/completions", json=ASK)
        assert down.status_code == 200 and down.headers["X-Cache"] == "MISS"
        assert down.json()["choices"][0]["message"]["content"]
        # Redis comes back: the cache works again, with no restart of the web server.
        redis = subprocess.Popen(["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                                  "--appendonly", "no"], stdout=subprocess.DEVNULL)
        time.sleep(0.5)
        assert client.post("/v1/chat/completions", json=ASK).headers["X-Cache"] == "MISS"
        assert client.post("/v1/chat/completions", json=ASK).headers["X-Cache"] == "HIT"
    finally:
        server.stop()
        if redis.poll() is None:
            redis.kill()


# -- a worker's drain: SIGTERM finishes the running job within WORKER_DRAIN_TIMEOUT, or hands it back -------------

NO_END = {"0": -100, "1": -100, "2": -100}  # SmolLM2's end tokens banned: the job runs to max_tokens


def running_job(client, max_tokens: int) -> str:
    job = client.post("/v1/chat/completions", json={
        "messages": [{"role": "user", "content": "Write a very long essay about the sea."}], "max_tokens": max_tokens,
        "temperature": 0.8, "seed": 11, "logit_bias": NO_END, "background": True}).json()
    wait_for(client, job["url"], lambda b: b["status"] == "running" and b["completion_tokens"] > 0)
    return job["url"]


def test_sigterm_lets_the_running_job_finish_before_the_worker_exits(stack):
    server, keys, worker = stack
    client = bearer_client(server, keys["ann"])
    try:
        url = running_job(client, max_tokens=120)
        worker.process.send_signal(signal.SIGTERM)
        assert worker.process.wait(timeout=120) == 0
        final = client.get(url).json()
    finally:
        worker.start()
    assert final["status"] == "done" and final["attempts"] == 1, final
    assert final["result"]["usage"]["completion_tokens"] == 120


def test_a_job_outlasting_the_worker_drain_is_handed_back_and_run_again(stack, redis_url):
    import redis

    server, keys, worker = stack
    client = bearer_client(server, keys["ann"])
    worker.stop()
    worker.start(WORKER_DRAIN_TIMEOUT="2")
    try:
        url = running_job(client, max_tokens=1500)
        signalled = time.monotonic()
        worker.process.send_signal(signal.SIGTERM)
        worker.process.wait(timeout=60)
        exited_after = time.monotonic() - signalled
        # Back in the broker's queue at once (no poll of the job has run: a poll could queue it again itself).
        queued = redis.Redis.from_url(redis_url).llen(server.env["CELERY_QUEUE"])
    finally:
        worker.start()
    assert exited_after < 2 + 30, exited_after  # the bound, plus the time a cold shutdown takes
    assert queued == 1
    final = wait_for(client, url, lambda b: b["status"] in ("done", "failed"), timeout=300)
    assert final["status"] == "done" and final["attempts"] == 2, final
    assert final["result"]["usage"]["completion_tokens"] == 1500
