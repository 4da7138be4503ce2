"""One error shape for every API response, the OpenAI one: {"error": {message, type, param, code}}.

Domain code raises `ApiError` subclasses or engine errors; `api_exception_handler` (DRF) and the
JSON handlers for Django's 404/500 render them. Unexpected errors are logged with the request id
and answered with a generic message carrying that id, never the exception's text.
"""

from __future__ import annotations

import logging
import uuid
from pathlib import PurePath

from django.core.exceptions import PermissionDenied
from django.http import Http404, JsonResponse
from rest_framework import exceptions as drf_exceptions
from rest_framework.response import Response

from .engine import ContextOverflow, EngineError, InvalidRequest, ModelUnavailable, UnknownModel, UnsupportedFeature
from .engine.errors import EngineOverloaded, GenerationFailed

logger = logging.getLogger("llmsite.api")


class ApiError(Exception):
    status = 400
    type = "invalid_request_error"
    code: str | None = None
    retry_after: int | None = None  # seconds; sent as Retry-After (429 quotas)

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None, status: int | None = None,
                 retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if retry_after is not None:
            self.retry_after = retry_after
        if code is not None:
            self.code = code
        if status is not None:
            self.status = status


class NotFound(ApiError):
    status = 404
    code = "not_found"


class PayloadTooLarge(ApiError):
    status = 413
    code = "request_too_large"


