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
    "weights": settings.LLMSITE.models[0].weights,
}))
"""


def show(env=None):
    result = run_python(SHOW_SETTINGS, env=env)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_embedded_defaults_need_nothing_installed():
    shown = show()
    assert shown["db"] == "django.db.backends.sqlite3"
    assert shown["cache"] == "llmsite.cache_backends.SweepingLocMemCache"  # local memory, expired entries swept first
    assert shown["layer"] == "channels.layers.InMemoryChannelLayer"
    assert shown["eager"] is True and shown["broker"] == "memory://"


def test_environment_overrides_single_config_values(tmp_path):
    shown = show({"LLMSITE_MODEL_PATH": str(tmp_path / "other.gguf"), "LLMSITE_GPU_LAYERS": "12"})
    assert shown["model"] == str(tmp_path / "other.gguf")
    assert shown["gpu_layers"] == 12
    # config.yaml's `weights` belongs to its file: another file loads as it is, unless asked.
    assert show()["weights"] == "q8_0" and shown["weights"] == ""
    assert show({"LLMSITE_MODEL_PATH": str(tmp_path / "other.gguf"), "LLMSITE_MODEL_WEIGHTS": "q8_0"})["weights"] == "q8_0"


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
        # Refused by the engine's own ModelSpec, still at start-up and in one line.
        ("system_prompt: hi\nmodel_path: m.gguf\nparallel: 0\n", "model 'm': parallel must be from 1 to 256"),
        # Two stores in one folder would remove each other's files as foreign.
        ("system_prompt: hi\nmodel_path: m.gguf\nstate_dir: var/kv\nmodels:\n  - {name: n, model_path: n.gguf, "
         "state_dir: var/kv}\n", "each model needs a state_dir of its own"),
        ("system_prompt: hi\nmodel_path: m.gguf\nstate_dir: var/kv\nmodels:\n  - {name: n, model_path: n.gguf, "
         "state_dir: var/other/../kv}\n", "each model needs a state_dir of its own"),
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
        # The rest of a production environment (deploy/README.md): nothing in it may warn either.
        "DATABASE_URL": "postgresql://llmsite@db.internal:5432/llmsite",
        "REDIS_URL": "redis://redis.internal:6379/0", "CHANNEL_LAYER_URL": "redis://redis.internal:6379/1",
        "CELERY_BROKER_URL": "redis://redis.internal:6379/1", "SERVE_STATIC": "0", "METRICS_TOKEN": "scrape",
        "EMAIL_HOST": "smtp.example.com",
    })
    assert result.returncode == 0, result.stderr + result.stdout


def test_production_without_secret_key_refuses_to_start():
    result = run_python(["manage.py", "check"], env={"DEBUG": "0"})
    assert result.returncode != 0
    assert result.stderr.strip() == "llmsite: configuration error: SECRET_KEY must be set when DEBUG is off"


PRODUCTION = {"DEBUG": "0", "SECRET_KEY": "a-long-random-production-secret-key-with-enough-entropy-0123456789",
              "ALLOWED_HOSTS": "chat.example.com,testserver"}


def test_debug_is_off_unless_asked_for():
    result = run_python(["manage.py", "check"], env={"DEBUG": None})
    assert result.returncode != 0
    assert result.stderr.strip() == "llmsite: configuration error: SECRET_KEY must be set when DEBUG is off"
    shown = run_python("import django; django.setup(); from django.conf import settings; print(settings.DEBUG)",
                       env={"DEBUG": None, "SECRET_KEY": PRODUCTION["SECRET_KEY"]})
    assert shown.stdout.strip() == "False", shown.stderr


def test_the_test_clients_host_is_allowed_only_with_debug():
    show = "import django; django.setup(); from django.conf import settings; print(settings.ALLOWED_HOSTS)"
    production = run_python(show, env={"DEBUG": "0", "SECRET_KEY": PRODUCTION["SECRET_KEY"]})
    assert production.stdout.strip() == "['127.0.0.1', 'localhost', '[::1]']", production.stderr
    assert "testserver" in run_python(show, env={"DEBUG": "1"}).stdout


@pytest.mark.parametrize(
    ("variable", "value", "expected"),
    [
        ("API_RATE_LIMIT", "120/minn", "API_RATE_LIMIT='120/minn' is not a rate like '120/min'"),
        ("API_RATE_LIMIT", "many/min", "API_RATE_LIMIT='many/min' is not a rate"),
        ("API_RATE_LIMIT", "0/min", "API_RATE_LIMIT='0/min' is not a rate"),
        ("PASSWORD_RESET_RATE_LIMIT", "5/fortnight", "PASSWORD_RESET_RATE_LIMIT='5/fortnight' is not a rate"),
        ("API_MAX_TOKENS", "lots", "API_MAX_TOKENS='lots' is not an integer"),
        ("API_MAX_TOKENS", "0", "API_MAX_TOKENS='0' must be at least 1"),
        ("SSE_KEEPALIVE_SECONDS", "soon", "SSE_KEEPALIVE_SECONDS='soon' is not a number"),
        ("STREAM_INTERVAL_MS", "-1", "STREAM_INTERVAL_MS='-1' must be at least 0"),
        ("STREAM_INTERVAL_MS", "5000", "STREAM_INTERVAL_MS='5000' must be at most 1000"),
        ("REQUEST_MAX_BODY_BYTES", "1000", "REQUEST_MAX_BODY_BYTES='1000' must be at least 1000000"),
        ("LOG_LEVEL", "LOUD", "LOG_LEVEL='LOUD' is not one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
        ("LOG_FORMAT", "xml", "LOG_FORMAT='xml' is not json or plain"),
        ("RESPONSE_CACHE_ENABLED", "perhaps", "RESPONSE_CACHE_ENABLED='perhaps' is not a yes/no value"),
        ("REDIS_URL", "127.0.0.1:6379", "REDIS_URL must be a URL starting with redis://"),
        ("DATABASE_URL", "mongodb://db/x", "DATABASE_URL is not a database URL"),
    ],
)
def test_a_bad_setting_stops_start_up_with_one_line_naming_it(variable, value, expected):
    result = run_python(["manage.py", "check"], env={variable: value})
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    assert result.stderr.strip() == f"llmsite: configuration error: {expected}" or (
        result.stderr.strip().startswith(f"llmsite: configuration error: {expected}")
        and len(result.stderr.strip().splitlines()) == 1), result.stderr


def test_a_good_rate_limit_is_accepted():
    result = run_python("import django; django.setup(); from django.conf import settings; print(settings.API_RATE_LIMIT)",
                        env={"API_RATE_LIMIT": "30/hour"})
    assert result.stdout.strip() == "30/hour", result.stderr


def test_production_keeps_the_broker_and_channel_layer_out_of_the_cache_database():
    shared = run_python(["manage.py", "check"], env={**PRODUCTION, "REDIS_URL": "redis://127.0.0.1:6379/12"})
    assert shared.returncode != 0
    assert shared.stderr.strip().startswith("llmsite: configuration error: CHANNEL_LAYER_URL must name another "
                                            "Redis database than REDIS_URL")
    broker_shared = run_python(["manage.py", "check"], env={
        **PRODUCTION, "REDIS_URL": "redis://127.0.0.1:6379/12", "CHANNEL_LAYER_URL": "redis://127.0.0.1:6379/13"})
    assert "CELERY_BROKER_URL must name another Redis database" in broker_shared.stderr
    separate = run_python(SHOW_SETTINGS, env={**PRODUCTION, "REDIS_URL": "redis://127.0.0.1:6379/12",
                                              "CHANNEL_LAYER_URL": "redis://127.0.0.1:6379/13",
                                              "CELERY_BROKER_URL": "redis://127.0.0.1:6379/13"})
    assert separate.returncode == 0, separate.stderr
    assert json.loads(separate.stdout)["broker"] == "redis://127.0.0.1:6379/13"


PRODUCTION_REQUESTS = """
import django, json
django.setup()
from django.core.management import call_command
from django.test import Client
call_command("migrate", verbosity=0)
client = Client()
def status(path, **headers):
    return client.get(path, **headers).status_code
