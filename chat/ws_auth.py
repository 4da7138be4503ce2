"""WebSocket authentication by API key (Authorization header or ?api_key=), after the session's."""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async

from .api_keys import api_key_find_valid


@database_sync_to_async
def _user_for_key(raw_key: str):
    api_key = api_key_find_valid(raw_key=raw_key)
    return (api_key.user, api_key) if api_key else (None, None)


class ApiKeyAuthMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        raw_key = ""
        for name, value in scope.get("headers", []):
            if name == b"authorization" and value.lower().startswith(b"bearer "):
                raw_key = value[7:].decode("latin-1").strip()
        if not raw_key:
            raw_key = parse_qs(scope.get("query_string", b"").decode()).get("api_key", [""])[0]
        if raw_key:
            user, api_key = await _user_for_key(raw_key)
            if user is not None:
                scope = {**scope, "user": user, "api_key": api_key}
        return await self.app(scope, receive, send)
