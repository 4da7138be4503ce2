"""Servers for the benchmarks: this project's (daphne) and the peer, llama-cpp-python's own server."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.live import LiveServer, free_port, prepare_database, stop_process_group

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (from /proc; no extra dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_ours(workdir: Path, **env) -> tuple[LiveServer, str]:
    server = LiveServer(workdir=workdir, env={"API_RATE_LIMIT": "", "LOG_LEVEL": "WARNING", **env})
    key = prepare_database(server, {"bench": ["bench"]})["bench"]
    server.start()
    return server, key


class PeerServer:
    """`python -m llama_cpp.server` on the same model: one request at a time behind its lock."""

    def __init__(self, workdir: Path, model: Path = MODEL):
        self.port = free_port()
        self.workdir = workdir
        self.model = model
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        log = open(self.workdir / "peer.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "llama_cpp.server", "--model", str(self.model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "2048", "--n_threads", str(os.cpu_count() or 2),
             "--interrupt_requests", "False", "--model_alias", "smollm2-135m-instruct"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the peer server exited; see {self.workdir / 'peer.log'}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.3)
        raise RuntimeError("the peer server did not start in time")

    def stop(self) -> None:
        stop_process_group(self.process)
