"""WebSocket authentication: an API key in the Authorization header, or the browser's session cookie.

Policy (docs/API.md): a client that sends `Authorization: Bearer <key>` is not a browser (browsers
cannot set that header on a WebSocket), so it needs no Origin header; a bad key is refused. A
cookie session is what a foreign web page could ride on, so its Origin must be the socket's own origin
(scheme, host and port) or one of CSRF_TRUSTED_ORIGINS, as Django's CSRF check requires (chat/api/ws_origin.py). A key in the query string is refused outright: URLs end up in proxy logs.

A socket stays open for hours, so its credentials are checked again before every operation
(`credentials_now`), as every HTTP request checks them: a revoked or expired key, a deactivated user or a
session logged out (or whose password changed) ends the socket, and a key's new quotas apply at once.
"""

from importlib import import_module
from types import SimpleNamespace
from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from django.conf import settings
from django.contrib.auth import get_user as session_user
from django.contrib.auth.models import AnonymousUser

from .keys import api_key_find_valid
from .ws_origin import origin_allowed

CLOSE_UNAUTHENTICATED = 4401
CLOSE_FOREIGN_ORIGIN = 4403


def _user_for_key_now(raw_key: str):
    api_key = api_key_find_valid(raw_key=raw_key)
    return (api_key.user, api_key) if api_key else (AnonymousUser(), None)


# Not thread-sensitive: outside a request's context that would be one thread for every handshake of the process,
# so one client's flood of handshakes (or a slow database) would hold up everyone's.
_user_for_key = database_sync_to_async(_user_for_key_now, thread_sensitive=False)


def credentials_now(scope) -> tuple | None:
    """(user, api_key or None) as they stand now for the socket's credentials; None when they are no longer
    valid. Sync (database)."""
    raw_key = bearer_key(scope)
    if raw_key is not None:
        api_key = api_key_find_valid(raw_key=raw_key)
        return (api_key.user, api_key) if api_key else None
    session = scope.get("session")
    if session is None or not session.session_key:
        return None
    fresh = import_module(settings.SESSION_ENGINE).SessionStore(session.session_key)  # not the handshake's copy
    user = session_user(SimpleNamespace(session=fresh))  # checks is_active and the password's session hash
    if not user.is_authenticated or user.pk != getattr(scope.get("user"), "pk", None):
        return None
    return user, None


def bearer_key(scope) -> str | None:
    """The key of an `Authorization: Bearer` header; None when there is no such header."""
    for name, value in scope.get("headers", []):
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].decode("latin-1").strip()
    return None


async def refuse(receive, send, code: int = CLOSE_UNAUTHENTICATED) -> None:
    """Decline the handshake (the client sees the close code, or HTTP 403 from daphne)."""
    await receive()  # websocket.connect
    await send({"type": "websocket.close", "code": code})


class ApiKeyAuthMiddleware:
    """Inside AuthMiddlewareStack: a Bearer key replaces the session's user and skips the origin check."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if "api_key" in parse_qs(scope.get("query_string", b"").decode("latin-1")):
            return await refuse(receive, send)
        raw_key = bearer_key(scope)
        if raw_key is None:
            if not origin_allowed(scope):
                return await refuse(receive, send, CLOSE_FOREIGN_ORIGIN)
            return await self.app(scope, receive, send)
        user, api_key = await _user_for_key(raw_key)
        # An invalid key leaves an anonymous user, whom the consumer refuses (no fallback to a session).
        return await self.app({**scope, "user": user, "api_key": api_key}, receive, send)
