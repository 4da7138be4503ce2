"""WebSocket frames over API_MAX_REQUEST_BYTES are refused before they are parsed (no model needed)."""

import json

import pytest
from channels.testing import WebsocketCommunicator

from llmsite.asgi import application
from tests.factories import make_api_client

pytestmark = pytest.mark.django_db(transaction=True)

ORIGIN = (b"origin", b"http://127.0.0.1:8000")
LIMIT = 2048


@pytest.fixture
def socket(settings):
    settings.API_MAX_REQUEST_BYTES = LIMIT
    raw_key = make_api_client("frames").raw_key
    return WebsocketCommunicator(application, "/ws/chat/nobody/",
                                 headers=[ORIGIN, (b"authorization", f"Bearer {raw_key}".encode())])


def padded(size: int, char: str = "a") -> str:
    """A JSON message of exactly `size` UTF-8 bytes."""
    head = json.dumps({"type": "message", "content": ""})[:-2]
    fill = (size - len(head.encode()) - 2) // len(char.encode())
    text = head + char * fill + '"}'
    assert len(text.encode()) == size
    return text


async def test_a_frame_over_the_limit_gets_a_413_event_and_the_socket_stays_open(socket):
    assert (await socket.connect())[0]
    # Not JSON, yet a 413 rather than the "must be a JSON object" 400: the size is checked first.
    await socket.send_to(text_data="x" * (LIMIT + 1))
    event = await socket.receive_json_from(timeout=10)
    assert event["type"] == "error" and event["status"] == 413
    assert event["error"]["code"] == "request_too_large" and "2,048 bytes" in event["error"]["message"]
    await socket.send_to(bytes_data=b"{" * (LIMIT + 1))
    assert (await socket.receive_json_from(timeout=10))["status"] == 413

    # Counted in UTF-8 bytes: 1,030 two-byte characters are over 2,048 bytes.
    await socket.send_to(text_data=padded(LIMIT + 2, "é"))
    assert (await socket.receive_json_from(timeout=10))["status"] == 413

    await socket.send_to(text_data="not json")  # the socket still answers
    assert (await socket.receive_json_from(timeout=10))["status"] == 400
    await socket.disconnect()


async def test_a_frame_at_the_limit_is_parsed(socket):
    assert (await socket.connect())[0]
    await socket.send_to(text_data=padded(LIMIT).replace('"message"', '"other"'))
    event = await socket.receive_json_from(timeout=10)
    assert event["status"] == 400 and event["error"]["param"] == "type"  # read as JSON: an unknown type
    await socket.disconnect()


def test_with_websocket_limits_defaults_daphnes_limits_to_the_body_limit_unless_given(settings):
    from chat.management.commands.serve import with_websocket_limits

    settings.API_MAX_REQUEST_BYTES = LIMIT
    args = with_websocket_limits(["-p", "8000", "llmsite.asgi:application"])
    assert args[:4] == ["--websocket-max-message-size", "2048", "--websocket-max-frame-size", "2048"]
    own = with_websocket_limits(["--websocket-max-frame-size=9", "llmsite.asgi:application"])
    assert own == ["--websocket-max-message-size", "2048", "--websocket-max-frame-size=9", "llmsite.asgi:application"]


@pytest.mark.smollm2  # a live server (the marker's meaning: slow, end to end)
def test_the_served_protocol_closes_a_socket_whose_message_is_over_the_limit_with_1009(tmp_path):
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from tests.live import LiveServer, prepare_database

    server = LiveServer(workdir=tmp_path, env={"API_MAX_REQUEST_BYTES": "4096", "LOG_LEVEL": "WARNING"})
    raw_key = prepare_database(server, {"frames": ["frames"]})["frames"]
    server.start()
    try:
        url = server.url.replace("http://", "ws://") + "/ws/chat/nobody/"
        headers = {"Authorization": f"Bearer {raw_key}"}
        with connect(url, additional_headers=headers, proxy=None) as socket:
            socket.send(padded(4096).replace('"message"', '"other"'))  # at the limit: read by the consumer
            assert json.loads(socket.recv(timeout=30))["error"]["param"] == "type"
        with connect(url, additional_headers=headers, proxy=None) as socket:
            socket.send(padded(4097))
            with pytest.raises(ConnectionClosed) as closed:
                socket.recv(timeout=30)
        assert closed.value.rcvd.code == 1009  # message too big, refused by the protocol layer
    finally:
        server.stop()


@pytest.mark.smollm2  # a live server (the marker's meaning: slow, end to end)
def test_the_served_protocol_closes_a_socket_that_floods_messages_faster_than_they_are_handled(tmp_path):
    """daphne queued every frame for the consumer without bound (one socket grew the server by ~75 MB/s)."""
    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect

    from chat.ops.websocket_inbound import CLOSE_FLOODED, MAX_PENDING_MESSAGES
    from tests.live import LiveServer, prepare_database

    server = LiveServer(workdir=tmp_path, env={"LOG_LEVEL": "WARNING"})
    raw_key = prepare_database(server, {"frames": ["frames"]})["frames"]
    server.start()
    try:
        url = server.url.replace("http://", "ws://") + "/ws/chat/nobody/"
        headers = {"Authorization": f"Bearer {raw_key}"}
        with connect(url, additional_headers=headers, proxy=None) as socket:  # a client that waits is served
            for _ in range(3 * MAX_PENDING_MESSAGES):
                socket.send(json.dumps({"type": "other"}))
                assert json.loads(socket.recv(timeout=30))["error"]["param"] == "type"
        with connect(url, additional_headers=headers, proxy=None) as socket:
            flood = json.dumps({"type": "other", "padding": "x" * 1000})
            with pytest.raises(ConnectionClosed) as closed:
                for _ in range(2000):  # arrive together: the consumer handles none between them
                    socket.send(flood)
                while True:
                    socket.recv(timeout=30)
        assert closed.value.rcvd.code == CLOSE_FLOODED
    finally:
        server.stop()


async def test_frames_past_the_users_read_budget_are_dropped_unparsed_with_a_429(socket, settings):
    settings.WS_READ_BYTES_PER_SECOND = 1024  # the bucket holds API_MAX_REQUEST_BYTES (2,048): two small frames
    assert (await socket.connect())[0]
    for _ in range(2):
        await socket.send_to(text_data="not json")  # parsed: a 400
        assert (await socket.receive_json_from(timeout=10))["status"] == 400
    await socket.send_to(text_data="not json")  # past the budget: dropped before parsing
    event = await socket.receive_json_from(timeout=10)
    assert event["status"] == 429 and "WS_READ_BYTES_PER_SECOND" in event["error"]["message"]
    assert event["retry_after"] >= 1
    await socket.disconnect()
    # A new socket of the same user does not start with a fresh budget.
    again = WebsocketCommunicator(application, "/ws/chat/nobody/", headers=socket.scope["headers"])
    assert (await again.connect())[0]
    await again.send_to(text_data="not json")
    assert (await again.receive_json_from(timeout=10))["status"] == 429
    await again.disconnect()
