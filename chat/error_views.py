"""Django's 404/500 handlers: the API's error shape under /v1/, Django's pages elsewhere."""

from django.views import defaults

from .errors import NotFound, json_error_response


def not_found(request, exception=None):
    if request.path.startswith("/v1/"):
        return json_error_response(NotFound(f"No API endpoint at {request.path}."), request)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if request.path.startswith("/v1/"):
        return json_error_response(RuntimeError("unhandled"), request)
    return defaults.server_error(request)


