"""Health, readiness, Prometheus metrics and the structured request log."""

import dataclasses
import json
import logging

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from channels.testing import WebsocketCommunicator

from llmsite.asgi import application  # imported first: django.setup() there re-applies LOGGING, caplog after
from tests.factories import import_demo_resources, make_api_client

pytestmark = [pytest.mark.smollm2, pytest.mark.django_db]

SECRET_WORDS = "my-very-private-question-about-storms"


@pytest.fixture
def api():
    import_demo_resources()
    return make_api_client("obs", key_name="obs")


def metric_samples(client) -> dict:
    text = client.get("/metrics").content.decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def test_health_needs_no_key():
    response = APIClient().get("/health")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_ready_when_everything_answers():
    response = APIClient().get("/ready")
    assert response.status_code == 200, response.json()
    checks = response.json()["checks"]
    assert checks["database"]["ok"] and checks["model"]["ok"] and checks["model"]["loaded"]
    assert "redis" not in checks  # not configured in the embedded setup


def test_ready_reports_a_missing_model_file_without_revealing_paths(settings, tmp_path):
    models = tuple(dataclasses.replace(m, path=str(tmp_path / "gone.gguf")) for m in settings.LLMSITE.models)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)
    response = APIClient().get("/ready")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "unavailable" and body["checks"]["database"]["ok"]
    assert body["checks"]["model"] == {"ok": False, "model": "smollm2-135m-instruct", "loaded": False,
                                       "error": "model file gone.gguf is missing"}
    assert str(tmp_path) not in response.content.decode()


def test_ready_reports_redis_down(settings):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    response = APIClient().get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["redis"] == {"ok": False, "error": "Redis does not answer"}
    assert "6379" not in response.content.decode() and "127.0.0.1:1" not in response.content.decode()


def test_metrics_count_completions_tokens_and_cache(api):
    before = metric_samples(api)
    usages = []
    for question in ("Say hi.", "Say bye.", "Say hi."):  # the third repeats the first: a cache hit
        response = api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": question}],
                                                     "max_tokens": 6, "temperature": 0}, format="json")
        assert response.status_code == 200
        usages.append(response.json()["usage"])
    after = metric_samples(api)

    def moved(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    model = {"model": "smollm2-135m-instruct"}
    assert moved("llmsite_http_requests_total", endpoint="chat-completions", method="POST", status="200") == 3
    assert moved("llmsite_response_cache_total", result="miss") == 2
    assert moved("llmsite_response_cache_total", result="hit") == 1
    live = usages[:2]  # the hit generated nothing
    assert moved("llmsite_completion_tokens_total", **model) == sum(u["completion_tokens"] for u in live)
    assert moved("llmsite_prompt_tokens_total", **model) == sum(u["prompt_tokens"] for u in live)
    assert moved("llmsite_time_to_first_token_seconds_count", **model) == 2
    assert moved("llmsite_generation_seconds_count", **model) == 2
    assert value(after, "llmsite_scheduler_active_sequences", **model) == 0
    assert ("llmsite_prefix_cache_hits_total", (("model", "smollm2-135m-instruct"),)) in after
    assert ("llmsite_jobs", (("state", "done"),)) in after


def test_a_made_up_method_adds_no_series_of_its_own(settings):
    """Anyone may send any method name; each would otherwise add series that live as long as the process."""
    settings.METRICS_TOKEN = ""
    client = APIClient()
    for name in ("ZZMETHOD1", "ZZMETHOD2"):
        assert client.generic(name, "/health").status_code == 405
    text = client.get("/metrics").content.decode()
    assert "ZZMETHOD" not in text and 'method="other",status="405"' in text


def test_metrics_can_require_a_token(settings):
    settings.METRICS_TOKEN = "scrape-secret"
    assert APIClient().get("/metrics").status_code == 401
    assert APIClient().get("/metrics", HTTP_AUTHORIZATION="Bearer scrape-secret").status_code == 200


def test_metrics_refuse_without_a_token_when_debug_is_off(settings):
    settings.METRICS_OPEN_WITHOUT_TOKEN = False  # what settings.py derives from DEBUG=0
    settings.METRICS_TOKEN = ""
    response = APIClient().get("/metrics")
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "metrics_token_not_set"
    assert "llmsite_" not in response.content.decode()


def test_every_log_line_of_a_request_carries_its_request_id(api, caplog):
    with caplog.at_level(logging.INFO):
        response = api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 4,
            "character": "captain-mira"}, format="json", HTTP_X_REQUEST_ID="trace42")
    assert response["X-Request-ID"] == "trace42"
    ours = [r for r in caplog.records if r.name.startswith("llmsite.")]
    assert {"llmsite.requests", "llmsite.chat"} <= {r.name for r in ours}
    assert all(r.request_id == "trace42" for r in ours), [(r.name, r.request_id) for r in ours]


