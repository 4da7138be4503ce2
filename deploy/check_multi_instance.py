"""Nginx in front of two daphne instances on loopback, with bounded traffic through it.

Run: .venv/bin/python -m deploy.check_multi_instance   (needs nginx and Redis on 127.0.0.1:6379)
Sends plain completions, SSE streams and WebSocket chats through Nginx and shows that both
instances served requests, with no errors. Exits non-zero otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from string import Template

import httpx
import websockets

from tests.live import LiveServer, free_port, prepare_database

ROOT = Path(__file__).resolve().parent.parent
PLAIN, STREAMS, SOCKETS = 12, 6, 4
ASK = {"messages": [{"role": "user", "content": "Say something kind."}], "max_tokens": 8, "temperature": 0.7}


def render_nginx(workdir: Path, port: int, upstreams: list[int]) -> Path:
    text = Template((ROOT / "deploy" / "nginx.conf.template").read_text()).safe_substitute(
        RUN_DIR=str(workdir), LISTEN=f"127.0.0.1:{port}", STATIC_ROOT=str(ROOT / "staticfiles"),
        UPSTREAM_SERVERS="\n".join(f"        server 127.0.0.1:{p};" for p in upstreams))
    if os.geteuid() == 0:  # nginx's workers would otherwise run as 'nobody' and could not use workdir
        text = "user root;\n" + text
    path = workdir / "nginx.conf"
    path.write_text(text)
    return path


def plain_request(base: str, key: str) -> tuple[int, str]:
    response = httpx.post(base + "/v1/chat/completions", json=ASK, headers={"Authorization": f"Bearer {key}"},
                          timeout=120)
    return response.status_code, response.headers.get("X-Served-By", "?")


def stream_request(base: str, key: str) -> tuple[int, str]:
    with httpx.stream("POST", base + "/v1/chat/completions", json={**ASK, "stream": True},
                      headers={"Authorization": f"Bearer {key}"}, timeout=120) as response:
        body = response.read().decode()
        ok = response.status_code == 200 and body.rstrip().endswith("data: [DONE]") and '"error"' not in body
        return (200 if ok else 599), response.headers.get("X-Served-By", "?")


async def websocket_chat(port: int, key: str) -> int:
    async with websockets.connect(f"ws://127.0.0.1:{port}/ws/chat/byte/?api_key={key}",
                                  origin="http://127.0.0.1") as socket:
        await socket.send(json.dumps({"type": "message", "content": "Hello Byte!", "max_tokens": 8}))
        while True:
            event = json.loads(await asyncio.wait_for(socket.recv(), 120))
            if event["type"] in ("end", "error"):
                return 200 if event["type"] == "end" else event.get("status", 599)


def main() -> int:
    if not shutil.which("nginx"):
        print("nginx is not installed (apt-get install nginx-light)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="llmsite-multi-"))
    env = {"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/13"), "API_RATE_LIMIT": "",
           "SERVE_STATIC": "0", "ALLOWED_HOSTS": "127.0.0.1,localhost",
           # Two instances share two cores here: one thread each avoids oversubscription.
           "LLMSITE_THREADS": "1"}
    servers = [LiveServer(workdir=workdir, env={**env, "INSTANCE_NAME": name}) for name in ("web-a", "web-b")]
    key = prepare_database(servers[0], {"ops": ["ops"]})["ops"]
    subprocess.run([sys.executable, "manage.py", "collectstatic", "--noinput", "-v0"], cwd=ROOT, check=True,
                   env=servers[0].child_env())
    nginx = None
    try:
        for server in servers:
            server.start()
        port = free_port()
        config = render_nginx(workdir, port, [s.port for s in servers])
        nginx = subprocess.Popen(["nginx", "-p", str(workdir), "-c", str(config), "-g", "daemon off;"])
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):
            try:
                httpx.get(base + "/admin/login/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        started = time.monotonic()
        with ThreadPoolExecutor(max_workers=8) as pool:
            results = list(pool.map(lambda _: plain_request(base, key), range(PLAIN)))
            results += list(pool.map(lambda _: stream_request(base, key), range(STREAMS)))

        async def sockets():
            return await asyncio.gather(*(websocket_chat(port, key) for _ in range(SOCKETS)))

        socket_statuses = asyncio.run(sockets())
        elapsed = time.monotonic() - started
        served = collections.Counter(instance for _, instance in results)
        ws_served = {s.env["INSTANCE_NAME"]: s.log().count("\"WSCONNECT ") for s in servers}
        errors = [status for status, _ in results if status != 200] + [s for s in socket_statuses if s != 200]
        static = httpx.get(base + "/static/admin/css/base.css", timeout=5).status_code
        print(f"{PLAIN} plain + {STREAMS} SSE requests by instance: {dict(served)}")
        print(f"{SOCKETS} WebSocket chats by instance: {ws_served}")
        print(f"static file through nginx: {static}; errors: {len(errors)}; elapsed {elapsed:.1f}s")
        both = all(served[s.env["INSTANCE_NAME"]] > 0 for s in servers)
        return 0 if both and not errors and static == 200 else 1
    finally:
        if nginx is not None:
            nginx.terminate()
            nginx.wait(timeout=10)
        for server in servers:
            server.stop()


if __name__ == "__main__":
    sys.exit(main())
