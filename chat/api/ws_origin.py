"""Which pages may open a WebSocket on the browser's session: the rule Django's CSRF check applies to a POST's Origin.

channels' AllowedHostsOriginValidator compares only the Origin's host with ALLOWED_HOSTS: a page on
http://127.0.0.1:9999 is the same site as a server on 127.0.0.1:8765, so the browser sends the session cookie,
and that page could read and delete the user's conversations. Here the Origin must be the socket's own origin
(the scheme as the proxy tells it, with SECURE_PROXY_SSL_HEADER as for HTTP; the Host header with its port) or
one of CSRF_TRUSTED_ORIGINS (`https://*.example.com` for subdomains), as CsrfViewMiddleware requires.
"""

from urllib.parse import urlsplit

from django.conf import settings
from django.http.request import split_domain_port, validate_host
from django.utils.http import is_same_domain

DEBUG_HOSTS = [".localhost", "127.0.0.1", "[::1]"]  # what Django's get_host() allows with DEBUG and no ALLOWED_HOSTS


def header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


def is_secure(scope) -> bool:
    """HttpRequest.is_secure() for a socket: the trusted proxy header when set and sent, else the connection."""
    if settings.SECURE_PROXY_SSL_HEADER:
        meta_name, secure_value = settings.SECURE_PROXY_SSL_HEADER
        forwarded = header(scope, meta_name.removeprefix("HTTP_").lower().replace("_", "-").encode())
        if forwarded is not None:
            return forwarded.split(",", 1)[0].strip() == secure_value
    return scope.get("scheme") in ("wss", "https")


def own_origin(scope) -> str | None:
    """The origin of the page that may open this socket: scheme and Host header; None for a Host not allowed."""
    host = header(scope, b"host")
    if not host:
        return None
    domain, _ = split_domain_port(host)
    allowed = settings.ALLOWED_HOSTS or (DEBUG_HOSTS if settings.DEBUG else [])
    if not domain or not validate_host(domain, allowed):
        return None
    return f"{'https' if is_secure(scope) else 'http'}://{host}"


def origin_allowed(scope) -> bool:
    origin = header(scope, b"origin")
    if not origin:
        return False  # every browser sends one on a WebSocket
    if origin == own_origin(scope):
        return True
    trusted = settings.CSRF_TRUSTED_ORIGINS
    if origin in (pattern for pattern in trusted if "*" not in pattern):
        return True
    try:
        parsed = urlsplit(origin)
    except ValueError:
        return False
    return any(is_same_domain(parsed.netloc, pattern.netloc.lstrip("*"))
               for pattern in (urlsplit(p) for p in trusted if "*" in p) if pattern.scheme == parsed.scheme)
