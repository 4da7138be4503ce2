"""Settings of the in-process test run: the project's own, with DEBUG opted into as `make run` does.

The project's defaults are production-safe (DEBUG off: a SECRET_KEY is required and HTTP is
redirected to HTTPS); tests that need production behaviour run it in a child process.
"""

import os

os.environ.setdefault("DEBUG", "1")
os.environ.setdefault("LLMSITE_ENV_FILE", "")  # a checkout's local .env (make run) stays out of the tests

from llmsite.settings import *  # noqa: E402,F403
