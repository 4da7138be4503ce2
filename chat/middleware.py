"""Request id on every request/response, and the request-size cap checked before the body is read."""

import uuid

from django.conf import settings
from asgiref.sync import iscoroutinefunction, markcoroutinefunction

from .errors import PayloadTooLarge, json_error_response


class RequestIdMiddleware:
    """Gives each request an id (or keeps a sane X-Request-ID from a proxy) and returns it in a header."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def _prepare(self, request):
        incoming = request.headers.get("X-Request-ID", "")
        request.request_id = incoming if incoming.isalnum() and len(incoming) <= 64 else uuid.uuid4().hex
        length = request.META.get("CONTENT_LENGTH") or "0"
        if request.path.startswith("/v1/") and length.isdigit() and int(length) > settings.API_MAX_REQUEST_BYTES:
            return json_error_response(PayloadTooLarge(
                f"The request body is larger than {settings.API_MAX_REQUEST_BYTES} bytes."), request)
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
