"""A bounded soak of mixed traffic against one server + one Celery worker on loopback (needs Redis).

    .venv/bin/python -m bench.soak [--seconds 120] [--json bench/results/soak.json]

Streamed chats, plain completions, cache hits, WebSocket chats and background jobs run together.
At the end it checks: zero 5xx, every stored conversation holds exactly the messages its client
exchanged (none lost or duplicated), and the server's memory stayed flat.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import httpx
import websockets

from bench.servers import rss_mb
from tests.live import LiveServer, prepare_database

ROOT = Path(__file__).resolve().parents[1]


class Soak:
    def __init__(self, server: LiveServer, key: str, seconds: float):
        self.server, self.key, self.deadline = server, key, time.monotonic() + seconds
        self.headers = {"Authorization": f"Bearer {key}"}
        self.statuses = collections.Counter()
        self.exchanges: dict[str, int] = {}     # conversation id -> replies the client received
        self.greeted: set[str] = set()          # conversations started with a greeting (WebSocket)
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def count(self, status: int) -> None:
        with self.lock:
            self.statuses[status] += 1

    def chat_client(self, character: str, stream: bool) -> None:
        conversation = None
        turn = 0
        with httpx.Client(base_url=self.server.url, headers=self.headers, timeout=120) as client:
            while self.running():
                turn += 1
                body = {"messages": [{"role": "user", "content": f"Tell me something new, part {turn}."}],
                        "max_tokens": 24, "temperature": 0.8, "character": character}
                if conversation:
                    body["conversation"] = conversation
                if stream:
                    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as response:
                        text = response.read().decode()
                        status = response.status_code
                        ids = [json.loads(line[6:]).get("conversation") for line in text.splitlines()
                               if line.startswith("data: {") and '"finish_reason": "' in line]
                        received = bool(ids) and ids[-1]
                else:
                    response = client.post("/v1/chat/completions", json=body)
                    status = response.status_code
                    received = response.json().get("conversation") if status == 200 else None
                self.count(status)
                if received:
                    conversation = received
                    with self.lock:
                        self.exchanges[conversation] = self.exchanges.get(conversation, 0) + 1

    def cache_client(self) -> None:
        body = {"messages": [{"role": "user", "content": "Name a fruit."}], "max_tokens": 8, "temperature": 0,
                "store": False}
        with httpx.Client(base_url=self.server.url, headers=self.headers, timeout=120) as client:
            while self.running():
                self.count(client.post("/v1/chat/completions", json=body).status_code)
                time.sleep(0.05)

    def job_client(self) -> None:
        with httpx.Client(base_url=self.server.url, headers=self.headers, timeout=120) as client:
            while self.running():
                response = client.post("/v1/chat/completions", json={
                    "messages": [{"role": "user", "content": "Write a haiku."}], "max_tokens": 24, "background": True})
                self.count(response.status_code)
                url = response.json().get("url")
                while url and self.running():
                    state = client.get(url).json()["status"]
                    if state in ("done", "failed", "cancelled"):
                        self.count(200 if state == "done" else 599)
                        break
                    time.sleep(0.3)

    def websocket_client(self) -> None:
        async def run():
            uri = f"ws://127.0.0.1:{self.server.port}/ws/chat/byte/?api_key={self.key}"
            async with websockets.connect(uri, origin="http://127.0.0.1") as socket:
                while self.running():
                    await socket.send(json.dumps({"type": "message", "content": "How do I print?", "max_tokens": 16}))
                    while True:
                        event = json.loads(await asyncio.wait_for(socket.recv(), 120))
                        if event["type"] == "end":
                            self.count(200)
                            with self.lock:
                                self.exchanges[event["conversation"]] = self.exchanges.get(event["conversation"], 0) + 1
                                self.greeted.add(event["conversation"])
                            break
                        if event["type"] == "error":
                            self.count(event.get("status", 599))
                            break
        asyncio.run(run())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120)
    parser.add_argument("--json", default=str(ROOT / "bench" / "results" / "soak.json"))
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="llmsite-soak-"))
    server = LiveServer(workdir=workdir, env={"REDIS_URL": os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/12"),
                                              "CELERY_QUEUE": f"soak-{uuid.uuid4().hex[:8]}", "API_RATE_LIMIT": "",
                                              "LOG_LEVEL": "WARNING", "LLMSITE_THREADS": "1"})
    key = prepare_database(server, {"soak": ["soak"]})["soak"]
    server.start()
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "llmsite", "worker", "--concurrency", "1",
                               "--loglevel", "WARNING", "--without-gossip", "--without-mingle"],
                              cwd=ROOT, env=server.child_env(), stdout=open(workdir / "worker.log", "ab"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    try:
        httpx.post(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}"}, timeout=120,
                   json={"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 2, "store": False})
        soak = Soak(server, key, args.seconds)
        memory = [rss_mb(server.process.pid)]
        clients = [threading.Thread(target=soak.chat_client, args=("captain-mira", True)),
                   threading.Thread(target=soak.chat_client, args=("chef-luca", False)),
                   threading.Thread(target=soak.cache_client), threading.Thread(target=soak.job_client),
                   threading.Thread(target=soak.websocket_client)]
        for thread in clients:
            thread.start()
        while any(thread.is_alive() for thread in clients):
            time.sleep(5)
            memory.append(rss_mb(server.process.pid))
        headers = {"Authorization": f"Bearer {key}"}
        mismatches = []
        for conversation, replies in soak.exchanges.items():
            stored = httpx.get(f"{server.url}/v1/conversations/{conversation}/messages/?limit=1000",
                               headers=headers, timeout=30).json()["results"]
            expected = 2 * replies + (1 if conversation in soak.greeted else 0)
            if len(stored) != expected:
                mismatches.append({"conversation": conversation, "stored": len(stored), "expected": expected})
        result = {"seconds": args.seconds, "requests": sum(soak.statuses.values()),
                  "statuses": dict(soak.statuses),
                  "server_errors": sum(n for status, n in soak.statuses.items() if status >= 500),
                  "conversations": len(soak.exchanges), "messages_checked": sum(soak.exchanges.values()),
                  "lost_or_duplicated": mismatches, "rss_mb_start": memory[0], "rss_mb_end": memory[-1],
                  "rss_mb_max": max(memory)}
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2))
        print(json.dumps(result, indent=2))
        sys.exit(0 if result["server_errors"] == 0 and not mismatches else 1)
    finally:
        os.killpg(worker.pid, signal.SIGTERM)
        worker.wait(timeout=20)
        server.stop()


if __name__ == "__main__":
    main()
