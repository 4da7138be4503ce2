"""A WebSocket stays open for hours: its credentials, quotas and rate limit hold for every operation on it, as
for every HTTP request, and one socket's blocking work never holds up another's."""

import asyncio
import threading
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client
from django.utils import timezone

from chat.api import consumers
from chat.models import ApiKey, Conversation
from llmsite.asgi import application
from tests.factories import make_api_client, make_character

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
HOST = (b"host", b"127.0.0.1:8000")


def character():
    from characters.models import Character

    return Character.objects.filter(slug="mira").first() or make_character("mira")


async def open_socket(headers) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, "/ws/chat/mira/", headers=[ORIGIN, HOST, *headers])
    connected, _ = await comm.connect()
    assert connected
    return comm


async def keyed_socket(username: str):
    client = await sync_to_async(make_api_client)(username)
    await sync_to_async(character)()
    return client, await open_socket([(b"authorization", f"Bearer {client.raw_key}".encode())])


async def assert_ended_as_unauthenticated(comm) -> None:
    await comm.send_json_to({"type": "new_conversation"})
    error = await comm.receive_json_from(timeout=10)
    assert error["type"] == "error" and error["status"] == 401, error
    assert (await comm.receive_output(timeout=10)) == {"type": "websocket.close", "code": 4401}


async def test_a_key_revoked_or_expired_while_the_socket_is_open_ends_it_at_the_next_operation():
    for username, change in (("revoked", {"revoked_at": timezone.now()}),
                             ("expired", {"expires_at": timezone.now()})):
        client, comm = await keyed_socket(username)
        await comm.send_json_to({"type": "new_conversation"})
        assert (await comm.receive_json_from(timeout=10))["type"] == "new_conversation"
        await sync_to_async(ApiKey.objects.filter(user=client.user).update)(**change)
        await assert_ended_as_unauthenticated(comm)


async def test_a_user_deactivated_or_logged_out_while_the_socket_is_open_is_refused(django_user_model):
    await sync_to_async(character)()
    for username in ("deactivated", "logged-out"):
        user = await sync_to_async(django_user_model.objects.create_user)(username)
        browser = Client()
        await sync_to_async(browser.force_login)(user)
        comm = await open_socket([(b"cookie", f"sessionid={browser.cookies['sessionid'].value}".encode())])
        await comm.send_json_to({"type": "new_conversation"})
        assert (await comm.receive_json_from(timeout=10))["type"] == "new_conversation"
        if username == "deactivated":
            await sync_to_async(django_user_model.objects.filter(pk=user.pk).update)(is_active=False)
        else:
            await sync_to_async(browser.logout)()
        await assert_ended_as_unauthenticated(comm)


async def test_a_quota_lowered_while_the_socket_is_open_applies_to_its_next_reply(endless_site):
    endless_site(512)
    client, comm = await keyed_socket("budget-cut")
    await sync_to_async(ApiKey.objects.filter(user=client.user).update)(tokens_per_day=1)
    # Nothing spent yet: a first request larger than the whole budget runs alone (chat/tenancy/quotas.py).
    await comm.send_json_to({"type": "message", "content": "Hello!", "max_tokens": 4})
    while (event := await comm.receive_json_from(timeout=60))["type"] not in ("end", "error"):
        pass
    assert event["type"] == "end", event
    await comm.send_json_to({"type": "message", "content": "Hello again!", "max_tokens": 4})
    error = await comm.receive_json_from(timeout=60)
    assert error["type"] == "error" and error["status"] == 429 and error["error"]["code"] == "token_quota_exceeded", error
    await comm.disconnect()


async def test_every_operation_spends_the_rate_limit_not_only_replies(settings):
    settings.API_RATE_LIMIT = "3/min"
    client, comm = await keyed_socket("selector")
    conversation = await sync_to_async(Conversation.objects.create)(
        owner=client.user, character=await sync_to_async(character)())
    for _ in range(3):
        await comm.send_json_to({"type": "attach", "conversation": str(conversation.pk)})
        assert (await comm.receive_json_from(timeout=10))["type"] == "idle"
    await comm.send_json_to({"type": "attach", "conversation": str(conversation.pk)})
    refused = await comm.receive_json_from(timeout=10)
    assert refused["type"] == "error" and refused["status"] == 429 and refused["retry_after"] >= 1
    await comm.disconnect()


async def test_each_socket_runs_its_blocking_work_in_a_thread_of_its_own(monkeypatch):
    """Before, every socket's sync_to_async call ran in one thread of the process: one socket's slow operation
    (a select on a huge conversation) stalled every other socket."""
    threads, started = [], threading.Barrier(2, timeout=10)

    def slow_lookup(*, user, conversation_id):
        threads.append(threading.get_ident())
        started.wait()  # both sockets' operations run at once, or this times out
        time.sleep(0.05)

    monkeypatch.setattr(consumers, "running_reply_of", slow_lookup)
    sockets = []
    for name in ("first", "second"):
        client, comm = await keyed_socket(name)
        conversation = await sync_to_async(Conversation.objects.create)(
            owner=client.user, character=await sync_to_async(character)())
        sockets.append((comm, conversation))
    for comm, conversation in sockets:
        await comm.send_json_to({"type": "attach", "conversation": str(conversation.pk)})
    answers = await asyncio.gather(*(comm.receive_json_from(timeout=20) for comm, _ in sockets))
    assert [answer["type"] for answer in answers] == ["idle", "idle"], answers
    assert len(set(threads)) == 2
    for comm, _ in sockets:
        await comm.disconnect()


async def test_a_user_holds_a_bounded_number_of_sockets_in_one_process(settings):
    settings.WS_MAX_CONNECTIONS_PER_USER = 2
    client = await sync_to_async(make_api_client)("many-tabs")
    await sync_to_async(character)()
    bearer = [(b"authorization", f"Bearer {client.raw_key}".encode())]
    first, second = await open_socket(bearer), await open_socket(bearer)
    third = WebsocketCommunicator(application, "/ws/chat/mira/", headers=[ORIGIN, *bearer])
    assert (await third.connect()) == (False, 4429)
    _, other = await keyed_socket("someone-else")  # another user's sockets are their own
    await first.disconnect()
    again = await open_socket(bearer)  # a closed socket gives its place back
    for comm in (second, other, again):
        await comm.disconnect()