class RateLimited(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class ServiceUnavailable(ApiError):
    status = 503
    type = "service_unavailable"
    code = "model_unavailable"


# Paths answered in this shape, whatever DEBUG: the API, its schema and docs, and llama-server's paths kept at the
# root (/tokenize, /detokenize), with or without a trailing slash.
API_PREFIXES = ("/v1/", "/api/")
ROOT_API_SEGMENTS = frozenset({"tokenize", "detokenize"})


def is_api_path(path: str) -> bool:
    return path.startswith(API_PREFIXES) or path.split("/")[1] in ROOT_API_SEGMENTS


def error_body(message: str, *, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def request_id_of(request) -> str:
    request_id = getattr(request, "request_id", None)
    if request_id is None:
        request_id = uuid.uuid4().hex
        try:
            request.request_id = request_id
        except AttributeError:
            pass
    return request_id


def error_from_exception(exc: Exception, request=None) -> tuple[int, dict, dict]:
    """Map any exception to (status, body, headers); the single place that decides error shapes."""
    headers: dict = {}
    if isinstance(exc, ApiError):
        if exc.retry_after is not None:
            headers["Retry-After"] = str(exc.retry_after)
        return exc.status, error_body(exc.message, type=exc.type, param=exc.param, code=exc.code), headers
    if isinstance(exc, ContextOverflow):
        return 400, error_body(str(exc), type="invalid_request_error", param="messages",
                               code="context_length_exceeded"), headers
    if isinstance(exc, UnknownModel):
        return 404, error_body(str(exc), type="invalid_request_error", param="model", code="model_not_found"), headers
    if isinstance(exc, ModelUnavailable):
        # The file's name, not its full path: enough for an operator, nothing about the server's layout.
        message = f"Model {exc.model!r} ({PurePath(exc.path).name}) is unavailable: {exc.reason}"
        return 503, error_body(message, type="service_unavailable", code="model_unavailable"), headers
    if isinstance(exc, (UnsupportedFeature, InvalidRequest)):
        return 400, error_body(str(exc), type="invalid_request_error", param=getattr(exc, "param", None),
                               code="unsupported"), headers
    if isinstance(exc, drf_exceptions.ValidationError):
        param, message = first_validation_error(exc.detail)
        return 400, error_body(message, type="invalid_request_error", param=param, code="invalid_value"), headers
    if isinstance(exc, (drf_exceptions.NotAuthenticated, drf_exceptions.AuthenticationFailed)):
        message = str(exc.detail) if isinstance(exc, drf_exceptions.AuthenticationFailed) else (
            "No API key provided. Send 'Authorization: Bearer <key>'.")
        headers["WWW-Authenticate"] = 'Bearer realm="api"'
        return 401, error_body(message, type="authentication_error", code="invalid_api_key"), headers
    if isinstance(exc, drf_exceptions.Throttled):
        if exc.wait:
            headers["Retry-After"] = str(int(exc.wait) + 1)
        return 429, error_body("Rate limit reached for this API key; retry later.", type="rate_limit_error",
                               code="rate_limit_exceeded"), headers
    if isinstance(exc, drf_exceptions.PermissionDenied) and str(exc.detail).startswith("CSRF Failed"):
        # SessionAuthentication's refusal: the caller (a page on the login session) is told what is missing.
        return 403, error_body("CSRF check failed: a request on the login session must send the CSRF token (the "
                               "csrftoken cookie's value) in the X-CSRFToken header; API clients send an API key.",
                               type="permission_error", code="csrf_failed"), headers
    if isinstance(exc, (drf_exceptions.PermissionDenied, PermissionDenied)):
        return 403, error_body("You do not have permission to do this.", type="permission_error",
                               code="permission_denied"), headers
    if isinstance(exc, (drf_exceptions.NotFound, Http404)):
        return 404, error_body("Not found.", type="invalid_request_error", code="not_found"), headers
    if isinstance(exc, drf_exceptions.APIException):  # ParseError, MethodNotAllowed, UnsupportedMediaType...
        return exc.status_code, error_body(str(exc.detail), type="invalid_request_error",
                                           code=exc.default_code), headers
    if isinstance(exc, EngineOverloaded):  # back-pressure: the client should come back, not hang
        headers["Retry-After"] = str(exc.retry_after)
        return 503, error_body(str(exc), type="service_unavailable", code="engine_overloaded"), headers
    if isinstance(exc, GenerationFailed):  # a server fault, not unavailability: a 500, which SDKs do not retry
        logger.warning("generation failed request_id=%s: %s", request_id_of(request) if request else "-", exc)
        return 500, error_body(str(exc), type="server_error", code="generation_failed"), headers
    if isinstance(exc, EngineError):
        logger.warning("engine error request_id=%s: %s", request_id_of(request) if request else "-", exc)
        return 503, error_body(str(exc), type="service_unavailable", code="engine_error"), headers
    request_id = request_id_of(request) if request is not None else uuid.uuid4().hex
    logger.error("internal error request_id=%s", request_id, exc_info=exc)
    return 500, error_body(f"The server had an error processing your request (request id {request_id}).",
                           type="server_error", code="internal_error"), headers


def first_validation_error(detail, path: str = "") -> tuple[str | None, str]:
    """The first field error of a (nested) DRF validation detail, as (dotted field path, message)."""
    if isinstance(detail, dict):
        for key, value in detail.items():
            field = key if key != "non_field_errors" else ""
            return first_validation_error(value, f"{path}.{field}".strip(".") if field else path)
    if isinstance(detail, list):
        for index, value in enumerate(detail):
            if isinstance(value, (dict, list)) and value:
                return first_validation_error(value, f"{path}[{index}]" if isinstance(value, dict) else path)
            if value:
                return first_validation_error(value, path)
    message = str(detail)
    if path and not message.lower().startswith(path.split(".")[0].lower()):
        message = f"{path}: {message}"
    return (path or None), message


def api_exception_handler(exc, context):
    """DRF's EXCEPTION_HANDLER: every error in the one shape."""
    request = context.get("request")
    status, body, headers = error_from_exception(exc, request)
    return Response(body, status=status, headers=headers)


def json_error_response(exc: Exception, request=None) -> JsonResponse:
    status, body, headers = error_from_exception(exc, request)
    response = JsonResponse(body, status=status)
    for name, value in headers.items():
        response[name] = value
    return response
