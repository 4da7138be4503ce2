"""Servers for the API benchmarks, all on loopback with the same model file and threads.

This project's (daphne, config.yaml); the real peer, llama.cpp's llama-server with `-np` = the
engine's `parallel` and the same total context; and a weaker second peer, llama-cpp-python's own
server (one request at a time).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.streams import MODEL_NAME
from tests.live import LiveServer, free_port, prepare_database, stop_process_group
from tests.llama_server import LlamaServer, find_llama_server

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class EngineShape:
    """What every server is given, read from config.yaml's default model."""

    parallel: int
    context_length: int  # per sequence; the total KV context is parallel x context_length
    threads: int
    model_path: str = str(MODEL)  # the GGUF file config.yaml names
    weights: str = ""  # config.yaml's `weights`: this project loads a copy of the file in that type

    @classmethod
    def from_config(cls) -> EngineShape:
        from llmsite.config import load_config

        config = load_config(os.environ.get("LLMSITE_CONFIG", "config.yaml"), base_dir=ROOT)
        model = next(m for m in config.models if m.name == config.default_model)
        return cls(parallel=model.parallel, context_length=model.context_length,
                   threads=model.threads or os.cpu_count() or 2, model_path=model.path, weights=model.weights)

    def loaded_file(self) -> Path:
        """The file this project's engine loads: config.yaml's, or its re-quantized copy (chat/engine/backends/weights.py)."""
        from chat.engine.backends.llama_cpp import _llama, model_file_for
        from chat.engine.types import ModelSpec

        return Path(model_file_for(_llama(), ModelSpec(name="bench", path=self.model_path, weights=self.weights))[0])


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MB (from /proc; no extra dependency)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_ours(workdir: Path, **env) -> tuple[LiveServer, str]:
    # The same config.yaml as EngineShape reads: LLMSITE_CONFIG, which LiveServer otherwise keeps from its child.
    if os.environ.get("LLMSITE_CONFIG"):
        env.setdefault("LLMSITE_CONFIG", os.path.abspath(os.environ["LLMSITE_CONFIG"]))
    server = LiveServer(workdir=workdir, env={"API_RATE_LIMIT": "", "LOG_LEVEL": "WARNING", **env})
    key = prepare_database(server, {"bench": ["bench"]})["bench"]
    server.start()
    return server, key


def start_llama_server(workdir: Path, shape: EngineShape, model: Path = MODEL) -> LlamaServer:
    """llama-server with continuous batching: `parallel` slots sharing parallel x context_length KV cells."""
    binary, missing = find_llama_server()
    if binary is None:
        raise RuntimeError(missing)
    server = LlamaServer(binary, model, port=free_port(), log_path=workdir / "llama-server.log",
                         context=shape.parallel * shape.context_length, parallel=shape.parallel,
                         threads=shape.threads, alias=MODEL_NAME)
    server.start()
    server.wait_until_ready()
    return server


class PeerServer:
    """`python -m llama_cpp.server` on the same model: one request at a time behind its lock."""

    def __init__(self, workdir: Path, model: Path = MODEL, threads: int | None = None, context: int = 2048):
        self.port = free_port()
        self.workdir = workdir
        self.model = model
        self.threads = threads or os.cpu_count() or 2
        self.context = context
        self.process = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120) -> None:
        log = open(self.workdir / "peer.log", "ab")
        # interrupt_requests False: by default a waiting request cuts the running stream short.
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.llama_cpp_server", "--model", str(self.model), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", str(self.context), "--n_threads", str(self.threads),
             "--interrupt_requests", "False", "--model_alias", MODEL_NAME],
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
