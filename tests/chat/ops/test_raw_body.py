"""chat/ops/raw_body.py: daphne's requests reach the application with their body as it came (Twisted parses no form
on the event loop), and a body too large or in too many chunks is refused with a 413 in the API's error shape
before the application sees it, with nothing more read. A real Twisted HTTP channel fed raw bytes, on a string
transport."""

import json
from types import SimpleNamespace

import pytest
from daphne import http_protocol
from twisted.internet.testing import StringTransport
from twisted.web import http

from chat.ops import raw_body

FORM = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nvalue %d\r\n' % (n, n)
                for n in range(50)) + b"--XyZ--\r\n"


DAPHNES_REQUEST = raw_body.RawBodyRequest.__mro__[1]  # daphne's WebRequest, whatever install() did


@pytest.fixture
def processed(monkeypatch) -> list:
    """The requests daphne would have handed the application (its process() records instead of running it)."""
    seen = []
    monkeypatch.setattr(DAPHNES_REQUEST, "process", lambda request: seen.append(request))
    return seen


def channel_of(request_class):
    """(channel, transport): an HTTP channel whose requests are `request_class`, on a string transport."""
    channel = http.HTTPChannel()
    channel.requestFactory = request_class
    channel.factory = SimpleNamespace(server=SimpleNamespace(protocol_connected=lambda protocol: None,
                                                             protocol_disconnected=lambda protocol: None))
    transport = StringTransport()
    channel.makeConnection(transport)
    return channel, transport


def post(channel, body: bytes, headers: bytes) -> None:
    channel.dataReceived(b"POST /v1/chat/completions HTTP/1.1\r\nHost: testserver\r\n" + headers + b"\r\n" + body)


def chunked(pieces) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for piece in pieces) + b"0\r\n\r\n"


def refusal(transport) -> dict:
    head, _, body = transport.value().partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and b"Content-Type: application/json" in head
    assert transport.disconnecting  # nothing more of the body is read
    return json.loads(body)["error"]


def body_of(request) -> bytes:
    request.content.seek(0)
    return request.content.read()


def test_a_form_body_reaches_the_application_unparsed(processed):
    channel, transport = channel_of(raw_body.RawBodyRequest)
    post(channel, FORM, b"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: %d\r\n" % len(FORM))
    [request] = processed
    assert request.args == {}  # Twisted parsed nothing
    assert body_of(request) == FORM  # what daphne sends the application, byte for byte


def test_daphnes_own_request_parses_the_form_on_the_event_loop(processed):
    """The cost RawBodyRequest removes (so the test above can fail): the same body parsed into 50 fields."""
    channel, transport = channel_of(DAPHNES_REQUEST)
    post(channel, FORM, b"Content-Type: multipart/form-data; boundary=XyZ\r\nContent-Length: %d\r\n" % len(FORM))
    [request] = processed
    assert len(request.args) == 50


def test_a_declared_length_over_the_limit_is_refused_before_the_body_is_read(settings, processed):
    settings.REQUEST_MAX_BODY_BYTES = 4096
    channel, transport = channel_of(raw_body.RawBodyRequest)
    body = b"x" * 5000
    post(channel, body, b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(body))
    error = refusal(transport)
    assert error["code"] == "request_too_large" and "4096 bytes" in error["message"]
    assert processed == []  # the whole body arrived in that read: still never handed to the application


def test_a_chunked_body_over_the_limit_is_refused(settings, processed):
    settings.REQUEST_MAX_BODY_BYTES = 4096
    channel, transport = channel_of(raw_body.RawBodyRequest)
    post(channel, chunked([b"y" * 1024] * 5), b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    assert refusal(transport)["code"] == "request_too_large"
    assert processed == []


def test_a_body_of_tiny_chunks_is_refused_after_max_body_chunks_and_the_rest_is_not_decoded(processed, monkeypatch):
    decoded = []
    handle = raw_body.RawBodyRequest.handleContentChunk
    monkeypatch.setattr(raw_body.RawBodyRequest, "handleContentChunk",
                        lambda request, data: (decoded.append(data), handle(request, data)))
    channel, transport = channel_of(raw_body.RawBodyRequest)
    pieces = [b"z"] * (3 * raw_body.MAX_BODY_CHUNKS)  # all in one read
    post(channel, chunked(pieces), b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    error = refusal(transport)
    assert error["code"] == "request_too_large" and f"{raw_body.MAX_BODY_CHUNKS} chunks" in error["message"]
    assert processed == []
    assert len(decoded) == raw_body.MAX_BODY_CHUNKS + 1  # Twisted's decoder stopped at the refusal


def test_a_chunked_body_within_the_limits_reaches_the_application_whole(processed):
    channel, transport = channel_of(raw_body.RawBodyRequest)
    pieces = [b'{"messages": ', b"[]" * 500, b"}"] * 3
    post(channel, chunked(pieces), b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n")
    [request] = processed
    assert body_of(request) == b"".join(pieces) and not transport.disconnecting


def test_install_makes_daphne_build_raw_body_requests(monkeypatch):
    monkeypatch.setattr(http_protocol, "WebRequest", http_protocol.WebRequest)  # restored after the test
    raw_body.install()
    factory = http_protocol.HTTPFactory(SimpleNamespace())
    assert factory.buildProtocol(("127.0.0.1", 1)).requestFactory is raw_body.RawBodyRequest


def test_the_served_site_refuses_a_body_of_tiny_chunks_and_serves_on(tmp_path):
    """Through `manage.py serve` (daphne, with install()): the refusal on the wire, a body within the limits
    reaching the application, and the server answering afterwards."""
    import socket

    from tests.live import LiveServer

    def exchange(raw: bytes) -> bytes:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as connection:
            connection.sendall(raw)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
            return answer

    head = b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n" \
           b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    server = LiveServer(workdir=tmp_path, env={"LOG_LEVEL": "WARNING"})
    server.start()
    try:
        refused = exchange(head + chunked([b" "] * (raw_body.MAX_BODY_CHUNKS + 10) + [b"{}"]))
        assert refused.startswith(b"HTTP/1.1 413 ")
        error = json.loads(refused.partition(b"\r\n\r\n")[2])["error"]
        assert error["code"] == "request_too_large" and "chunks" in error["message"]  # refused by the protocol layer
        served = exchange(head + chunked([b"{", b'"messages": []', b"}"]))
        assert served.startswith(b"HTTP/1.1 401 ")  # the application read it: no key
    finally:
        server.stop()
