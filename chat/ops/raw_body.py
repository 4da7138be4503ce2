"""HTTP request bodies as daphne receives them: left unparsed by Twisted, and bounded (for `manage.py serve`).

Twisted's Request parses every POST body that says it is a form (multipart or URL-encoded) into `request.args`,
and the Content-Type header of every POST through the `email` package, on the event loop's thread, before daphne
hands the raw body to Django, which parses it again where a view asks for it; daphne never reads `args`.
Measured: a 3 MB multipart POST sent by anyone, without a key, held every stream of the process for 1.1 s before
its 413. Requests here skip that parsing.

daphne also reads a whole body, of any size, before the application sees the request, and Twisted decodes a
chunked body chunk by chunk in Python on the event loop (~11 µs a chunk): 200,000 one-byte chunks (1.2 MB, no key)
took 0.7-1.1 s of the loop before their 401, in slices that held a running stream up to 271 ms (2.6 s on a machine
running the test suite beside it), and a body of gigabytes went to a temporary file. Here a body past
REQUEST_MAX_BODY_BYTES, or of more than MAX_BODY_CHUNKS chunks, gets a 413 in the API's error shape as soon as that
is known, and the connection is closed: nothing more of it is read.
"""

from __future__ import annotations

import json

from daphne import http_protocol
from django.conf import settings

from chat.errors import PayloadTooLarge, error_from_exception

# Clients send chunks of kilobytes: 4,096 chunks reach REQUEST_MAX_BODY_BYTES' default at 2.5 KB each. At about
# 11 µs of the event loop per chunk (measured), a body's chunks cost it at most ~50 ms.
MAX_BODY_CHUNKS = 4096


class RawBodyRequest(http_protocol.WebRequest):
    """daphne's request with Twisted's form parsing off and the body's size and chunk count bounded."""

    _body_bytes = 0
    _body_chunks = 0
    refused = False

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)

    def gotLength(self, length):
        """Content-Length (None for a chunked body): one over the limit is refused before any of it is read."""
        limit = settings.REQUEST_MAX_BODY_BYTES
        if length is not None and length > limit:
            self.refuse(f"The request body is larger than {limit} bytes.")
            length = 0  # no temporary file for a body that is not kept
        super().gotLength(length)

    def handleContentChunk(self, data):
        if self.refused:
            return  # what arrived with the data that crossed a limit
        self._body_bytes += len(data)
        self._body_chunks += 1
        if self._body_bytes > settings.REQUEST_MAX_BODY_BYTES:
            self.refuse(f"The request body is larger than {settings.REQUEST_MAX_BODY_BYTES} bytes.")
        elif self._body_chunks > MAX_BODY_CHUNKS:
            self.refuse(f"The request body came in more than {MAX_BODY_CHUNKS} chunks; send it in larger chunks "
                        "or with a Content-Length.")
        else:
            super().handleContentChunk(data)

    def process(self):
        if not self.refused:  # a refused body that still completed in the read that crossed the limit
            super().process()

    def refuse(self, message: str) -> None:
        """Answer 413 in the API's error shape and close the connection: Twisted reads no more of it, and the
        application never sees the request."""
        self.refused = True
        status, body, _ = error_from_exception(PayloadTooLarge(message))
        payload = json.dumps(body).encode()
        self.channel.transport.write(
            b"HTTP/1.1 %d Request Entity Too Large\r\nContent-Type: application/json\r\nContent-Length: %d\r\n"
            b"Connection: close\r\n\r\n%s" % (status, len(payload), payload))
        self.channel.transport.loseConnection()
        # Twisted reads no more, but its chunked decoder would still decode the rest of the read that crossed the
        # limit (up to 64 KB: ~10,000 one-byte chunks, ~100 ms of the loop). Its buffer (private) is emptied where
        # it has the expected shape; elsewhere the rest is decoded and dropped.
        buffered = getattr(getattr(self.channel, "_transferDecoder", None), "_buffer", None)
        if isinstance(buffered, bytearray):
            del buffered[:]


def install() -> None:
    """Make daphne's HTTP factory build RawBodyRequests (it names its request class when it builds a channel)."""
    http_protocol.WebRequest = RawBodyRequest
