"""Run Django in a child process with a chosen environment (settings are read once per process)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Variables that would leak the parent's choices into the child.
CLEARED = ("DATABASE_URL", "REDIS_URL", "DEBUG", "SECRET_KEY", "ALLOWED_HOSTS", "LLMSITE_CONFIG",
           "LLMSITE_MODEL_PATH", "LLMSITE_GPU_LAYERS", "LLMSITE_THREADS", "CELERY_TASK_ALWAYS_EAGER")


def run_python(code_or_args, *, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    child_env = {key: value for key, value in os.environ.items() if key not in CLEARED}
    child_env["DJANGO_SETTINGS_MODULE"] = "llmsite.settings"
    child_env["DEBUG"] = "1"  # opted into, as `make run` does; a test passes DEBUG=0 for production
    child_env["LLMSITE_ENV_FILE"] = ""  # a checkout's local .env (make run) must not leak into the child
    child_env.update(env or {})
    child_env = {key: value for key, value in child_env.items() if value is not None}  # None: unset it
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else list(code_or_args)
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=child_env, capture_output=True,
                          text=True, timeout=timeout)
