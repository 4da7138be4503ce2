"""WebSocket chat through the real ASGI application (origin check, auth, consumer) and the real model."""

import asyncio

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.core.management import call_command
from django.test import Client

from chat.api_keys import api_key_create
from chat.inference import get_engine
from chat.models import Conversation, Message
from llmsite.asgi import application

pytestmark = [pytest.mark.smollm2, pytest.mark.django_db(transaction=True)]

ORIGIN = (b"origin", b"http://127.0.0.1:8000")


@pytest.fixture
def api_key(django_user_model):
    call_command("import_resources", stdout=open("/dev/null", "w"))
    user = django_user_model.objects.create_user("ws-user")
    return api_key_create(user=user, name="ws")[1]


def communicator(path="/ws/chat/captain-mira/", *, headers=()):
    return WebsocketCommunicator(application, path, headers=list(headers))


async def receive_until_end(comm, timeout=60):
    events = []
    while True:
        event = await comm.receive_json_from(timeout=timeout)
        events.append(event)
        if event["type"] in ("end", "error"):
            return events


async def test_tokens_stream_in_order_and_the_conversation_is_stored(api_key):
    comm = communicator(headers=[ORIGIN, (b"authorization", f"Bearer {api_key}".encode())])
    connected, _ = await comm.connect()
    assert connected
    await comm.send_json_to({"type": "message", "content": "Is a storm coming, Captain?", "max_tokens": 24,
                             "temperature": 0})
    events = await receive_until_end(comm)
    assert events[0]["type"] == "start" and "A storm is coming" in events[0]["scenarios"]
    tokens = [e["text"] for e in events if e["type"] == "token"]
    end = events[-1]
    assert end["type"] == "end" and len(tokens) > 1 and "".join(tokens) == end["text"]
    assert end["usage"]["completion_tokens"] > 0 and end["scenarios"][0]["title"] == "A storm is coming"

    # A second message continues the same conversation.
    await comm.send_json_to({"type": "message", "content": "Thank you!", "max_tokens": 8})
    second = await receive_until_end(comm)
    assert second[-1]["conversation"] == end["conversation"]
    await comm.disconnect()

    conversation = await sync_to_async(Conversation.objects.get)(pk=end["conversation"])
    roles = await sync_to_async(lambda: [m.role for m in conversation.messages.all()])()
    assert roles == ["assistant", "user", "assistant", "user", "assistant"]  # greeting first
    stored = await sync_to_async(lambda: list(conversation.messages.values_list("content", flat=True)))()
    assert stored[1] == "Is a storm coming, Captain?" and stored[2] == end["text"]


async def test_closing_the_socket_cancels_the_generation(api_key):
    engine = await sync_to_async(get_engine)()
    comm = communicator("/ws/chat/byte/", headers=[ORIGIN, (b"authorization", f"Bearer {api_key}".encode())])
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "message", "content": "Tell me a very long story about printers.",
                             "max_tokens": 400, "temperature": 0.9, "seed": 1})
    assert (await comm.receive_json_from(timeout=60))["type"] == "start"
    assert (await comm.receive_json_from(timeout=60))["type"] == "token"
    await comm.disconnect()
    for _ in range(100):
        if engine.stats()["active"] == 0 and engine.stats()["queued"] == 0:
            break
        await asyncio.sleep(0.1)
    assert engine.stats()["active"] == 0
    assert not await sync_to_async(Message.objects.exists)()  # nothing stored as a complete reply


async def test_refused_without_auth_or_with_a_foreign_origin(api_key):
    comm = communicator(headers=[ORIGIN])
    connected, code = await comm.connect()
    assert not connected and code == 4401
    comm = communicator(headers=[(b"origin", b"https://evil.example"), (b"authorization", f"Bearer {api_key}".encode())])
    connected, _ = await comm.connect()
    assert not connected


async def test_session_login_works_and_bad_messages_get_error_events(django_user_model):
    await sync_to_async(call_command)("import_resources", stdout=open("/dev/null", "w"))
    user = await sync_to_async(django_user_model.objects.create_user)("page-user")
    client = Client()
    await sync_to_async(client.force_login)(user)
    cookie = f"sessionid={client.cookies['sessionid'].value}".encode()
    comm = communicator("/ws/chat/byte/", headers=[ORIGIN, (b"cookie", cookie)])
    assert (await comm.connect())[0]
    await comm.send_to(text_data="not json")
    assert (await comm.receive_json_from())["type"] == "error"
    await comm.send_json_to({"type": "message", "content": ""})
    error = await comm.receive_json_from(timeout=30)
    assert error["type"] == "error" and error["status"] == 400 and error["error"]["param"]
    await comm.send_json_to({"type": "message", "content": "Hello!", "conversation": "not-a-uuid"})
    assert (await comm.receive_json_from(timeout=30))["error"]["param"] == "conversation"
    await comm.disconnect()