print(json.dumps({
    "health": status("/health"), "ready_redirect": client.get("/ready")["Location"] if status("/ready") == 301 else None,
    "api_http": status("/v1/models"), "api_location": client.get("/v1/models").get("Location"),
    "api_https": status("/v1/models", HTTP_X_FORWARDED_PROTO="https"),
    "metrics": status("/metrics"), "metrics_https": status("/metrics", HTTP_X_FORWARDED_PROTO="https"),
    "metrics_token": status("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret"),
    "password_reset": status("/accounts/password_reset/", HTTP_X_FORWARDED_PROTO="https"),
    "login": status("/accounts/login/", HTTP_X_FORWARDED_PROTO="https"),
}))
"""


def test_production_behind_a_tls_proxy_redirects_once_and_leaves_probes_alone(tmp_path):
    result = run_python(PRODUCTION_REQUESTS, env={**PRODUCTION, "SQLITE_PATH": str(tmp_path / "db.sqlite3")})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["health"] == 200 and shown["ready_redirect"] is None  # probes are never redirected
    assert shown["api_http"] == 301 and shown["api_location"] == "https://testserver/v1/models"
    assert shown["api_https"] == 401  # the proxy said https: served (and asks for a key), no loop
    # No METRICS_TOKEN in production: refused, also over https.
    assert shown["metrics"] == 401 and shown["metrics_https"] == 401 and shown["metrics_token"] == 401
    assert shown["password_reset"] == 404  # no mail backend: no reset pages
    assert shown["login"] == 200


def test_production_metrics_answer_the_token_and_reset_pages_exist_with_mail(tmp_path):
    result = run_python(PRODUCTION_REQUESTS, env={
        **PRODUCTION, "SQLITE_PATH": str(tmp_path / "db.sqlite3"), "METRICS_TOKEN": "scrape-secret",
        "EMAIL_BACKEND": "django.core.mail.backends.locmem.EmailBackend"})
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout.strip().splitlines()[-1])
    assert shown["metrics"] == 401 and shown["metrics_token"] == 200
    assert shown["password_reset"] == 200


def test_logs_are_one_json_object_per_line_with_the_request_id(tmp_path):
    result = run_python("""
import django, logging
django.setup()
from django.test import Client
Client().get("/v1/models", HTTP_X_REQUEST_ID="abc123")
logging.getLogger("llmsite.check").warning("a line of its own")
""", env={"SQLITE_PATH": str(tmp_path / "db.sqlite3"), "LOG_LEVEL": "INFO"})
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in result.stderr.strip().splitlines()]  # each line is one object
    request = next(r for r in records if r["logger"] == "llmsite.requests")
    assert request["request_id"] == "abc123" and request["status"] == 401 and request["path"] == "/v1/models"
    assert request["message"] == "GET /v1/models 401" and request["level"] == "INFO" and "time" in request
    other = next(r for r in records if r["message"] == "a line of its own")
    assert other["level"] == "WARNING" and "request_id" in other
