"""llama.cpp's own llama-server on loopback: where its binary is, and one running instance.

Used by the remote-backend tests (as a real upstream) and by the benchmarks (as the peer). The
binary comes from scripts/build_llama_server.sh (cached per llama-cpp-python version and build arguments);
LLAMA_SERVER_BIN overrides it.
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = "scripts/build_llama_server.sh"


def pinned_llama_cpp_version() -> str:
    found = re.search(r"^llama-cpp-python==(\S+)", (ROOT / "requirements.txt").read_text(), re.MULTILINE)
    return found.group(1) if found else "unknown"


def build_cmake_args() -> str:
    """The CMake arguments every llama.cpp build of this project gets (scripts/llama_cpp_cmake_args.sh)."""
    script = ROOT / "scripts" / "llama_cpp_cmake_args.sh"
    return subprocess.run(["bash", str(script)], capture_output=True, text=True, check=True).stdout.strip()


def cached_binary() -> Path:
    """Where scripts/build_llama_server.sh keeps the binary for the pinned version and build arguments."""
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    key = hashlib.sha1(build_cmake_args().encode()).hexdigest()[:12]
    return cache / "llmsite" / f"llama-server-{pinned_llama_cpp_version()}-{key}" / "llama-server"


def find_llama_server() -> tuple[Path | None, str]:
    """(the binary, "") or (None, why it is missing). LLAMA_SERVER_BIN wins over the build cache."""
    override = os.environ.get("LLAMA_SERVER_BIN")
    if override:
        path = Path(override)
        if path.is_file() and os.access(path, os.X_OK):
            return path, ""
        return None, f"LLAMA_SERVER_BIN={override} is not an executable file"
    path = cached_binary()
    if path.is_file() and os.access(path, os.X_OK):
        return path, ""
    return None, f"llama-server is not built ({path} is missing): run {BUILD_SCRIPT} (10-15 minutes once)"


def cpu_has_amx() -> bool:
    """Whether this CPU has AMX, which a native build of the pinned llama.cpp uses to repack weights."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def amx_fixed(binary: Path) -> bool:
    """Whether `binary` was built by scripts/build_llama_server.sh with the AMX kernels' fix (-fno-dse): GCC 12
    builds without it crash at the first multi-row multiply of a quantized model on AMX (SmolLM2 Q4_1, measured).
    A binary from elsewhere (LLAMA_SERVER_BIN) is not assumed to have it."""
    try:
        return "-fno-dse" in (binary.parent / "cmake-args").read_text()
    except OSError:
        return False


class LlamaServer:
    """One llama-server process on 127.0.0.1, in its own process group (kill() takes it down at once)."""

    def __init__(self, binary: Path, model: Path, *, port: int, log_path: Path, context: int = 2048,
                 parallel: int = 1, threads: int | None = None, alias: str | None = None, extra: tuple = ()):
        self.binary = binary
        self.model = model
        self.port = port
        self.log_path = log_path
        self.context = context
        self.parallel = parallel
        self.threads = threads or os.cpu_count() or 2
        self.alias = alias
        self.extra = tuple(extra)
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def label(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        # -c is the total KV context, split evenly over the -np slots (each slot gets context/parallel).
        command = [str(self.binary), "--model", str(self.model), "--host", "127.0.0.1", "--port", str(self.port),
                   "--ctx-size", str(self.context), "--parallel", str(self.parallel),
                   "--threads", str(self.threads), "--threads-batch", str(self.threads)]
        if self.alias:
            command += ["--alias", self.alias]
        if cpu_has_amx() and not amx_fixed(self.binary):  # as the engine does (chat/engine/backends/amx.py)
            command.append("--no-repack")
        return command + list(self.extra)

    def start(self) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_until_ready(self, timeout: float = 120) -> None:
        """Until /health answers 200 (it answers 503 while the model loads)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama-server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama-server did not become ready within {timeout:g} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def metric(self, name: str) -> float:
        """One of its Prometheus counters (needs --metrics), e.g. `llamacpp:prompt_tokens_total`: tokens it
        evaluated, those reused from a slot or its RAM cache left out."""
        text = httpx.get(self.url + "/metrics", timeout=10).text
        found = re.search(rf"^{re.escape(name)}\s+([0-9.e+]+)", text, re.MULTILINE)
        if found is None:
            raise RuntimeError(f"llama-server's /metrics has no {name} (is --metrics set?):\n{text[:500]}")
        return float(found.group(1))

    def __enter__(self) -> LlamaServer:
        """Started and ready; stopped on leaving (a module fixture: `with LlamaServer(...) as server: yield server`)."""
        self.start()
        try:
            self.wait_until_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        if self.running:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if not self.running:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