def test_a_background_job_run_inline_logs_with_the_request_id(api, caplog):
    with caplog.at_level(logging.INFO):
        response = api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Hello there."}], "max_tokens": 4, "background": True,
            "character": "captain-mira"}, format="json", HTTP_X_REQUEST_ID="jobtrace7")
    assert response.status_code in (200, 202), response.content
    during = [r for r in caplog.records if r.name.startswith("llmsite.") and r.name != "llmsite.requests"]
    assert during and all(r.request_id == "jobtrace7" for r in during), [(r.name, r.request_id) for r in during]


def test_one_structured_log_line_per_request_without_prompt_text(api, caplog):
    with caplog.at_level(logging.INFO):
        response = api.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Is a storm coming? {SECRET_WORDS}"}],
            "max_tokens": 6, "character": "captain-mira"}, format="json")
    assert response.status_code == 200
    lines = [r for r in caplog.records if r.name == "llmsite.requests"]
    assert len(lines) == 1
    fields = vars(lines[0])  # the request's fields are the record's: top-level keys of its JSON line
    assert fields["request_id"] == response["X-Request-ID"]
    assert fields["key_id"] == api.key.pk and fields["status"] == 200
    assert fields["character"] == "captain-mira" and fields["model"] == "smollm2-135m-instruct"
    assert fields["prompt_tokens"] > 0 and fields["completion_tokens"] > 0
    assert fields["ttft_ms"] > 0 and fields["total_ms"] >= fields["ttft_ms"] and fields["cache"] == "BYPASS"
    everything = "\n".join(r.getMessage() + json.dumps(vars(r), default=str) for r in caplog.records)
    assert SECRET_WORDS not in everything and api.raw_key not in everything
    assert "Received request for character captain-mira" in everything


def test_prompts_are_logged_only_when_the_setting_says_so(api, caplog, settings):
    settings.LOG_PROMPTS = True
    with caplog.at_level(logging.INFO):
        api.post("/v1/chat/completions", {"messages": [{"role": "user", "content": SECRET_WORDS}], "max_tokens": 4},
                 format="json")
    line = vars(next(r for r in caplog.records if r.name == "llmsite.requests"))
    assert SECRET_WORDS in line["prompt"] and "reply" in line


@pytest.mark.django_db(transaction=True)
async def test_every_log_line_of_a_websocket_connection_carries_its_request_id(api, caplog):
    comm = WebsocketCommunicator(application, "/ws/chat/captain-mira/", headers=[
        (b"origin", b"http://127.0.0.1:8000"), (b"authorization", f"Bearer {api.raw_key}".encode()),
        (b"x-request-id", b"socket99")])
    with caplog.at_level(logging.INFO):
        connected, _ = await comm.connect()
        assert connected
        await comm.send_json_to({"type": "message", "content": "Hello, Captain.", "max_tokens": 4})
        while (await comm.receive_json_from(timeout=60))["type"] not in ("end", "error"):
            pass
        await comm.disconnect()
    ours = [r for r in caplog.records if r.name.startswith("llmsite.")]
    assert {"llmsite.ws", "llmsite.chat"} <= {r.name for r in ours}
    assert all(r.request_id == "socket99" for r in ours), [(r.name, r.request_id) for r in ours]
