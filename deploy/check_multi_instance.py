"""The production setup end to end on loopback: Nginx, two daphne instances, one Celery worker.

Run: .venv/bin/python -m deploy.check_multi_instance   (needs nginx, Redis and PostgreSQL)
Production settings throughout: DEBUG=0, PostgreSQL (a fresh database, dropped afterwards), Redis
with the cache in one database and the broker and channel layer in another, a metrics token, and
Nginx serving /static/ and /media/ from the storage both instances share. Nginx is reached as a
TLS load balancer would reach it (X-Forwarded-Proto: https). Sends plain completions, SSE streams,
WebSocket chats and a background job, then checks: both instances served, nothing failed, plain
HTTP is redirected once while probes (on each instance) are not, Nginx refuses the probe and metrics paths,
an avatar is served, /metrics and the worker's metrics port answer only the token, and the logs are JSON
lines carrying request ids, Nginx's rather than the client's. Exits
non-zero otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template
from urllib.parse import urlparse, urlunparse

import httpx
import websockets

from tests.live import LiveServer, free_port, prepare_database, stop_process_group

ROOT = Path(__file__).resolve().parent.parent
PLAIN, STREAMS, SOCKETS = 12, 6, 4
ASK = {"messages": [{"role": "user", "content": "Say something kind."}], "max_tokens": 8, "temperature": 0.7}
TLS = {"X-Forwarded-Proto": "https"}  # what the TLS load balancer in front of Nginx adds
JOB_REQUEST_ID = "deploycheckjob" + secrets.token_hex(4)


AVATAR_SCRIPT = """
import io
from PIL import Image
from django.core.files.base import ContentFile
from characters.models import Character
picture = io.BytesIO()
Image.new("RGB", (16, 16), "teal").save(picture, "PNG")
Character.objects.get(slug="byte").avatar.save("byte.png", ContentFile(picture.getvalue()), save=True)
"""


def render_nginx(workdir: Path, port: int, upstreams: list[int], media_root: Path) -> Path:
    text = Template((ROOT / "deploy" / "nginx.conf.template").read_text()).safe_substitute(
        RUN_DIR=str(workdir), LISTEN=f"127.0.0.1:{port}", STATIC_ROOT=str(ROOT / "staticfiles"),
        MEDIA_ROOT=str(media_root), UPSTREAM_SERVERS="\n".join(f"        server 127.0.0.1:{p};" for p in upstreams))
    if os.geteuid() == 0:  # nginx's workers would otherwise run as 'nobody' and could not use workdir
        text = "user root;\n" + text
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


class ScratchDatabase:
    """A PostgreSQL database of its own for one run, dropped at the end."""

    def __init__(self, server_url: str):
        self.server_url = server_url
        self.name = "llmsite_deploy_" + secrets.token_hex(4)

    @property
    def url(self) -> str:
        return urlunparse(urlparse(self.server_url)._replace(path="/" + self.name))

    def _run(self, statement: str) -> None:
        import psycopg

        with psycopg.connect(self.server_url, autocommit=True) as connection:
            connection.execute(statement)

    def create(self) -> None:
        self._run(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self._run(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')


def plain_request(base: str, key: str) -> tuple[int, str]:
    response = httpx.post(base + "/v1/chat/completions", json=ASK,
                          headers={"Authorization": f"Bearer {key}", **TLS}, timeout=120)
    return response.status_code, response.headers.get("X-Served-By", "?")


def stream_request(base: str, key: str) -> tuple[int, str]:
    with httpx.stream("POST", base + "/v1/chat/completions", json={**ASK, "stream": True},
                      headers={"Authorization": f"Bearer {key}", **TLS}, timeout=120) as response:
        body = response.read().decode()
        ok = response.status_code == 200 and body.rstrip().endswith("data: [DONE]") and '"error"' not in body
        return (200 if ok else 599), response.headers.get("X-Served-By", "?")


async def websocket_chat(port: int, key: str) -> int:
    # A non-browser client: the key in the Authorization header, no Origin (query-string keys are refused).
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/byte/",
                                  additional_headers={"Authorization": f"Bearer {key}"}) as socket:
        await socket.send(json.dumps({"type": "message", "content": "Hello Byte!", "max_tokens": 8}))
        while True:
            event = json.loads(await asyncio.wait_for(socket.recv(), 120))
            if event["type"] in ("end", "error"):
                return 200 if event["type"] == "end" else event.get("status", 599)


def background_job(base: str, key: str) -> tuple[str, str]:
    """The job's final status, and the request id the web instance gave its submission (Nginx's, not ours)."""
    headers = {"Authorization": f"Bearer {key}", "X-Request-ID": JOB_REQUEST_ID, **TLS}
    response = httpx.post(base + "/v1/chat/completions", json={**ASK, "background": True}, headers=headers,
                          timeout=30)
    request_id = response.headers.get("X-Request-ID", "")
    if response.status_code != 202:
        return f"submit {response.status_code}", request_id
    url = response.json()["url"]
    url = url if url.startswith("http") else base + url
    url = url.replace("https://", "http://")  # the job's URL is the client's (https); we are the balancer
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        status = httpx.get(url, headers=headers, timeout=10).json()["status"]
        if status in ("done", "failed", "cancelled"):
            return status, request_id
        time.sleep(0.3)
    return "timed out", request_id


def json_lines(text: str) -> list[dict]:
    """The log's JSON records; plain lines (daphne's access log) are skipped."""
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def scrape(url: str, token: str | None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    response = httpx.get(url, headers=headers, timeout=10)
    return response.status_code, response.text


def metric_total(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{"))


def main() -> int:
    if not shutil.which("nginx"):
        print("nginx is not installed (apt-get install nginx-light)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="llmsite-multi-"))
    redis_base = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12")
    database = ScratchDatabase(os.environ.get("POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
    database.create()
    metrics_token, worker_metrics_port = secrets.token_hex(16), free_port()
    env = {"DEBUG": "0", "SECRET_KEY": secrets.token_urlsafe(50), "ALLOWED_HOSTS": "127.0.0.1,localhost",
           "DATABASE_URL": database.url, "REDIS_URL": redis_base,
           "CHANNEL_LAYER_URL": os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/13"),
           "CELERY_BROKER_URL": os.environ.get("CELERY_BROKER_URL", "redis://127.0.0.1:6379/13"),
           "CELERY_QUEUE": "deploy-" + secrets.token_hex(4), "METRICS_TOKEN": metrics_token,
           "API_RATE_LIMIT": "", "SERVE_STATIC": "0", "MEDIA_ROOT": str(workdir / "shared-media"),
           # Two instances and a worker share two cores here: one thread each avoids oversubscription.
           "LLMSITE_THREADS": "1"}
    servers = [LiveServer(workdir=workdir, env={**env, "INSTANCE_NAME": name}) for name in ("web-a", "web-b")]
    nginx = worker = None
    try:
        key = prepare_database(servers[0], {"ops": ["ops"]})["ops"]
        # An avatar saved by one instance's process, to be served by Nginx from the shared storage.
        servers[0].manage(AVATAR_SCRIPT)
        subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True,
                       env=servers[0].child_env())
        for server in servers:
            server.start()
        worker_log = open(workdir / "worker.log", "ab")
        worker = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "llmsite", "worker", "--pool", "prefork", "--concurrency", "1",
             "--loglevel", "INFO", "--without-gossip", "--without-mingle", "--without-heartbeat"],
            cwd=ROOT, env={**servers[0].child_env(), "WORKER_METRICS_PORT": str(worker_metrics_port)},
            stdout=worker_log, stderr=subprocess.STDOUT, start_new_session=True)
        port = free_port()
        config = render_nginx(workdir, port, [s.port for s in servers], workdir / "shared-media")
        nginx = subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(config), "-g", "daemon off;"])
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            job = pool.submit(background_job, base, key)
            results = list(pool.map(lambda _: plain_request(base, key), range(PLAIN)))
            results += list(pool.map(lambda _: stream_request(base, key), range(STREAMS)))

            async def sockets():
                return await asyncio.gather(*(websocket_chat(port, key) for _ in range(SOCKETS)))

            socket_statuses = asyncio.run(sockets())
            job_status, job_request_id = job.result()
        elapsed = time.monotonic() - started

        served = collections.Counter(instance for _, instance in results)
        web_records = {s.env["INSTANCE_NAME"]: json_lines(s.log()) for s in servers}
        ws_served = {name: sum(r.get("message") == "websocket connection" for r in records)
                     for name, records in web_records.items()}
        errors = [status for status, _ in results if status != 200] + [s for s in socket_statuses if s != 200]
        problems = []
        if not all(served[s.env["INSTANCE_NAME"]] > 0 for s in servers):
            problems.append(f"an instance served nothing: {dict(served)}")
        if errors:
            problems.append(f"{len(errors)} failed requests: {errors}")
        if job_status != "done":
            problems.append(f"background job: {job_status}")

        # HTTPS behind the balancer: plain HTTP redirected once, https served, probes never redirected.
        redirect = httpx.get(base + "/v1/models", timeout=10)
        if redirect.status_code != 301 or not redirect.headers.get("Location", "").startswith("https://"):
            problems.append(f"plain HTTP was not redirected to https: {redirect.status_code}")
        if httpx.get(base + "/v1/models", headers=TLS, timeout=10).status_code != 401:
            problems.append("https (from the balancer) was not served")
        # Probes reach each instance directly; Nginx, the public side, refuses them.
        for probe in ("/health", "/ready"):
            for server in servers:
                status = httpx.get(server.url + probe, timeout=30).status_code
                if status != 200:
                    problems.append(f"probe {probe} on {server.env['INSTANCE_NAME']} answered {status}")
        for probe in ("/health", "/ready", "/metrics", "//ready", "/r%65ady"):
            status = httpx.get(base + probe, headers=TLS, timeout=10).status_code
            if status != 404:
                problems.append(f"Nginx passed {probe} on: {status}")
        # Static and media from Nginx.
        static = httpx.get(base + "/static/admin/css/base.css", timeout=5).status_code
        avatar_url = httpx.get(base + "/v1/characters/byte/", headers={"Authorization": f"Bearer {key}", **TLS},
                               timeout=10).json().get("avatar") or ""
        avatar = httpx.get(base + urlparse(avatar_url).path, timeout=5).status_code if avatar_url else 0
        if static != 200 or avatar != 200:
            problems.append(f"static {static}, avatar {avatar_url!r} {avatar}")
        # Metrics: refused without the token, web and worker figures with it.
        if scrape(servers[0].url + "/metrics", None)[0] != 401:
            problems.append("/metrics answered without a token")
        web_status, _ = scrape(servers[0].url + "/metrics", metrics_token)
        worker_url = f"http://127.0.0.1:{worker_metrics_port}/metrics"
        worker_refused, _ = scrape(worker_url, None)
        worker_status, worker_text = scrape(worker_url, metrics_token)
        worker_tokens = metric_total(worker_text, "llmsite_completion_tokens_total")
        if web_status != 200 or worker_refused != 401 or worker_status != 200 or worker_tokens <= 0:
            problems.append(f"metrics: web {web_status}, worker without token {worker_refused}, "
                            f"worker {worker_status} with {worker_tokens} tokens")
        # Logs: JSON lines; the web's request lines and the worker's job lines carry request ids.
        worker_records = json_lines((workdir / "worker.log").read_text(errors="replace"))
        request_lines = [r for records in web_records.values() for r in records if r.get("logger") == "llmsite.requests"]
        if not request_lines or not all(r.get("request_id") for r in request_lines):
            problems.append("web request log lines without request ids")
        if not job_request_id or job_request_id == JOB_REQUEST_ID:
            problems.append(f"Nginx let the client pick the request id: {job_request_id!r}")
        if not any(r.get("request_id") == job_request_id for r in worker_records):
            problems.append("no worker log line carries the job's request id")

        print(f"{PLAIN} plain + {STREAMS} SSE requests by instance: {dict(served)}")
        print(f"{SOCKETS} WebSocket chats by instance: {ws_served}")
        print(f"background job: {job_status}; worker metrics: {worker_tokens:.0f} completion tokens")
        print(f"static {static}, avatar {avatar}; plain HTTP -> {redirect.status_code}")
        print(f"errors: {len(errors)}; problems: {len(problems)}; elapsed {elapsed:.1f}s")
        for problem in problems:
            print("PROBLEM:", problem)
        return 0 if not problems else 1
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        stop_process_group(worker, timeout=20)
        for server in servers:
            server.stop()
        database.drop()


if __name__ == "__main__":
    sys.exit(main())
