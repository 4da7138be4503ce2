"""The response cache against a live server with its local-memory cache: edits made by other
processes, per-caller scope, config in the key; and {{user}} / greetings through the API."""

import dataclasses

import pytest
from django.test import override_settings

from chat.response_cache import content_changed, content_revision, request_cache_key
from tests.live import LiveServer, bearer_client, prepare_database

ASK = {"messages": [{"role": "user", "content": "Name three colours."}], "max_tokens": 8, "temperature": 0}
SEA_SCENARIO = """\
=== Sea colours
keywords: colours
--- content
Every colour {{char}} names is a colour of the sea.
"""


@pytest.fixture(scope="module")
def server(tmp_path_factory, smollm2_path):
    # No REDIS_URL: the server caches in its own memory, which no other process can reach.
    live = LiveServer(workdir=tmp_path_factory.mktemp("response-cache"), env={"API_RATE_LIMIT": ""})
    keys = prepare_database(live, {"ann": ["ann"], "ben": ["ben"]})
    live.manage("from characters.models import Character\n"
                "Character.objects.filter(slug='captain-mira').update(\n"
                "    alternate_greetings=['Back so soon, {{user}}?', 'Fog again, {{user}}.'])")
    live.start()
    try:
        yield live, keys
    finally:
        live.stop()


def test_import_resources_in_another_process_retires_the_servers_cached_reply(server, tmp_path):
    live, keys = server
    client = bearer_client(live, keys["ann"])
    first, second = client.post("/v1/chat/completions", json=ASK), client.post("/v1/chat/completions", json=ASK)
    assert (first.headers["X-Cache"], second.headers["X-Cache"]) == ("MISS", "HIT")
    assert second.json()["scenarios"] == []

    (tmp_path / "profiles.txt").write_text("")
    (tmp_path / "scenarios.txt").write_text(SEA_SCENARIO)
    live.manage("from django.core.management import call_command\n"
                f"call_command('import_resources', profiles='{tmp_path / 'profiles.txt'}', "
                f"scenarios='{tmp_path / 'scenarios.txt'}')")

    third = client.post("/v1/chat/completions", json=ASK)
    assert third.status_code == 200
    assert third.headers["X-Cache"] == "MISS"
    assert [s["title"] for s in third.json()["scenarios"]] == ["Sea colours"]  # composed from the new content
    assert client.post("/v1/chat/completions", json=ASK).headers["X-Cache"] == "HIT"


def test_one_caller_never_hits_another_callers_entry(server):
    live, keys = server
    ask = {**ASK, "seed": 11}
    ann, ben = bearer_client(live, keys["ann"]), bearer_client(live, keys["ben"])
    assert ann.post("/v1/chat/completions", json=ask).headers["X-Cache"] == "MISS"
    assert ann.post("/v1/chat/completions", json=ask).headers["X-Cache"] == "HIT"
    # Ben learns nothing from the header about what Ann asked: his identical request is his own miss.
    assert ben.post("/v1/chat/completions", json=ask).headers["X-Cache"] == "MISS"
    assert ben.post("/v1/chat/completions", json=ask).headers["X-Cache"] == "HIT"


def test_user_name_and_chosen_greeting_are_stored_with_the_conversation(server):
    live, keys = server
    client = bearer_client(live, keys["ann"])
    body = {"character": "captain-mira", "greeting": 2, "user": "ignored-when-name-is-set", "max_tokens": 4,
            "messages": [{"role": "user", "name": "Zed", "content": "Hello!"}]}
    response = client.post("/v1/chat/completions", json=body, headers={"Cache-Control": "no-cache"})
    assert response.status_code == 200, response.text
    conversation = response.json()["conversation"]
    assert client.get(f"/v1/conversations/{conversation}/").json()["user_name"] == "Zed"
    messages = client.get(f"/v1/conversations/{conversation}/messages/").json()["results"]
    assert [m["role"] for m in messages] == ["assistant", "user", "assistant"]
    assert messages[0]["content"] == "Fog again, Zed."

    # `user` is an opaque end-user id, not a name: without a message `name`, {{user}} is the account's name.
    by_account = client.post("/v1/chat/completions", headers={"Cache-Control": "no-cache"}, json={
        "character": "captain-mira", "user": "quinn@example.com", "max_tokens": 4,
        "messages": [{"role": "user", "content": "Hi"}]}).json()["conversation"]
    assert client.get(f"/v1/conversations/{by_account}/").json()["user_name"] == "ann"

    missing = client.post("/v1/chat/completions", json={**body, "greeting": 3})
    assert missing.status_code == 400
    error = missing.json()["error"]
    assert error["param"] == "greeting" and "has 3 greeting(s): greeting must be 0 to 2" in error["message"]


