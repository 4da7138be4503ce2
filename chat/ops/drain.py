"""Graceful drain: once SIGTERM arrives the instance admits nothing new and waits for running replies.

`chat/management/commands/serve.py` (the launcher around daphne's Server) calls `drain_begin()` (the flag:
chat/engines.py); `DrainMiddleware` then answers new API requests 503 with Retry-After, the WebSocket
consumer refuses new replies (error event `draining`, close 1012), `/ready` answers 503
(chat/ops/health.py), and the launcher stops the server once `work_in_progress()` is 0 or
DRAIN_TIMEOUT has passed. Requests already admitted — streams included — run to their end.
"""

from __future__ import annotations

import threading

from asgiref.sync import iscoroutinefunction

from llmsite.hybrid_middleware import HybridMiddleware

from chat.engines import DRAIN_RETRY_AFTER_SECONDS as RETRY_AFTER_SECONDS
from chat.engines import drain_begin, drain_reset, is_draining, loaded_engines  # noqa: F401 (the launcher's API)
from chat.errors import ServiceUnavailable, json_error_response

_lock = threading.Lock()
_in_flight = 0  # API requests admitted and not yet finished (a stream counts until its last byte)


def requests_in_flight() -> int:
    return _in_flight


def _admit(delta: int) -> None:
    global _in_flight
    with _lock:
        _in_flight += delta


def work_in_progress() -> int:
    """API requests in flight plus generations active or queued in this process's engines
    (WebSocket replies count through the engines)."""
    generations = 0
    for _, engine in loaded_engines():
        stats = engine.stats()
        generations += int(stats.get("active", 0)) + int(stats.get("queued", 0))
    return requests_in_flight() + generations


def _is_api(request) -> bool:
    return request.path.startswith("/v1/")


class DrainMiddleware(HybridMiddleware):
    """Refuses new API requests while draining; counts the admitted ones until their reply has been sent."""

    def _refuse(self, request):
        return json_error_response(ServiceUnavailable(
            "This instance is shutting down; retry the request.", code="draining",
            retry_after=RETRY_AFTER_SECONDS), request)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        if not _is_api(request):
            return self.get_response(request)
        if is_draining():
            return self._refuse(request)
        _admit(1)
        try:
            response = self.get_response(request)
        except BaseException:
            _admit(-1)
            raise
        return self._release_after(response)

    async def __acall__(self, request):
        if not _is_api(request):
            return await self.get_response(request)
        if is_draining():
            return self._refuse(request)
        _admit(1)
        try:
            response = await self.get_response(request)
        except BaseException:
            _admit(-1)
            raise
        return self._release_after(response)

    def _release_after(self, response):
        if not response.streaming:
            _admit(-1)
        elif response.is_async:
            response.streaming_content = _released_async(response.streaming_content)
        else:
            response.streaming_content = _released_sync(response.streaming_content)
        return response


async def _released_async(content):
    try:
        async for part in content:
            yield part
    finally:
        _admit(-1)


def _released_sync(content):
    try:
        yield from content
    finally:
        _admit(-1)
