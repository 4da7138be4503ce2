"""Request id, size cap and URL check on the way in; a structured log line and metrics on the way out."""

import logging
import time
from urllib.parse import parse_qsl, unquote

from asgiref.sync import iscoroutinefunction
from django.conf import settings
from django.http import HttpResponseBadRequest

from llmsite.hybrid_middleware import HybridMiddleware
from llmsite.log_context import bind_request_id, request_id_from

from chat.errors import ApiError, PayloadTooLarge, is_api_path, json_error_response
from chat.metrics import http_requests
from chat.models import ApiKey

request_logger = logging.getLogger("llmsite.requests")

# Metric labels take the methods clients use; any other name (anyone may send "ZZZ") counts as "other", or
# each new name would add series that live as long as the process.
METRIC_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


def url_nul_refusal(request) -> ApiError | None:
    """A 400 for a NUL character (%00) in the URL's path or query, else None.

    PostgreSQL text cannot hold NUL: a path segment or query value with one reached a query as a 500. It is the
    only such character a URL can bring: Django decodes a path's or query's invalid UTF-8 into text without it.
    """
    if "\x00" in request.path:
        return ApiError("The URL's path contains a NUL character (%00), which no id or name can hold.",
                        code="invalid_value")
    query = request.META.get("QUERY_STRING", "")
    if "\x00" not in unquote(query):
        return None
    name = next((name for name, value in parse_qsl(query, keep_blank_values=True) if "\x00" in name + value), "")
    if not name or "\x00" in name:
        return ApiError("The URL's query contains a NUL character (%00), which no name or value can hold.",
                        code="invalid_value")
    return ApiError(f"The query parameter {name[:80]!r} contains a NUL character (%00), which no value can hold.",
                    param=name, code="invalid_value")


class RequestIdMiddleware(HybridMiddleware):
    """Gives each request an id (or keeps a sane X-Request-ID from a proxy) and returns it in a header; refuses a
    body declared too large for the API, and a URL with a NUL character (`url_nul_refusal`)."""

    def _prepare(self, request):
        request.request_id = request_id_from(request.headers.get("X-Request-ID"))
        bind_request_id(request.request_id)  # every log line of this request names it
        length = request.META.get("CONTENT_LENGTH") or "0"
        # ASCII digits only ("²" passes isdigit, not int()); more than 18 digits is too large without reading it.
        declared = length.isascii() and length.isdigit()
        too_large = declared and (len(length) > 18 or int(length) > settings.API_MAX_REQUEST_BYTES)
        if request.path.startswith("/v1/") and too_large:
            return json_error_response(PayloadTooLarge(
                f"The request body is larger than {settings.API_MAX_REQUEST_BYTES} bytes."), request)
        refusal = url_nul_refusal(request)
        if refusal is not None:  # outside the API too: the admin's search and filters query the database as well
            return json_error_response(refusal, request) if is_api_path(request.path) else (
                HttpResponseBadRequest(refusal.message, content_type="text/plain; charset=utf-8"))
        return None

    def _finish(self, request, response):
        response["X-Request-ID"] = request.request_id
        if settings.INSTANCE_NAME:  # which of several instances behind the balancer answered
            response["X-Served-By"] = settings.INSTANCE_NAME
        return response

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._finish(request, self._prepare(request) or self.get_response(request))

    async def __acall__(self, request):
        return self._finish(request, self._prepare(request) or await self.get_response(request))


class RequestLogMiddleware(HybridMiddleware):
    """One JSON log line and one metrics count per request (after the stream ends, for streams).

    Fields: request id, key id (never the key), user id, character, model, token counts, time to
    first token, total time, cache result, status. Prompt and reply only when LOG_PROMPTS is on.
    """

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        started = time.perf_counter()
        return self._observe(request, self.get_response(request), started)

    async def __acall__(self, request):
        started = time.perf_counter()
        return self._observe(request, await self.get_response(request), started)

    def _observe(self, request, response, started):
        if not response.streaming:
            self._record(request, response, started)
        elif response.is_async:
            response.streaming_content = self._after_async_stream(response.streaming_content, request, response, started)
        else:
            response.streaming_content = self._after_stream(response.streaming_content, request, response, started)
        return response

    async def _after_async_stream(self, content, request, response, started):
        try:
            async for part in content:
                yield part
        finally:
            self._record(request, response, started)

    def _after_stream(self, content, request, response, started):
        try:
            yield from content
        finally:
            self._record(request, response, started)

    def _record(self, request, response, started):
        match = getattr(request, "resolver_match", None)
        endpoint = (match.url_name or match.route) if match else "unmatched"
        method = request.method if request.method in METRIC_METHODS else "other"
        http_requests.labels(endpoint, method, str(response.status_code)).inc()
        if not request.path.startswith(("/v1/", "/ws/")):
            return
        auth = getattr(request, "auth", None)
        user = getattr(request, "user", None)
        # request_id comes with every record (llmsite/log_context.py).
        fields = {"method": request.method, "path": request.path,
                  "status": response.status_code, "key_id": getattr(auth, "pk", None) if isinstance(auth, ApiKey) else None,
                  "user_id": user.pk if user is not None and user.is_authenticated else None,
                  "total_ms": round((time.perf_counter() - started) * 1000, 1)}
        record = getattr(response, "reply_record", None)  # set by chat/api/views.py
        if record is not None:
            fields.update(reply_log_fields(record))
        fields.update(getattr(response, "log_fields", {}))  # set by chat/api/views.py where there is no plan
        # The fields become keys of the JSON log line (python-json-logger puts `extra` at the top level).
        request_logger.info("%s %s %s", request.method, request.path, response.status_code, extra=fields)


def reply_log_fields(record) -> dict:
    plan, completion, timing = record.plan, record.completion, record.timing
    fields = {"character": plan.character.slug if plan.character else None, "model": plan.model_name,
              "prompt_tokens": completion.prompt_tokens if completion else None,
              "completion_tokens": completion.completion_tokens if completion else None,
              "ttft_ms": round((timing.first_token_at - timing.started) * 1000, 1)
              if timing and timing.first_token_at else None,
              "finish_reason": completion.finish_reason if completion else None,
              "cache": record.cache_status, "scenarios": [s.pk for s in plan.prompt.scenarios],
              "end_user": plan.end_user or None}  # the request's opaque `user` id
    if settings.LOG_PROMPTS:
        fields["prompt"] = plan.prompt.text
        fields["reply"] = completion.text if completion else None
    return fields
