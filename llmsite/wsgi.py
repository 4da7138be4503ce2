"""WSGI entry point (plain HTTP only; the ASGI app in asgi.py also serves streams and WebSockets)."""

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llmsite.settings")
application = get_wsgi_application()
