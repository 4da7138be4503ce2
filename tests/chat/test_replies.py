"""Storing an exchange (chat/replies.py) when content was deleted while its reply was generated: a scenario is
left out of the stored reply; a deleted character or group is a 409 (character_deleted, group_deleted) over HTTP,
a stream and the WebSocket, and nothing is stored. A tiny random-weight model: the texts do not matter."""

import json

import pytest
from asgiref.sync import async_to_sync, sync_to_async
from channels.testing import WebsocketCommunicator

import chat.replies as replies
import chat.trees.running as running
from characters.models import Character, CharacterGroup, GroupMember
from chat.models import Conversation, Message
from llmsite.asgi import application
from tests.factories import make_api_client, make_character, make_scenario, serve_tiny_model, write_tiny_gguf

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/v1/chat/completions"
NO_CACHE = {"HTTP_CACHE_CONTROL": "no-cache"}
ORIGIN = (b"origin", b"http://127.0.0.1:8000")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("replies") / "tiny.gguf")


@pytest.fixture
def tiny_site(settings, tiny_model):
    serve_tiny_model(settings, tiny_model, context_length=2048)


def deleted_while_generating(monkeypatch, instance):
    """Delete `instance` once the reply has been generated, just before its exchange is stored (an editor in the
    admin, at that moment)."""
    remember = replies.reply_remember

    def delete_then_remember(record):
        type(instance).objects.filter(pk=instance.pk).delete()
        return remember(record)

    for module in (replies, running):  # a reply of the request, and one running apart (WebSocket, tree operations)
        monkeypatch.setattr(module, "reply_remember", delete_then_remember)


def stream_data(response) -> list:
    async def read(stream):
        return [chunk async for chunk in stream]

    text = b"".join(async_to_sync(read)(response.streaming_content)).decode()
    return [line[6:] for line in text.split("\n") if line.startswith("data: ")]


def test_a_scenario_deleted_while_the_reply_was_generated_is_left_out_of_the_stored_reply(tiny_site, monkeypatch):
    client = make_api_client("alice")
    mira = make_character("mira")
    storm = make_scenario("Storm", character=mira, keywords="storm")
    tide = make_scenario("Tide", character=mira, keywords="tide")
    deleted_while_generating(monkeypatch, storm)
    response = client.post(URL, {"character": "mira", "max_tokens": 4, "temperature": 0.9,
                                 "messages": [{"role": "user", "content": "Storm or tide?"}]}, format="json",
                           **NO_CACHE)
    assert response.status_code == 200, response.content
    reply = Message.objects.get(conversation_id=response.json()["conversation"], role="assistant")
    assert list(reply.scenarios.all()) == [tide]


@pytest.fixture
def ad_hoc_group():
    """alice's request to an ad hoc group of ada and bob, bob named to speak (ada is the conversation's character)."""
    client = make_api_client("alice")
    make_character("ada")
    bob = make_character("bob")
    body = {"characters": ["ada", "bob"], "speaker": "bob", "max_tokens": 4, "temperature": 0.9,
            "messages": [{"role": "user", "content": "Hi bob"}]}
    return client, bob, body


def test_a_speaker_deleted_while_its_reply_was_generated_is_a_409_and_nothing_is_stored(tiny_site, monkeypatch,
                                                                                           ad_hoc_group):
    client, bob, body = ad_hoc_group
    deleted_while_generating(monkeypatch, bob)
    response = client.post(URL, body, format="json", **NO_CACHE)
    assert response.status_code == 409, response.content
    assert (response.json()["error"]["code"], response.json()["error"]["param"]) == ("character_deleted", "character")
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_a_stream_gets_the_character_deleted_error_event(tiny_site, monkeypatch, ad_hoc_group):
    client, bob, body = ad_hoc_group
    deleted_while_generating(monkeypatch, bob)
    data = stream_data(client.post(URL, {**body, "stream": True}, format="json", **NO_CACHE))
    assert data[-1] == "[DONE]" and json.loads(data[-2])["error"]["code"] == "character_deleted"
    assert not Conversation.objects.exists()


async def test_the_websocket_gets_the_group_deleted_error_event(tiny_site, monkeypatch, ad_hoc_group):
    client, bob, _ = ad_hoc_group

    def crew():
        group = CharacterGroup.objects.create(name="Crew", slug="crew")
        for position, member in enumerate(Character.objects.order_by("slug")):
            GroupMember.objects.create(group=group, character=member, position=position)
        deleted_while_generating(monkeypatch, group)

    await sync_to_async(crew)()
    comm = WebsocketCommunicator(application, "/ws/chat/crew/",
                                 headers=[ORIGIN, (b"authorization", f"Bearer {client.raw_key}".encode())])
    connected, _ = await comm.connect()
    assert connected
    await comm.send_json_to({"type": "message", "content": "Hi bob", "speaker": "bob", "max_tokens": 4})
    event = await comm.receive_json_from(timeout=60)
    while event["type"] not in ("end", "error"):
        event = await comm.receive_json_from(timeout=60)
    await comm.disconnect()
    assert event["type"] == "error" and event["error"]["code"] == "group_deleted", event
    assert not await sync_to_async(Message.objects.exists)()


def test_a_character_that_spoke_cannot_be_deleted_from_under_its_lines(tiny_site, ad_hoc_group):
    """Message.speaker is protected: deleting a group member would otherwise re-attribute its lines."""
    from django.db.models import ProtectedError

    client, bob, body = ad_hoc_group
    assert client.post(URL, body, format="json", **NO_CACHE).status_code == 200
    with pytest.raises(ProtectedError):
        Character.objects.filter(pk=bob.pk).delete()
    assert Message.objects.get(role="assistant").speaker == bob


@pytest.mark.parametrize("background", [False, True])
def test_content_deleted_after_the_check_but_before_the_commit_is_a_409_not_a_500(tiny_site, monkeypatch, background):
    """Foreign keys are checked at commit (SQLite here, PostgreSQL's deferred constraints): a deletion that comes
    after the existence check still fails the transaction, answered as the deletion it is."""
    client = make_api_client("alice")
    mira = make_character("mira")
    storm = make_scenario("Storm", character=mira, keywords="storm")
    real_check = replies._characters_and_group_still_there

    def check_then_delete(plan):
        real_check(plan)
        from scenarios.models import Scenario

        Scenario.objects.filter(pk=storm.pk).delete()
        # The scenarios are then read as they were (the race: read just before the deletion commits).
        monkeypatch.setattr(Scenario.objects, "filter", lambda **kw: [storm])

    monkeypatch.setattr(replies, "_characters_and_group_still_there", check_then_delete)
    response = client.post(URL, {"character": "mira", "max_tokens": 4, "temperature": 0.9, "background": background,
                                 "messages": [{"role": "user", "content": "A storm?"}]}, format="json", **NO_CACHE)
    if background:  # inline (no broker): the job ran in the request; its exchange is stored in the job's transaction
        assert response.status_code == 202, response.content
        job = client.get(response.json()["url"]).json()
        assert job["status"] == "failed" and job["error"]["status"] == 409, job
        error = job["error"]
    else:
        assert response.status_code == 409, response.content
        error = response.json()["error"]
    assert error["code"] == "content_deleted"
    assert not Conversation.objects.exists() and not Message.objects.exists()
