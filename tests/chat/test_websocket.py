"""WebSocket chat through the real ASGI application (origin check, auth, consumer) and the real model,
in process and, for a plain `websockets` client, against a live daphne server."""

import asyncio
import json
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator
from django.test import Client

from chat.engines import get_engine
from chat.models import Conversation, Message
from llmsite.asgi import application
from tests.factories import import_demo_resources, make_api_client

pytestmark = [pytest.mark.smollm2, pytest.mark.django_db(transaction=True)]

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
HOST = (b"host", b"127.0.0.1:8000")  # a browser sends both: the page's origin is the socket's own


@pytest.fixture
def api_key():
    import_demo_resources()
    return make_api_client("ws-user", key_name="ws").raw_key


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
    assert events[0]["type"] == "start" and events[0]["scenarios"][0]["title"] == "A storm is coming"
    assert events[0]["scenarios"] == events[-1]["scenarios"]  # one shape in every event
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


async def test_closing_the_socket_cancels_a_reply_that_asked_for_it(api_key):
    engine = await sync_to_async(get_engine)()
    comm = communicator("/ws/chat/byte/", headers=[ORIGIN, (b"authorization", f"Bearer {api_key}".encode())])
    assert (await comm.connect())[0]
    await comm.send_json_to({"type": "message", "content": "Tell me a very long story about printers.",
                             "max_tokens": 400, "temperature": 0.9, "seed": 1, "on_disconnect": "cancel"})
    assert (await comm.receive_json_from(timeout=60))["type"] == "start"
    assert (await comm.receive_json_from(timeout=60))["type"] == "token"
    await comm.disconnect()
    for _ in range(100):
        if engine.stats()["active"] == 0 and engine.stats()["queued"] == 0:
            break
        await asyncio.sleep(0.1)
    assert engine.stats()["active"] == 0
    assert not await sync_to_async(Message.objects.exists)()  # nothing stored as a complete reply


async def session_cookie(django_user_model, username="page-user") -> bytes:
    await sync_to_async(import_demo_resources)()
    user = await sync_to_async(django_user_model.objects.create_user)(username)
    client = Client()
    await sync_to_async(client.force_login)(user)
    return f"sessionid={client.cookies['sessionid'].value}".encode()


async def test_refused_without_auth_with_a_bad_key_or_with_a_key_in_the_query_string(api_key):
    comm = communicator(headers=[ORIGIN, HOST])
    connected, code = await comm.connect()
    assert not connected and code == 4401
    comm = communicator(headers=[(b"authorization", b"Bearer llms-not-a-key")])
    connected, code = await comm.connect()
    assert not connected and code == 4401
    # Policy: a key in the URL would end up in proxy logs, so it is refused even when valid.
    comm = communicator(f"/ws/chat/captain-mira/?api_key={api_key}", headers=[ORIGIN, HOST])
    connected, code = await comm.connect()
    assert not connected and code == 4401


async def test_a_bearer_key_needs_no_origin_but_a_cookie_session_needs_ours(api_key, django_user_model):
    bearer = (b"authorization", f"Bearer {api_key}".encode())
    for headers in ([bearer], [bearer, (b"origin", b"https://evil.example")]):  # not a browser: no origin check
        comm = communicator(headers=headers)
        assert (await comm.connect())[0], headers
        await comm.disconnect()
    cookie = (b"cookie", await session_cookie(django_user_model, "cookie-user"))
    comm = communicator(headers=[ORIGIN, HOST, cookie])
    assert (await comm.connect())[0]
    await comm.disconnect()
    # A foreign page, the same host on another port or scheme (the same site: the cookie is sent), or no origin.
    for origin in (b"https://evil.example", b"http://127.0.0.1:9999", b"https://127.0.0.1:8000", None):
        comm = communicator(headers=[HOST, cookie] + ([(b"origin", origin)] if origin else []))
        connected, code = await comm.connect()
        assert not connected and code == 4403, origin


async def test_session_login_works_and_bad_messages_get_error_events(django_user_model):
    cookie = await session_cookie(django_user_model)
    comm = communicator("/ws/chat/byte/", headers=[ORIGIN, HOST, (b"cookie", cookie)])
    assert (await comm.connect())[0]
    await comm.send_to(text_data="not json")
    assert (await comm.receive_json_from())["type"] == "error"
    await comm.send_json_to({"type": "message", "content": ""})
    error = await comm.receive_json_from(timeout=30)
    assert error["type"] == "error" and error["status"] == 400 and error["error"]["param"]
    await comm.send_json_to({"type": "message", "content": "Hello!", "conversation": "not-a-uuid"})
    assert (await comm.receive_json_from(timeout=30))["error"]["param"] == "conversation"
    await comm.disconnect()


