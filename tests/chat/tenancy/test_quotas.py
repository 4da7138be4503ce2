"""The quota policy (chat/tenancy/quotas.py) on the local-memory cache, and its 429s in the one error shape
through the API and the WebSocket before anything is generated."""

import json

import pytest
from channels.testing import WebsocketCommunicator
from django.core.cache import cache

from chat.tenancy.owners import Tenant
from chat.tenancy.quotas import (Limits, QuotaExceeded, limits_for, quota_admit, slot_acquire, tokens_charge,
                                 tokens_check)
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


def test_a_slot_is_held_until_released_once():
    first = slot_acquire("key:7", 2)
    second = slot_acquire("key:7", 2)
    with pytest.raises(QuotaExceeded) as refused:
        slot_acquire("key:7", 2)
    assert refused.value.code == "concurrency_limit_exceeded" and refused.value.retry_after == 1
    first.release()
    first.release()  # idempotent: gives back one slot, not two
    third = slot_acquire("key:7", 2)
    with pytest.raises(QuotaExceeded):
        slot_acquire("key:7", 2)
    for slot in (second, third):
        slot.release()
    assert cache.get("quota:active:key:7") == 0
    assert slot_acquire("key:8", 0).key is None  # no limit: nothing counted


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
    slot = hold_a_slot(client)
    for body in (REQUEST, {**REQUEST, "stream": True}):
        response = client.post("/v1/chat/completions", body, format="json", HTTP_CACHE_CONTROL="no-cache")
        assert response.status_code == 429 and response["Retry-After"] == "1"
        assert response.json()["error"] == {"message": response.json()["error"]["message"], "type": "rate_limit_error",
                                             "param": None, "code": "concurrency_limit_exceeded"}
    response = client.post("/v1/completions", {"prompt": "Hi", "max_tokens": 2}, format="json")
    assert response.status_code == 429 and response["Retry-After"] == "1"
    slot.release()

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

    client, slot = await sync_to_async(prepare)()
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
        await sync_to_async(slot.release)()


def test_an_operator_sets_a_keys_quotas_on_its_admin_page(admin_client):
    key = make_api_client("quota-admin").key
    page = admin_client.get(f"/admin/chat/apikey/{key.pk}/change/").content.decode()
    assert all(f'name="{field}"' in page for field in ("max_concurrent", "tokens_per_minute", "tokens_per_day"))
    admin_client.post(f"/admin/chat/apikey/{key.pk}/change/",
                      {"name": key.name, "user": key.user.pk, "max_concurrent": "2", "tokens_per_minute": "",
                       "tokens_per_day": "0"})
    key.refresh_from_db()
    assert (key.max_concurrent, key.tokens_per_minute, key.tokens_per_day) == (2, None, 0)
