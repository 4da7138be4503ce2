"""The quota policy (chat/tenancy/quotas.py) on the local-memory cache, and its 429s in the one error shape
through the API and the WebSocket before anything is generated."""

import json

import pytest
from channels.testing import WebsocketCommunicator
from django.core.cache import cache

from chat.tenancy.owners import Tenant
from chat.tenancy.quotas import (Limits, QuotaExceeded, concurrency_key, limits_for, quota_admit, tokens_charge,
                                 tokens_check, tokens_spent)
from tests.factories import import_demo_resources, make_api_client

pytestmark = pytest.mark.django_db

NOON = 1_800_000_000 - 1_800_000_000 % 86400 + 43200  # 12:00:00 UTC on some day, on a minute boundary


@pytest.fixture(autouse=True)
def empty_cache():
    cache.clear()
    yield
    cache.clear()


def test_a_key_field_overrides_the_setting_and_empty_takes_it(settings):
    settings.API_KEY_MAX_CONCURRENT, settings.API_KEY_TOKENS_PER_MINUTE, settings.API_KEY_TOKENS_PER_DAY = 3, 100, 1000
    key = make_api_client("q").key
    assert limits_for(key) == Limits(3, 100, 1000)
    key.max_concurrent, key.tokens_per_day = 0, 50
    assert limits_for(key) == Limits(0, 100, 50)
    assert limits_for(None) == Limits(3, 100, 1000)  # a browser session: the defaults


def test_a_busy_keys_running_count_does_not_lapse(monkeypatch):
    """The counter's expiry (for holds whose release never ran) was set once, when it was created: a key kept
    busy got its whole limit again each time it lapsed. Each take and release now starts it over."""
    import time

    from chat.tenancy import quotas

    monkeypatch.setattr(quotas, "SLOT_TTL", 2)  # an hour, shortened
    client = make_api_client("busy")
    client.key.max_concurrent = 2
    client.key.save()
    tenant = Tenant(user=client.user, api_key=client.key)
    first = quota_admit(tenant)
    time.sleep(1.2)
    second = quota_admit(tenant)  # the key stays busy
    time.sleep(1.2)  # past the first take's expiry, within the second's
    with pytest.raises(QuotaExceeded):
        quota_admit(tenant)
    first.settle()
    second.settle()
    assert cache.get(concurrency_key(tenant.quota_identity)) == 0


@pytest.mark.smollm2
def test_a_key_at_its_limit_is_refused_before_its_prompt_is_composed(settings):
    """Composing costs CPU (a megabyte of words against the scenarios): a key that cannot run anything now gets
    its 429 first, not the 400 its over-long message would get."""
    client = make_api_client("at-limit")
    client.key.max_concurrent, client.key.tokens_per_minute = 1, 100
    client.key.save()
    tenant = Tenant(user=client.user, api_key=client.key)
    huge = {"messages": [{"role": "user", "content": "storm " * 100_000}], "max_tokens": 8}
    assert client.post("/v1/chat/completions", huge, format="json").json()["error"]["code"] == \
        "context_length_exceeded"
    running = quota_admit(tenant)
    refused = client.post("/v1/chat/completions", huge, format="json")
    assert refused.status_code == 429 and refused.json()["error"]["code"] == "concurrency_limit_exceeded"
    running.settle(used_tokens=100)  # the minute's budget is spent
    refused = client.post("/v1/chat/completions", huge, format="json")
    assert refused.status_code == 429 and "100 tokens per minute" in refused.json()["error"]["message"]


