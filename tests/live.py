"""A real daphne server (`manage.py serve`: daphne with the graceful drain) in a child process, with its own SQLite file, for end-to-end tests.

The child reads settings from its environment like any deployment; the test talks to it over
HTTP/WebSocket only, and prepares or inspects its database through `manage()`, a separate
Django process on the same file.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.subprocess_helpers import CLEARED, ROOT


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class LiveServer:
    workdir: Path
    env: dict = field(default_factory=dict)
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def child_env(self) -> dict:
        env = {key: value for key, value in os.environ.items() if key not in CLEARED}
        # DEBUG opted into as `make run` does (the defaults are production's); env may set DEBUG=0.
        env.update({"DJANGO_SETTINGS_MODULE": "llmsite.settings", "DEBUG": "1", "LLMSITE_ENV_FILE": "",
                    "SQLITE_PATH": str(self.workdir / "db.sqlite3"),
                    "MEDIA_ROOT": str(self.workdir / "media"), "PYTHONUNBUFFERED": "1"})
        env.update(self.env)
        return env

    def manage(self, code: str, timeout: float = 120) -> str:
        """Run Python with Django set up against the server's database; returns stdout."""
        script = "import django\ndjango.setup()\n" + code
        result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=self.child_env(), capture_output=True,
                                text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(f"manage() failed:\n{result.stderr[-3000:]}")
        return result.stdout

    def start(self, timeout: float = 60) -> None:
        self.port = self.port or free_port()
        log = open(self.workdir / f"daphne-{self.port}.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "manage.py", "serve", "-b", "127.0.0.1", "-p", str(self.port), "llmsite.asgi:application"],
            cwd=ROOT, env=self.child_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daphne exited early; log:\n{self.log()[-3000:]}")
            try:
                httpx.get(self.url + "/admin/login/", timeout=1)
                return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError(f"daphne did not answer within {timeout}s; log:\n{self.log()[-3000:]}")

    def log(self) -> str:
        path = self.workdir / f"daphne-{self.port}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> None:
        stop_process_group(self.process)


def bearer_client(server: LiveServer, key: str, timeout: float = 120) -> httpx.Client:
    """An HTTP client for the server that sends `Authorization: Bearer <key>`."""
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=timeout)


def sse_events(response: httpx.Response, on_event=None) -> list:
    """The `data:` events of a streamed reply, decoded ("[DONE]" kept as is); on_event sees each as it comes."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            event = line[len("data: "):]
            events.append(event if event == "[DONE]" else json.loads(event))
            if on_event is not None:
                on_event(events[-1])
    return events


def content_of(event) -> str:
    """The text an event of a streamed chat completion adds ("" for anything else)."""
    if not isinstance(event, dict) or not event.get("choices"):
        return ""
    return event["choices"][0].get("delta", {}).get("content") or ""


def stop_process_group(process: subprocess.Popen | None, timeout: float = 15) -> None:
    """Stop a child started with start_new_session=True, and everything it started."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=5)


SETUP_SCRIPT = """
import json
from django.core.management import call_command
from django.contrib.auth import get_user_model
from chat.api.keys import api_key_create
call_command("migrate", verbosity=0)
call_command("import_resources", verbosity=0, stdout=open("/dev/null", "w"), stderr=open("/dev/null", "w"))
users = get_user_model().objects
keys = {}
for username, key_names in %s.items():
    user, _ = users.get_or_create(username=username)
    for key_name in key_names:
        keys[key_name] = api_key_create(user=user, name=key_name)[1]
print(json.dumps(keys))
"""


def prepare_database(server: LiveServer, keys_by_user: dict[str, list[str]]) -> dict[str, str]:
    """Migrate, load the demo content, and create API keys; returns {key name: raw key}."""
    return json.loads(server.manage(SETUP_SCRIPT % json.dumps(keys_by_user)).strip().splitlines()[-1])
