"""ASGI entry point served by daphne: HTTP (including SSE streams) and WebSockets."""

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
# Django must be set up before anything imports models (routing, consumers), as get_asgi_application() does.
django.setup(set_prefix=False)

from llmsite.sync_middleware import GroupingASGIHandler  # noqa: E402

django_asgi_app = GroupingASGIHandler()  # Django's handler, its synchronous middleware in one hop

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from django.conf import settings  # noqa: E402
from django.contrib.staticfiles.handlers import ASGIStaticFilesHandler  # noqa: E402

from chat.api.routing import websocket_urlpatterns  # noqa: E402
from chat.api.ws_auth import ApiKeyAuthMiddleware  # noqa: E402
from llmsite.log_context import WebSocketRequestIdMiddleware  # noqa: E402

http_app = ASGIStaticFilesHandler(django_asgi_app) if settings.SERVE_STATIC else django_asgi_app

application = ProtocolTypeRouter({
    "http": http_app,
    # A Bearer API key, or the session's user with the Origin checked as Django's CSRF check does
    # (chat/api/ws_auth.py, ws_origin.py). Every log line of a connection carries its request id.
    "websocket": WebSocketRequestIdMiddleware(
        AuthMiddlewareStack(ApiKeyAuthMiddleware(URLRouter(websocket_urlpatterns)))),
})
