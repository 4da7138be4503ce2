"""Settings: embedded defaults, DATABASE_URL/REDIS_URL switching (against the real services), bad config."""

import json

import pytest

from tests.subprocess_helpers import run_python

SHOW_SETTINGS = """
import json, django
django.setup()
from django.conf import settings
print(json.dumps({
    "db": settings.DATABASES["default"]["ENGINE"],
    "cache": settings.CACHES["default"]["BACKEND"],
    "layer": settings.CHANNEL_LAYERS["default"]["BACKEND"],
    "eager": settings.CELERY_TASK_ALWAYS_EAGER,
    "broker": settings.CELERY_BROKER_URL,
    "model": settings.LLMSITE.models[0].path,
    "gpu_layers": settings.LLMSITE.models[0].gpu_layers,
}))
"""


def show(env=None):
    result = run_python(SHOW_SETTINGS, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_embedded_defaults_need_nothing_installed():
    shown = show()
    assert shown["db"] == "django.db.backends.sqlite3"
    assert shown["cache"] == "django.core.cache.backends.locmem.LocMemCache"
    assert shown["layer"] == "channels.layers.InMemoryChannelLayer"
    assert shown["eager"] is True and shown["broker"] == "memory://"


def test_environment_overrides_single_config_values(tmp_path):
    shown = show({"LLMSITE_MODEL_PATH": str(tmp_path / "other.gguf"), "LLMSITE_GPU_LAYERS": "12"})
    assert shown["model"] == str(tmp_path / "other.gguf")
    assert shown["gpu_layers"] == 12


def test_database_and_redis_urls_switch_to_postgres_and_redis(postgres_url, redis_url):
    shown = show({"DATABASE_URL": postgres_url, "REDIS_URL": redis_url})
    assert shown["db"] == "django.db.backends.postgresql"
    assert shown["cache"] == "django_redis.cache.RedisCache"
    assert shown["layer"] == "channels_redis.core.RedisChannelLayer"
    assert shown["eager"] is False and shown["broker"] == redis_url

    # And they really talk to the real servers.
    result = run_python("""
import django, uuid
django.setup()
from django.db import connection
from django.core.cache import cache
with connection.cursor() as cursor:
    cursor.execute("select 41 + 1")
    print(cursor.fetchone()[0], connection.vendor)
key = "settings-test-" + uuid.uuid4().hex
cache.set(key, "from-redis", 30)
print(cache.get(key))
cache.delete(key)
""", env={"DATABASE_URL": postgres_url, "REDIS_URL": redis_url})
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["42", "postgresql", "from-redis"]


def test_redis_outage_degrades_the_cache_instead_of_failing():
    result = run_python("""
import django
django.setup()
from django.core.cache import cache
cache.set("k", "v")
print(repr(cache.get("k")))
""", env={"REDIS_URL": "redis://127.0.0.1:1/0"})
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "None"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (None, "file not found"),
        ("model_path: [unclosed\n", "malformed YAML at line"),
        ("- just\n- a list\n", "expected a mapping"),
        ("model_path: m.gguf\n", "'system_prompt' is required"),
        ("system_prompt: hi\nmodel_path: m.gguf\nbackend: vllm\n", "backend must be one of llama_cpp, ctransformers"),
        ("system_prompt: hi\nmodel_path: m.gguf\nsampling: {temprature: 1}\n", "unknown sampling option 'temprature'"),
    ],
)
def test_bad_config_stops_start_up_with_one_clear_line(tmp_path, content, expected):
    config = tmp_path / "config.yaml"
    if content is not None:
        config.write_text(content)
    result = run_python(["manage.py", "check"], env={"LLMSITE_CONFIG": str(config)})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert str(config) in lines[0] and expected in lines[0]


def test_check_deploy_with_production_variables_reports_no_errors():
    # HSTS preload (W021) is left to the operator (SECURE_HSTS_PRELOAD); nothing else may be reported.
    result = run_python(["manage.py", "check", "--deploy", "--fail-level", "WARNING"], env={
        "SECURE_HSTS_PRELOAD": "1",
        "DEBUG": "0",
        "SECRET_KEY": "a-long-random-production-secret-key-with-enough-entropy-0123456789",
        "ALLOWED_HOSTS": "chat.example.com",
    })
    assert result.returncode == 0, result.stderr + result.stdout


def test_production_without_secret_key_refuses_to_start():
    result = run_python(["manage.py", "check"], env={"DEBUG": "0"})
    assert result.returncode != 0
    assert result.stderr.strip() == "llmsite: configuration error: SECRET_KEY must be set when DEBUG is off"
