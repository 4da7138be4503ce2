"""The request id of the work in progress (HTTP request, WebSocket connection, Celery task), on every log record."""

from __future__ import annotations

import logging
import uuid
from contextvars import ContextVar

current_request_id: ContextVar[str | None] = ContextVar("current_request_id", default=None)
connection_logger = logging.getLogger("llmsite.ws")


def request_id_from(incoming: str | None) -> str:
    """A sane id from a proxy (X-Request-ID) is kept so lines can be followed across services."""
    incoming = incoming or ""
    return incoming if incoming.isalnum() and len(incoming) <= 64 else uuid.uuid4().hex


def bind_request_id(request_id: str | None) -> None:
    """Name the work this context does from now on (asyncio tasks and sync_to_async threads inherit it)."""
    current_request_id.set(request_id)


def _record_with_request_id(*args, **kwargs) -> logging.LogRecord:
    record = _base_record_factory(*args, **kwargs)
    record.request_id = current_request_id.get()
    return record


# Every record gets the id when it is made, so every handler (and pytest's caplog) sees it.
_base_record_factory = logging.getLogRecordFactory()
if getattr(_base_record_factory, "__name__", "") != _record_with_request_id.__name__:
    logging.setLogRecordFactory(_record_with_request_id)


class RequestIdFilter(logging.Filter):
    """Makes sure a record has `request_id` for the formatter (one made by another record factory may not)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = current_request_id.get()
        return True


class WebSocketRequestIdMiddleware:
    """ASGI middleware: one request id per WebSocket connection, for every line its consumer logs."""

    def __init__(self, inner):
        self.inner = inner

    async def __call__(self, scope, receive, send):
        headers = dict(scope.get("headers") or [])
        request_id = request_id_from(headers.get(b"x-request-id", b"").decode("latin-1"))
        token = current_request_id.set(request_id)
        try:
            connection_logger.info("websocket connection", extra={"path": scope.get("path")})
            return await self.inner({**scope, "request_id": request_id}, receive, send)
        finally:
            current_request_id.reset(token)


def attach_to_task_message(headers: dict | None = None, **_) -> None:
    """Celery before_task_publish: carry the id of the request that queued the task."""
    request_id = current_request_id.get()
    if headers is not None and request_id and "request_id" not in headers:
        headers["request_id"] = request_id


def bind_from_task(task=None, task_id: str | None = None, **_) -> None:
    """Celery task_prerun: the queuing request's id, else the task's own id.

    A task run inline (CELERY_TASK_ALWAYS_EAGER) keeps the id of the request it runs in.
    """
    request = getattr(task, "request", None)
    sent = getattr(request, "request_id", None) or (getattr(request, "headers", None) or {}).get("request_id")
    if sent or current_request_id.get() is None:
        _bound_tasks.add(task_id)
        bind_request_id(sent or (task_id or "").replace("-", ""))


def unbind_after_task(task_id: str | None = None, **_) -> None:
    """Celery task_postrun: a pool process's next task must not inherit this one's id."""
    if task_id in _bound_tasks:
        _bound_tasks.discard(task_id)
        bind_request_id(None)


_bound_tasks: set[str | None] = set()
