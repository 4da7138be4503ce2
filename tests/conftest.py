"""Shared fixtures: the real services (Redis, PostgreSQL) and the real model files; the markers.

A test that needs a service skips with a reason when it does not answer, unless
REQUIRE_SERVICES=1 (set by .ci/run), which turns the skip into a failure.

Tests are marked by the fixtures they use (pytest_collection_modifyitems below): `smollm2` for the
real model or a live server, `services` for Redis, PostgreSQL, Chromium (and nginx, llama-server).
`make test-fast` leaves both out: `pytest -m "not smollm2 and not services"`.
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


def llama_server_binary():
    """The llama-server binary (tests/llama_server.py), or a skip (a failure under REQUIRE_SERVICES=1) naming why."""
    from tests.llama_server import find_llama_server

    binary, missing = find_llama_server()
    if binary is None:
        missing_service(missing)
    return binary


def _answers(url: str) -> bool:
    parsed = urlparse(url)
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture
def editor_client(client):
    """Django's test client, logged in as a staff member (not a superuser) of the "Content editors" group
    (the migration's); a test adds the one extra permission it needs with `grant`."""
    from django.contrib.auth.models import Group, Permission

    from tests.factories import make_user

    editor = make_user("content-editor", is_staff=True)
    editor.groups.add(Group.objects.get(name="Content editors"))

    def grant(*codenames: str) -> None:
        editor.user_permissions.add(*Permission.objects.filter(codename__in=codenames))
        assert editor.user_permissions.count() >= len(codenames), codenames

    client.force_login(editor)
    client.user, client.grant = editor, grant
    return client


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
def endless_model(tmp_path_factory):
    """A tiny random-weight model that never ends a reply by itself: a generation runs to max_tokens (or a stop)."""
    from tests.factories import write_tiny_gguf

    return write_tiny_gguf(tmp_path_factory.mktemp("endless") / "endless.gguf", never_ends=True)


@pytest.fixture
def endless_site(settings, endless_model):
    """Every configured model served by `endless_model`; call it with the context length the test needs."""
    import dataclasses

    def serve(context_length: int) -> None:
        models = tuple(dataclasses.replace(model, path=str(endless_model), context_length=context_length)
                       for model in settings.LLMSITE.models)
        settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)
        settings.API_RATE_LIMIT = ""

    return serve


@pytest.fixture(scope="session")
def smollm2_path():
    if not SMOLLM2_PATH.exists():
        pytest.fail(f"{SMOLLM2_PATH} is missing: run `make model` (make test does it first)")
    return SMOLLM2_PATH


# Fixtures that load the real SmolLM2 file or start a live daphne server (tests.live.LiveServer). A
# fixture that requests smollm2_path (the remote stacks, the response-cache server, ...) is caught
# through it: a test's fixturenames hold every fixture it uses, directly or not. A test that starts a
# LiveServer in its own body carries the marker itself (pytestmark or @pytest.mark.smollm2).
SMOLLM2_FIXTURES = frozenset({
    "smollm2_path", "smollm2_gguf", "smollm2",                              # the file; the engine loading it
    "live_api", "live_ws", "page_server", "docs_server", "other_backends",  # start a LiveServer
})
# Fixtures that need a service of this machine: Redis, PostgreSQL; Chromium (the browser pages).
# nginx (tests/llmsite/test_deploy.py) comes with redis_url and postgres_url; the llama-server
# module (tests/chat/test_remote_llama_server.py) is marked by its pytestmark.
SERVICES_FIXTURES = frozenset({"redis_url", "postgres_url", "page_server", "docs_server"})


def pytest_collection_modifyitems(config, items):
    for item in items:
        used = set(getattr(item, "fixturenames", ()))
        if used & SMOLLM2_FIXTURES and item.get_closest_marker("smollm2") is None:
            item.add_marker(pytest.mark.smollm2)
        if used & SERVICES_FIXTURES and item.get_closest_marker("services") is None:
            item.add_marker(pytest.mark.services)


def pytest_collection_finish(session):
    # tests/chat/test_lazy_loading.py runs a collection in a subprocess and reads this report to prove
    # that collecting the suite loads no inference library.
    report = os.environ.get("LLMSITE_COLLECTION_REPORT")
    if report:
        loaded = sorted(name for name in ("llama_cpp", "ctransformers") if name in sys.modules)
        Path(report).write_text(json.dumps({"loaded": loaded}))


@pytest.fixture(autouse=True)
def fresh_rate_limit_windows():
    """Rate-limit counters are kept per API key or user id, and ids repeat after each test's rollback: a test would
    spend the budget that earlier tests' keys of the same id spent in the same minute (429s in later tests,
    depending on how many requests the tests before them sent). Each test starts with fresh windows."""
    from django.core.cache import cache

    if hasattr(cache, "delete_pattern"):  # django-redis
        cache.delete_pattern("throttle:*")
    else:  # the local-memory cache: its stored keys carry the version prefix (":1:throttle:...")
        for stored in [key for key in list(getattr(cache, "_cache", {})) if ":throttle:" in key]:
            cache.delete(stored.split(":", 2)[2])
    yield
