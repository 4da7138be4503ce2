"""chat/ops/raw_body.py: daphne's requests reach the application with their body as it came; Twisted does not
parse a form body (or the Content-Type header of every POST) on the event loop. A real Twisted channel on a
string transport."""

from types import SimpleNamespace

from daphne import http_protocol
from twisted.internet.testing import StringTransport
from twisted.web import http

from chat.ops import raw_body

BOUNDARY = b"XyZ"
FORM = b"".join(b'--XyZ\r\nContent-Disposition: form-data; name="f%d"\r\n\r\nvalue %d\r\n' % (n, n)
                for n in range(50)) + b"--XyZ--\r\n"


def received(request_class, body: bytes = FORM, content_type: bytes = b"multipart/form-data; boundary=" + BOUNDARY):
    """A request of `request_class` after Twisted received a POST of `body` (processing recorded, not run)."""

    class Recorded(request_class):
        processed = False

        def process(self):
            self.processed = True

    channel = http.HTTPChannel()
    channel.factory = SimpleNamespace(server=SimpleNamespace(protocol_connected=lambda protocol: None))
    channel.makeConnection(StringTransport())
    request = Recorded(channel)
    request.requestHeaders.setRawHeaders(b"content-type", [content_type])
    request.requestHeaders.setRawHeaders(b"content-length", [str(len(body)).encode()])
    request.gotLength(len(body))
    request.handleContentChunk(body)
    request.requestReceived(b"POST", b"/v1/chat/completions", b"HTTP/1.1")
    return request


def test_a_form_body_reaches_the_application_unparsed():
    request = received(raw_body.RawBodyRequest)
    assert request.processed
    assert request.args == {}  # Twisted parsed nothing
    request.content.seek(0)
    assert request.content.read() == FORM  # what daphne sends the application, byte for byte


def test_daphnes_own_request_parses_the_form_on_the_event_loop():
    """The cost RawBodyRequest removes (so the test above can fail): the same body parsed into 50 fields."""
    request = received(raw_body.RawBodyRequest.__mro__[1])
    assert request.processed
    assert len(request.args) == 50


def test_install_makes_daphne_build_raw_body_requests(monkeypatch):
    monkeypatch.setattr(http_protocol, "WebRequest", http_protocol.WebRequest)  # restored after the test
    raw_body.install()
    factory = http_protocol.HTTPFactory(SimpleNamespace())
    assert factory.buildProtocol(("127.0.0.1", 1)).requestFactory is raw_body.RawBodyRequest
