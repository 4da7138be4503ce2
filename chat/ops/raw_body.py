"""HTTP requests whose body Twisted leaves unparsed (for `manage.py serve`).

Twisted's Request parses every POST body that says it is a form (multipart or URL-encoded) into `request.args`,
and the Content-Type header of every POST through the `email` package, on the event loop's thread, before daphne
hands the raw body to Django, which parses it again where a view asks for it; daphne never reads `args`.
Measured: a 3 MB multipart body sent by anyone, without a key, held every stream of the process for 1.1 s before
its 413, and the header alone cost about a millisecond of each API request. Requests here skip that parsing.
"""

from __future__ import annotations

from daphne import http_protocol


class RawBodyRequest(http_protocol.WebRequest):
    """daphne's request with Twisted's form parsing off: the body reaches the application as it came."""

    def __init__(self, *args, **kwargs):
        kwargs["parsePOSTFormSubmission"] = False
        super().__init__(*args, **kwargs)


def install() -> None:
    """Make daphne's HTTP factory build RawBodyRequests (it names its request class when it builds a channel)."""
    http_protocol.WebRequest = RawBodyRequest
