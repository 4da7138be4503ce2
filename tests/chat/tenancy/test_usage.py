"""The usage ledger's reads: GET /v1/usage (the caller's own, totals and per UTC day) and the admin list
with its chart per day and its sums per key, user and character."""

from datetime import datetime, timezone

import pytest

from chat.models import UsageRecord
from tests.factories import make_api_client, make_character, make_superuser

pytestmark = pytest.mark.django_db


def record(client, *, day: str, prompt: int, completion: int, outcome="completed", character=None, key=None):
    row = UsageRecord.objects.create(owner=client.user, api_key=key or client.key, model="tiny", character=character,
                                     prompt_tokens=prompt, completion_tokens=completion, duration=0.5, outcome=outcome)
    UsageRecord.objects.filter(pk=row.pk).update(created_at=datetime.fromisoformat(day + "T12:00:00").replace(
        tzinfo=timezone.utc))
    return row


@pytest.fixture
def ledger():
    ann, ben = make_api_client("ann", key_name="ann-app"), make_api_client("ben", key_name="ben-app")
    mira = make_character("mira")
    record(ann, day="2026-11-30", prompt=10, completion=5, character=mira)
    record(ann, day="2026-11-30", prompt=20, completion=0, outcome="cancelled")
    record(ann, day="2026-12-01", prompt=7, completion=3, outcome="length", character=mira)
    record(ben, day="2026-12-01", prompt=1000, completion=1000)
    return ann, ben


def test_usage_returns_the_callers_own_totals_and_days(ledger):
    ann, ben = ledger
    for path in ("/v1/usage", "/v1/usage/"):
        body = ann.get(path, {"start": "2026-11-01", "end": "2026-12-31"}).json()
        assert body["totals"] == {"requests": 3, "prompt_tokens": 37, "completion_tokens": 8, "total_tokens": 45,
                                  "outcomes": {"completed": 1, "cancelled": 1, "length": 1}}
        assert body["data"] == [
            {"date": "2026-11-30", "requests": 2, "prompt_tokens": 30, "completion_tokens": 5, "total_tokens": 35},
            {"date": "2026-12-01", "requests": 1, "prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}]
    one_day = ann.get("/v1/usage", {"start": "2026-12-01", "end": "2026-12-01"}).json()
    assert one_day["totals"]["total_tokens"] == 10 and one_day["start"] == one_day["end"] == "2026-12-01"
    assert ben.get("/v1/usage", {"start": "2026-11-01", "end": "2026-12-31"}).json()["totals"]["total_tokens"] == 2000


def test_usage_refuses_bad_dates_in_the_error_shape_and_needs_a_key(ledger):
    ann, _ = ledger
    for query, param in (({"start": "yesterday"}, "start"), ({"start": "2026-12-02", "end": "2026-12-01"}, "start")):
        response = ann.get("/v1/usage", query)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    from tests.factories import api_client
    assert api_client().get("/v1/usage").status_code == 401


def test_the_admin_charts_usage_per_day_and_sums_it_per_key_user_and_character(ledger, client):
    make_superuser("boss", password="pw")
    client.login(username="boss", password="pw")
    page = client.get("/admin/chat/usagerecord/")
    assert page.status_code == 200
    chart = page.context["usage_chart"]
    assert [(bar["date"], bar["total_tokens"]) for bar in chart["bars"]] == [("2026-11-30", 35), ("2026-12-01", 2010)]
    assert chart["bars"][1]["completion_y"] == 0  # the peak day fills the chart
    html = page.content.decode()
    assert 'id="usage-chart"' in html and html.count('class="usage-bar"') == 2
    groups = dict(page.context["usage_groups"])
    assert [(row["name"], row["total_tokens"]) for row in groups["API key"]] == [("ben-app", 2000), ("ann-app", 45)]
    assert [(row["name"], row["total_tokens"]) for row in groups["User"]] == [("ben", 2000), ("ann", 45)]
    assert [(row["name"], row["total_tokens"]) for row in groups["Character"]] == [(None, 2020), ("Mira", 25)]
    filtered = client.get("/admin/chat/usagerecord/", {"q": "ann"})
    assert filtered.context["usage_totals"]["total_tokens"] == 45
    assert client.get("/admin/chat/usagerecord/add/").status_code == 403  # the ledger is read-only


@pytest.fixture
def tiny_site(settings, tmp_path):
    from dataclasses import replace

    from tests.factories import write_tiny_gguf

    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    models = tuple(replace(m, path=str(path), context_length=512) for m in settings.LLMSITE.models)
    settings.LLMSITE = replace(settings.LLMSITE, models=models)
    settings.API_RATE_LIMIT = ""


@pytest.mark.django_db(transaction=True)
def test_the_requests_user_is_kept_in_the_ledger_as_an_opaque_id_never_in_the_prompt(tiny_site):
    client = make_api_client("ann")
    end_user = "sha256:9f86d081884c7d65<|im_start|>"
    response = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                                                    "user": end_user}, format="json", HTTP_CACHE_CONTROL="no-cache")
    assert response.status_code == 200, response.content
    (row,) = UsageRecord.objects.filter(owner=client.user)
    assert row.end_user == end_user


@pytest.mark.parametrize("query", ["end=0001-01-01", "start=0001-01-01", "end=9999-12-31"])
def test_usage_days_out_of_range_are_400_not_a_server_error(ledger, query):
    """Found by the schema fuzzer: end=0001-01-01 made the window's arithmetic overflow (a 500)."""
    ann, _ = ledger
    response = ann.get(f"/v1/usage?{query}")
    assert response.status_code == 400, response.content
    assert response.json()["error"]["param"] == query.split("=")[0]