async def test_a_malformed_conversation_id_or_bad_json_gets_a_400_event(api_key):
    comm = communicator(headers=[ORIGIN, (b"authorization", f"Bearer {api_key}".encode())])
    assert (await comm.connect())[0]
    for message in ({"type": "select", "conversation": "not-a-uuid", "message": 1},
                    {"type": "delete", "conversation": ["x"], "message": 1},
                    {"type": "attach", "conversation": {"x": 1}},
                    {"type": "stop", "conversation": "zzz"},
                    {"type": "regenerate", "conversation": 12345, "message": 2}):
        await comm.send_json_to(message)
        error = await comm.receive_json_from(timeout=30)
        assert (error["type"], error["status"], error["error"]["param"]) == ("error", 400, "conversation"), message
    # Refused before anything is generated (it could not be stored): no conversation is left behind.
    count = sync_to_async(lambda: Conversation.objects.count())
    before = await count()
    for raw in ('{"type": "message", "max_tokens": 2, "content": "hi \\ud800 there"}',
                '{"type": "message", "max_tokens": 2, "content": [{"type": "text", "text": "\\udfff"}]}'):
        await comm.send_to(text_data=raw)
        error = await comm.receive_json_from(timeout=30)
        assert (error["type"], error["status"]) == ("error", 400) and "surrogate" in error["error"]["message"]
    # Read as strictly as an HTTP body: deep nesting (a RecursionError closed the socket), NaN, NUL.
    for raw, says in (("[" * 100_000 + "]" * 100_000, "nested too deeply"),
                      ('{"type": "message", "max_tokens": NaN, "content": "hi"}', "does not allow"),
                      ('{"type": "message", "max_tokens": 2, "content": "a\\u0000b"}', "NUL")):
        await comm.send_to(text_data=raw)
        error = await comm.receive_json_from(timeout=30)
        assert (error["type"], error["status"]) == ("error", 400) and says in error["error"]["message"], error
    assert await count() == before
    await comm.disconnect()


# --- A plain client against a live server -------------------------------------------------------

LIVE_RATE_LIMIT = 6  # per minute, for HTTP requests and WebSocket messages together


@pytest.fixture(scope="module")
def live_ws(tmp_path_factory, smollm2_path):
    from tests.live import LiveServer, prepare_database

    server = LiveServer(workdir=tmp_path_factory.mktemp("live-ws"), env={"API_RATE_LIMIT": f"{LIVE_RATE_LIMIT}/min"})
    keys = prepare_database(server, {"wes": ["wes"]})
    server.start()
    try:
        yield server, keys["wes"]
    finally:
        server.stop()


def events_until_end(socket) -> list[dict]:
    events = []
    while not events or events[-1]["type"] not in ("end", "error"):
        events.append(json.loads(socket.recv(timeout=120)))
    return events


def test_a_plain_websocket_client_chats_with_a_bearer_key_and_is_rate_limited_like_http(live_ws):
    import httpx
    from websockets.sync.client import connect

    server, key = live_ws
    if time.time() % 60 > 40:  # the whole budget must be spent inside one fixed one-minute window
        time.sleep(61 - time.time() % 60)
    window = int(time.time() // 60)
    url = server.url.replace("http://", "ws://") + "/ws/chat/captain-mira/"
    http = httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    # No Origin header: `websockets` sends none unless asked to.
    with connect(url, additional_headers={"Authorization": f"Bearer {key}"}, proxy=None) as socket:
        socket.send(json.dumps({"type": "message", "content": "Is a storm coming?", "max_tokens": 12}))
        events = events_until_end(socket)  # 1 of the budget
        assert events[0]["type"] == "start" and events[-1]["type"] == "end", events[-1]
        assert "".join(e["text"] for e in events if e["type"] == "token") == events[-1]["text"]
        spent = 1
        if int(time.time() // 60) != window or time.time() % 60 > 50:
            # On a loaded machine the reply can outlast the window: count afresh in the next one.
            time.sleep(61 - time.time() % 60)
            spent = 0
        assert http.get("/v1/models").status_code == 200  # HTTP spends the same budget
        for _ in range(LIVE_RATE_LIMIT - spent - 1):  # the rest: cheap messages (refused as empty, but counted)
            socket.send(json.dumps({"type": "message", "content": ""}))
            assert json.loads(socket.recv(timeout=60))["status"] == 400
        socket.send(json.dumps({"type": "message", "content": "One more?"}))
        limited = json.loads(socket.recv(timeout=60))
        assert limited["type"] == "error" and limited["status"] == 429, limited
        assert limited["error"]["code"] == "rate_limit_exceeded" and limited["retry_after"] > 0
    assert http.get("/v1/models").status_code == 429
