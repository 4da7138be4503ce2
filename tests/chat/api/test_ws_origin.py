"""The Origin a WebSocket on the browser's session must come from: the socket's own origin (scheme, host and
port) or one of CSRF_TRUSTED_ORIGINS, as Django's CSRF check requires of a POST (chat/api/ws_origin.py)."""

import pytest

from chat.api.ws_origin import origin_allowed


def scope(origin: str | None, host: str = "127.0.0.1:8765", **headers) -> dict:
    pairs = [(b"host", host.encode())] + ([(b"origin", origin.encode())] if origin else [])
    pairs += [(name.replace("_", "-").encode(), value.encode()) for name, value in headers.items()]
    return {"type": "websocket", "headers": pairs}


@pytest.fixture
def site(settings):
    settings.ALLOWED_HOSTS = ["127.0.0.1", "chat.example.com"]
    settings.CSRF_TRUSTED_ORIGINS = []
    settings.SECURE_PROXY_SSL_HEADER = None
    return settings


@pytest.mark.parametrize(("origin", "allowed"), [
    ("http://127.0.0.1:8765", True),     # the chat page of this server
    ("http://127.0.0.1:9999", False),    # another server on the same host: the same site, so the cookie goes along
    ("https://127.0.0.1:8765", False),   # the scheme counts too
    ("http://127.0.0.1", False),
    ("http://evil.example", False),
    ("null", False),
    (None, False),
])
def test_only_the_sockets_own_origin_is_allowed(site, origin, allowed):
    assert origin_allowed(scope(origin)) is allowed


def test_a_host_outside_allowed_hosts_has_no_origin_of_its_own(site):
    assert not origin_allowed(scope("http://evil.example:8765", host="evil.example:8765"))


def test_behind_a_tls_proxy_the_scheme_is_the_one_the_proxy_tells(site):
    site.SECURE_PROXY_SSL_HEADER = ("HTTP_X_FORWARDED_PROTO", "https")
    tls = {"x_forwarded_proto": "https"}
    assert origin_allowed(scope("https://chat.example.com", host="chat.example.com", **tls))
    assert not origin_allowed(scope("http://chat.example.com", host="chat.example.com", **tls))
    assert origin_allowed(scope("http://chat.example.com", host="chat.example.com", x_forwarded_proto="http"))
    # Without the setting the header is not trusted: the connection's own scheme counts.
    site.SECURE_PROXY_SSL_HEADER = None
    assert not origin_allowed(scope("https://chat.example.com", host="chat.example.com", **tls))
    assert origin_allowed({**scope("https://chat.example.com", host="chat.example.com"), "scheme": "wss"})


def test_csrf_trusted_origins_are_allowed_with_djangos_subdomain_patterns(site):
    site.CSRF_TRUSTED_ORIGINS = ["https://app.example.org", "https://*.example.net"]
    assert origin_allowed(scope("https://app.example.org"))
    assert not origin_allowed(scope("https://other.example.org"))
    assert origin_allowed(scope("https://chat.example.net"))
    assert origin_allowed(scope("https://a.b.example.net"))
    assert not origin_allowed(scope("http://chat.example.net"))
    assert not origin_allowed(scope("https://example.net.evil.example"))