def test_token_budgets_refuse_once_spent_until_the_window_ends():
    limits = Limits(tokens_per_minute=10, tokens_per_day=25)
    tokens_check("key:1", limits, now=NOON)
    tokens_charge("key:1", 12, now=NOON + 5)  # one generation may overshoot the budget
    with pytest.raises(QuotaExceeded) as refused:
        tokens_check("key:1", limits, now=NOON + 20)
    assert refused.value.status == 429 and refused.value.code == "token_quota_exceeded"
    assert refused.value.retry_after == 40  # the rest of this minute
    tokens_check("key:2", limits, now=NOON + 20)  # another key's budget is its own
    tokens_check("key:1", limits, now=NOON + 60)  # the next minute
    tokens_charge("key:1", 14, now=NOON + 61)
    with pytest.raises(QuotaExceeded) as refused:
        tokens_check("key:1", limits, now=NOON + 130)
    assert refused.value.retry_after == 43200 - 130  # 26 of 25 today: until midnight UTC
    tokens_check("key:1", limits, now=NOON + 43200)  # the next day


def limited_tenant(name: str, **limits) -> Tenant:
    client = make_api_client(name)
    for field, value in limits.items():
        setattr(client.key, field, value)
    client.key.save()
    return Tenant(user=client.user, api_key=client.key)


def test_a_slot_is_held_until_released_once():
    tenant = limited_tenant("slots", max_concurrent=2)
    first = quota_admit(tenant)
    second = quota_admit(tenant)
    with pytest.raises(QuotaExceeded) as refused:
        quota_admit(tenant)
    assert refused.value.code == "concurrency_limit_exceeded" and refused.value.retry_after == 1
    first.settle()
    first.settle()  # idempotent: gives back one slot, not two
    third = quota_admit(tenant)
    with pytest.raises(QuotaExceeded):
        quota_admit(tenant)
    for hold in (second, third):
        hold.settle()
    assert cache.get(concurrency_key(tenant.quota_identity)) == 0
    assert quota_admit(limited_tenant("unlimited", max_concurrent=0)).slot_key is None  # no limit: nothing counted


def test_a_request_of_n_sequences_takes_n_slots_and_each_sequence_gives_its_own_back():
    tenant = limited_tenant("choices", max_concurrent=3)
    with pytest.raises(QuotaExceeded) as refused:
        quota_admit(tenant, slots=4)
    assert refused.value.code == "concurrency_limit_exceeded" and "needs 4" in refused.value.message
    assert (cache.get(concurrency_key(tenant.quota_identity)) or 0) == 0  # a refusal holds nothing
    hold = quota_admit(tenant, slots=3)
    with pytest.raises(QuotaExceeded):
        quota_admit(tenant)
    choice = hold.split(slots=1, tokens=0)
    choice.settle()
    assert cache.get(concurrency_key(tenant.quota_identity)) == 2  # one choice ended, two still run
    hold.settle()
    assert cache.get(concurrency_key(tenant.quota_identity)) == 0


def test_a_reservation_bounds_concurrent_requests_and_is_settled_to_what_was_used():
    tenant = limited_tenant("reserving", tokens_per_minute=100)
    identity = tenant.quota_identity
    first = quota_admit(tenant, tokens=60, now=NOON)
    with pytest.raises(QuotaExceeded) as refused:  # checked-then-charged would admit it: nothing is spent yet
        quota_admit(tenant, tokens=60, now=NOON + 1)
    assert refused.value.code == "token_quota_exceeded" and refused.value.retry_after == 59
    assert tokens_spent(identity, "minute", now=NOON + 1) == 60  # the refusal reserved nothing
    first.settle(25)  # it used 25 of its 60
    assert tokens_spent(identity, "minute", now=NOON + 2) == 25
    second = quota_admit(tenant, tokens=60, now=NOON + 2)
    second.settle(0)  # refused by the engine: given back whole
    assert tokens_spent(identity, "minute", now=NOON + 3) == 25
    tokens_check(identity, Limits(tokens_per_minute=100), tokens=75, now=NOON + 3)
    with pytest.raises(QuotaExceeded):
        tokens_check(identity, Limits(tokens_per_minute=100), tokens=76, now=NOON + 3)


