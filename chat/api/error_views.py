"""Django's 404/500 handlers and the API's catch-all: the API's error shape on the API's paths
(`chat.errors.is_api_path`), whatever DEBUG."""

from django.urls import Resolver404, resolve
from django.views import defaults
from django.views.decorators.csrf import csrf_exempt

from chat.errors import NotFound, is_api_path, json_error_response


@csrf_exempt  # an unknown path has no form to protect; a POST from an API client must get the JSON 404 too
def api_not_found(request, *args, **kwargs):
    """The last URL pattern under the API's paths: resolving here (rather than raising Http404) keeps
    Django's HTML debug page away from API clients when DEBUG is on."""
    message = f"No API endpoint at {request.path}."
    if not request.path.endswith("/") and _resolves_elsewhere(request.path + "/"):
        message += f" Did you mean {request.path}/ ?"
    return json_error_response(NotFound(message), request)


def _resolves_elsewhere(path: str) -> bool:
    try:
        return resolve(path).func is not api_not_found
    except Resolver404:
        return False


def not_found(request, exception=None):
    if is_api_path(request.path):
        return json_error_response(NotFound(f"No API endpoint at {request.path}."), request)
    return defaults.page_not_found(request, exception)


def server_error(request):
    if is_api_path(request.path):
        return json_error_response(RuntimeError("unhandled"), request)
    return defaults.server_error(request)
