"""Shared fixtures: the real services (Redis, PostgreSQL) and the real model files.

A test that needs a service skips with a reason when it does not answer, unless
REQUIRE_SERVICES=1 (set by .ci/run), which turns the skip into a failure.
"""

import json
import os
import socket
import sys
from pathlib import Path
from urllib.parse import urlparse

import pytest

ROOT = Path(__file__).resolve().parent.parent
SMOLLM2_PATH = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
REQUIRE_SERVICES = os.environ.get("REQUIRE_SERVICES", "").lower() in {"1", "true", "yes"}


def missing_service(reason: str):
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (REQUIRE_SERVICES=1 makes this a failure)")
    pytest.skip(reason)


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="session")
def redis_url():
    url = os.environ.get("TEST_REDIS_URL", "redis://127.0.0.1:6379/15")
    if not _answers(url):
        missing_service(f"Redis is not answering at {url}")
    return url


@pytest.fixture(scope="session")
def postgres_url():
    url = os.environ.get("TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
    if not _answers(url):
        missing_service(f"PostgreSQL is not answering at {url}")
    return url


@pytest.fixture(scope="session")
def smollm2_path():
    if not SMOLLM2_PATH.exists():
        pytest.fail(f"{SMOLLM2_PATH} is missing: run `make model` (make test does it first)")
    return SMOLLM2_PATH


def pytest_collection_finish(session):
    # tests/chat/test_lazy_loading.py runs a collection in a subprocess and reads this report to prove
    # that collecting the suite loads no inference library.
    report = os.environ.get("LLMSITE_COLLECTION_REPORT")
    if report:
        loaded = sorted(name for name in ("llama_cpp", "ctransformers") if name in sys.modules)
        Path(report).write_text(json.dumps({"loaded": loaded}))