def test_a_request_larger_than_the_whole_budget_runs_only_alone_in_its_window():
    tenant = limited_tenant("big", tokens_per_minute=100)
    alone = quota_admit(tenant, tokens=500, now=NOON)  # nothing spent this minute: admitted
    with pytest.raises(QuotaExceeded):
        quota_admit(tenant, tokens=1, now=NOON + 1)
    alone.settle(480)
    with pytest.raises(QuotaExceeded):
        quota_admit(tenant, tokens=1, now=NOON + 2)
    quota_admit(tenant, tokens=500, now=NOON + 60).settle(0)  # the next minute


def hold_a_slot(client):
    """What a running generation of the key holds (chat/tenancy/metering.py)."""
    return quota_admit(Tenant(user=client.user, api_key=client.key))


REQUEST = {"messages": [{"role": "user", "content": "Is a storm coming?"}], "character": "captain-mira",
           "max_tokens": 4}


@pytest.mark.smollm2
def test_http_answers_429_with_retry_after_for_a_key_at_its_limits():
    import_demo_resources()
    client = make_api_client("busy")
    client.key.max_concurrent = 1
    client.key.save()
    hold = hold_a_slot(client)
    for body in (REQUEST, {**REQUEST, "stream": True}):
        response = client.post("/v1/chat/completions", body, format="json", HTTP_CACHE_CONTROL="no-cache")
        assert response.status_code == 429 and response["Retry-After"] == "1"
        assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "rate_limit_error",
                                             "param": None, "code": "concurrency_limit_exceeded"}
    response = client.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, format="json")
    assert response.status_code == 429 and response["Retry-After"] == "1"
    hold.settle()

    client.key.max_concurrent, client.key.tokens_per_minute = None, 5
    client.key.save()
    tokens_charge(f"key:{client.key.pk}", 5)
    response = client.post("/v1/chat/completions", {**REQUEST, "stream": True}, format="json",
                           HTTP_CACHE_CONTROL="no-cache")
    assert response.status_code == 429 and 0 < int(response["Retry-After"]) <= 60
    assert response.json()["error"]["code"] == "token_quota_exceeded"
    response = client.post("/v1/chat/completions", {**REQUEST, "background": True}, format="json")
    assert response.status_code == 429  # a job is refused when submitted, not failed later


@pytest.mark.smollm2
@pytest.mark.django_db(transaction=True)
async def test_the_websocket_answers_an_error_event_with_retry_after():
    from asgiref.sync import sync_to_async

    from llmsite.asgi import application

    def prepare():
        import_demo_resources()
        client = make_api_client("ws-busy")
        client.key.max_concurrent = 1
        client.key.save()
        return client, hold_a_slot(client)

    client, hold = await sync_to_async(prepare)()
    comm = WebsocketCommunicator(application, "/ws/chat/captain-mira/",
                                 headers=[(b"authorization", f"Bearer {client.raw_key}".encode())])
    connected, _ = await comm.connect()
    assert connected
    try:
        await comm.send_to(text_data=json.dumps({"type": "message", "content": "Hello?", "max_tokens": 4}))
        event = await comm.receive_json_from(timeout=60)
        assert event["type"] == "error" and event["status"] == 429, event
        assert event["error"]["code"] == "concurrency_limit_exceeded" and event["retry_after"] == 1
    finally:
        await comm.disconnect()
        await sync_to_async(hold.settle)()


def test_an_operator_sets_a_keys_quotas_on_its_admin_page(admin_client):
    key = make_api_client("quota-admin").key
    page = admin_client.get(f"/admin/chat/apikey/{key.pk}/change/").content.decode()
    assert all(f'name="{field}"' in page for field in ("max_concurrent", "tokens_per_minute", "tokens_per_day"))
    admin_client.post(f"/admin/chat/apikey/{key.pk}/change/",
                      {"name": key.name, "user": key.user.pk, "max_concurrent": "2", "tokens_per_minute": "",
                       "tokens_per_day": "0"})
    key.refresh_from_db()
    assert (key.max_concurrent, key.tokens_per_minute, key.tokens_per_day) == (2, None, 0)
