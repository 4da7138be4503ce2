"""One continuation of a stored conversation at a time (chat/tenancy/conversation_lock.py): a second one gets
409 conversation_busy over HTTP, the WebSocket and background jobs, and a conversation is never forked."""

import gc
import json
import socket
import uuid

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.core.cache import cache

from chat.models import Conversation, Job
from chat.tenancy.conversation_lock import (LEASE_SECONDS, ConversationBusy, conversation_advance,
                                            conversation_lease_take)
from tests.factories import make_api_client, make_character, serve_tiny_model, write_tiny_gguf

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
NO_CACHE = {"HTTP_CACHE_CONTROL": "no-cache"}


def body(conversation, content, **extra):
    return {"messages": [{"role": "user", "content": content}], "conversation": str(conversation.pk),
            "max_tokens": 6, "temperature": 0.8, **extra}


def stored(conversation) -> list[tuple[str, str]]:
    return list(conversation.messages.values_list("role", "content"))


def events(response) -> list:
    """The data of a streamed response's events (consuming it runs the reply to its end)."""
    async def read(stream):
        return [chunk async for chunk in stream]

    text = b"".join(async_to_sync(read)(response.streaming_content)).decode()
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def assert_busy(response_or_event):
    error = response_or_event["error"]
    assert (error["code"], error["param"], error["type"]) == ("conversation_busy", "conversation",
                                                              "invalid_request_error")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("lock") / "tiny.gguf")


@pytest.fixture
def tiny_site(settings, tiny_model):
    serve_tiny_model(settings, tiny_model, context_length=512)


@pytest.fixture
def chat(db):
    client = make_api_client("chatter")
    conversation = Conversation.objects.create(character=make_character("mira"), owner=client.user)
    return client, conversation


# --- the policy, without a model ---------------------------------------------------------------------------


def test_a_lease_is_taken_once_until_released(chat):
    _, conversation = chat
    lease = conversation_lease_take(conversation=conversation)
    with pytest.raises(ConversationBusy):
        conversation_lease_take(conversation=conversation)
    lease.release()
    conversation_lease_take(conversation=conversation).release()


def test_releasing_an_expired_lease_leaves_its_next_holder_alone(chat):
    _, conversation = chat
    stale = conversation_lease_take(conversation=conversation)
    cache.delete(stale.key)  # it expired
    holder = conversation_lease_take(conversation=conversation)
    stale.release()
    with pytest.raises(ConversationBusy):
        conversation_lease_take(conversation=conversation)
    holder.release()


def test_deleting_a_response_waits_for_the_conversations_lease_and_keeps_the_tree_whole(chat):
    """DELETE /v1/responses/<id> changes the tree like a tree operation: not while a reply runs (it would delete
    the messages the reply is stored under), and the active leaf is set again when it was deleted."""
    client, conversation = chat
    user = conversation.messages.create(role="user", content="one")
    first = conversation.messages.create(role="assistant", content="a", parent=user)
    second_user = conversation.messages.create(role="user", content="two", parent=first)
    conversation.messages.create(role="assistant", content="b", parent=second_user)
    other_branch = conversation.messages.create(role="user", content="two again", parent=first)
    other_reply = conversation.messages.create(role="assistant", content="b again", parent=other_branch)
    Conversation.objects.filter(pk=conversation.pk).update(active=other_reply)
    url = f"/v1/responses/resp_{conversation.pk.hex}_2"
    lease = conversation_lease_take(conversation=conversation)  # as a running reply holds it
    busy = client.delete(url)
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "conversation_busy"
    assert conversation.messages.count() == 6
    lease.release()
    assert client.delete(url).status_code == 200
    conversation.refresh_from_db()
    assert list(conversation.messages.values_list("content", flat=True)) == ["one", "a"]
    assert conversation.active_id == first.pk


def test_an_exchange_is_stored_only_on_the_version_its_history_was_read_from(chat):
    _, conversation = chat
    first, second = Conversation.objects.get(pk=conversation.pk), Conversation.objects.get(pk=conversation.pk)
    conversation_advance(first)
    with pytest.raises(ConversationBusy):
        conversation_advance(second)  # read the same history: it would fork the conversation
    conversation_advance(first)  # the one that moved on may move on again


# --- through the API, with a tiny model -------------------------------------------------------------------


def test_a_second_continuation_while_the_first_streams_gets_409_and_one_exchange_is_stored(chat, tiny_site):
    client, conversation = chat
    first = client.post("/v1/chat/completions", body(conversation, "first", stream=True), format="json", **NO_CACHE)
    assert first.status_code == 200  # the reply is under way: its stream is not read yet

    second = client.post("/v1/chat/completions", body(conversation, "second"), format="json", **NO_CACHE)
    assert second.status_code == 409
    assert_busy(second.json())
    background = client.post("/v1/chat/completions", body(conversation, "third", background=True), format="json")
    assert background.status_code == 409 and not Job.objects.exists()

    streamed = events(first)
    assert streamed[-1] == "[DONE]" and "error" not in streamed[-2]
    assert [role for role, _ in stored(conversation)] == ["user", "assistant"]
    assert stored(conversation)[0][1] == "first"

    # The lease was given back with the stored reply: the next continuation reads that exchange.
    again = client.post("/v1/chat/completions", body(conversation, "second"), format="json", **NO_CACHE)
    assert again.status_code == 200
    assert [content for role, content in stored(conversation) if role == "user"] == ["first", "second"]