# --- the keys themselves ------------------------------------------------------------------------------


@pytest.mark.django_db
def test_the_request_key_follows_the_config_the_caller_and_the_content(settings, django_user_model):
    ann, ben = django_user_model.objects.create(username="ann"), django_user_model.objects.create(username="ben")
    data = {**ASK, "stream": False}
    key = request_cache_key(data, allowed=True, user=ann)
    assert key == request_cache_key(data, allowed=True, user=ann)
    assert key != request_cache_key(data, allowed=True, user=ben)
    assert key != request_cache_key({**data, "user": "Zed"}, allowed=True, user=ann)  # another end user
    changed = dataclasses.replace(settings.LLMSITE, system_prompt=settings.LLMSITE.system_prompt + " Be brief.")
    with override_settings(LLMSITE=changed):
        assert request_cache_key(data, allowed=True, user=ann) != key
    before = content_revision()
    content_changed()
    assert content_revision() == before + 1
    assert request_cache_key(data, allowed=True, user=ann) != key
    assert request_cache_key(data, allowed=False, user=ann) is None
    key = request_cache_key(data, allowed=True, user=ann)
    ann.first_name = "Annabel"  # {{user}} in a prompt: renamed, another prompt
    assert request_cache_key(data, allowed=True, user=ann) != key


def test_the_plan_key_follows_the_end_user(django_user_model):
    """One end user's replies are not served to another (docs/API.md), also for stored or character requests,
    which take the plan's key."""
    import types

    from chat.engine import SamplingParams
    from chat.response_cache import cache_key

    owner = django_user_model.objects.create(username="tenant")

    def plan(end_user):
        return types.SimpleNamespace(cache_allowed=True, params=SamplingParams(max_tokens=8, temperature=0),
                                     model_name="m", prompt=types.SimpleNamespace(text="hello", scenarios=[]),
                                     character=None, user=owner, end_user=end_user)

    assert cache_key(plan("end-user-a")) == cache_key(plan("end-user-a")) != cache_key(plan("end-user-b"))


def test_cached_replies_cannot_crowd_counters_and_leases_out_of_the_default_cache():
    """LocMem culls a third of its entries when full (300 by default): cached replies, which any client adds, used
    to share it with rate-limit counters, quotas and conversation leases."""
    from django.core.cache import cache, caches
    from django.conf import settings

    from chat import response_cache

    cache.set("lease:probe", "held", timeout=60)
    for number in range(3000):
        response_cache._replies().set(f"reply:{number}", {"text": "x"}, timeout=60)
    assert cache.get("lease:probe") == "held"
    assert response_cache._replies() is caches[settings.REPLY_CACHE] and settings.REPLY_CACHE != "default"


def test_a_full_embedded_cache_drops_expired_counters_before_live_leases(settings):
    from llmsite.cache_backends import SweepingLocMemCache

    cache = SweepingLocMemCache("sweep-probe", {"OPTIONS": {"MAX_ENTRIES": 100, "CULL_FREQUENCY": 3}})
    cache.set("lease", "held", timeout=600)
    for minute in range(99):  # past windows' counters, expired
        cache.set(f"throttle:{minute}", 1, timeout=0.001)
    import time

    time.sleep(0.01)
    for number in range(50):  # the cache is full: the next sets cull
        cache.set(f"throttle:new:{number}", 1, timeout=60)
    assert cache.get("lease") == "held"
