"""Base of middleware that runs natively under both WSGI and ASGI (no sync/async adapter hop per request)."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction


class HybridMiddleware:
    """Subclasses define __call__ (which hands over to __acall__ when `iscoroutinefunction(self)`) and __acall__."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)