def test_without_the_lease_a_reply_on_a_stale_history_is_refused_not_stored(chat, tiny_site):
    """An expired lease, or a cache the instances do not share: the version check still prevents the fork."""
    client, conversation = chat
    first = client.post("/v1/chat/completions", body(conversation, "first", stream=True), format="json", **NO_CACHE)
    cache.delete(f"conversation-lease:{conversation.pk}")
    second = client.post("/v1/chat/completions", body(conversation, "second"), format="json", **NO_CACHE)
    assert second.status_code == 200

    streamed = events(first)
    assert_busy(json.loads(streamed[-2]))  # the stream ends in the error event, and nothing of it is stored
    assert [content for role, content in stored(conversation) if role == "user"] == ["second"]
    assert len(stored(conversation)) == 2


def test_a_failed_or_refused_continuation_gives_the_lease_back(chat, tiny_site):
    client, conversation = chat
    too_long = client.post("/v1/chat/completions", body(conversation, "word " * 5000), format="json", **NO_CACHE)
    assert too_long.status_code == 400  # context_length_exceeded while preparing
    wrong_character = client.post("/v1/chat/completions", body(conversation, "hi", character="nobody"),
                                  format="json", **NO_CACHE)
    assert wrong_character.status_code == 400
    assert client.post("/v1/chat/completions", body(conversation, "hi"), format="json", **NO_CACHE).status_code == 200


def test_a_plan_dropped_on_a_path_that_never_released_its_lease_gives_it_back(chat, tiny_site):
    from chat.api.serializers import ChatCompletionRequestSerializer
    from chat.plans import chat_request_prepare

    client, conversation = chat
    serializer = ChatCompletionRequestSerializer(data=body(conversation, "hi"))
    serializer.is_valid(raise_exception=True)
    plan = chat_request_prepare(user=client.user, data=serializer.validated_data)
    with pytest.raises(ConversationBusy):
        conversation_lease_take(conversation=conversation)
    del plan
    gc.collect()
    conversation_lease_take(conversation=conversation).release()


def test_a_background_job_continuing_a_busy_conversation_fails_with_409(chat, tiny_site):
    from chat.tasks import job_run
    from django.utils import timezone
    from datetime import timedelta

    client, conversation = chat
    lease = conversation_lease_take(conversation=conversation)  # another reply is on its way
    job = Job.objects.create(owner=client.user, api_key=client.key, request=body(conversation, "queued earlier"),
                             expires_at=timezone.now() + timedelta(hours=1))
    job_run(job_id=str(job.pk))
    job.refresh_from_db()
    assert job.status == "failed" and job.error["status"] == 409
    assert_busy({"error": job.error})
    lease.release()
    job = Job.objects.create(owner=client.user, api_key=client.key, request=body(conversation, "queued later"),
                             expires_at=timezone.now() + timedelta(hours=1))
    job_run(job_id=str(job.pk))
    job.refresh_from_db()
    assert job.status == "done", job.error
    assert [content for role, content in stored(conversation) if role == "user"] == ["queued later"]
    # The job gave the lease back once stored.
    conversation_lease_take(conversation=conversation).release()


@pytest.mark.django_db(transaction=True)
async def test_a_websocket_message_continuing_a_busy_conversation_gets_a_409_event(tiny_site):
    from asgiref.sync import sync_to_async

    from llmsite.asgi import application

    client = await sync_to_async(make_api_client)("ws-chatter")
    conversation = await sync_to_async(Conversation.objects.create)(
        character=await sync_to_async(make_character)("mira"), owner=client.user)
    lease = await sync_to_async(conversation_lease_take)(conversation=conversation)
    socket = WebsocketCommunicator(application, "/ws/chat/mira/",
                                   headers=[ORIGIN, (b"authorization", f"Bearer {client.raw_key}".encode())])
    assert (await socket.connect())[0]
    message = {"type": "message", "content": "hi", "conversation": str(conversation.pk), "max_tokens": 4}
    await socket.send_json_to(message)
    event = await socket.receive_json_from(timeout=30)
    assert event["type"] == "error" and event["status"] == 409
    assert_busy(event)

    await sync_to_async(lease.release)()
    await socket.send_json_to(message)
    while (event := await socket.receive_json_from(timeout=60))["type"] not in ("end", "error"):
        pass
    assert event["type"] == "end" and event["conversation"] == str(conversation.pk)
    await socket.disconnect()
    assert await sync_to_async(lambda: len(stored(conversation)))() == 2


# --- on Redis, the cache several instances share -----------------------------------------------------------


def redis_cache(settings, url: str) -> None:
    settings.CACHES = {"default": {
        "BACKEND": "django_redis.cache.RedisCache", "LOCATION": url, "KEY_PREFIX": f"lock-test-{uuid.uuid4().hex}",
        "OPTIONS": {"IGNORE_EXCEPTIONS": True, "SOCKET_CONNECT_TIMEOUT": 1, "SOCKET_TIMEOUT": 1}}}


def test_on_redis_a_lease_is_held_once_and_expires(chat, settings, redis_url):
    _, conversation = chat
    redis_cache(settings, redis_url)
    lease = conversation_lease_take(conversation=conversation)
    with pytest.raises(ConversationBusy):
        conversation_lease_take(conversation=conversation)
    assert 0 < cache.ttl(lease.key) <= LEASE_SECONDS  # a process that dies holding it blocks no one for good
    lease.release()
    conversation_lease_take(conversation=conversation).release()


def test_with_the_cache_down_a_continuation_goes_on_guarded_by_the_version_check(chat, settings):
    _, conversation = chat
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    redis_cache(settings, f"redis://127.0.0.1:{port}/0")
    assert conversation_lease_take(conversation=conversation) is None
    assert conversation_lease_take(conversation=conversation) is None
