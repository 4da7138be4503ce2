"""llmsite/sync_middleware.py: under ASGI, Django's synchronous middleware runs as one group, in one thread hop,
with the same effect as Django's own handler (headers, CSRF, sessions); settings.MIDDLEWARE is left as it is.
Requests go through the real handlers with asgiref's ApplicationCommunicator."""

from unittest import mock

import pytest
from asgiref import sync
from asgiref.sync import async_to_sync
from asgiref.testing import ApplicationCommunicator
from django.conf import settings
from django.core.handlers.asgi import ASGIHandler

from llmsite.sync_middleware import GroupingASGIHandler, SyncMiddlewareGroup, longest_sync_run

DJANGO_SYNC = [path for path in settings.MIDDLEWARE if path.startswith("django.")]


def request(handler, method: str, path: str, body: bytes = b"", headers=()) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one HTTP request through `handler`, an ASGI application."""
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-length", str(len(body)).encode()), *headers],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}

    async def run():
        application = ApplicationCommunicator(handler, scope)
        await application.send_input({"type": "http.request", "body": body})
        start = await application.receive_output(30)
        content = b""
        while True:
            message = await application.receive_output(30)
            content += message.get("body", b"")
            if not message.get("more_body"):
                break
        await application.wait(30)
        return start["status"], {name.decode().lower(): value.decode() for name, value in start["headers"]}, content

    return async_to_sync(run)()


def test_the_run_grouped_is_djangos_seven_middleware_in_their_order():
    start, end = longest_sync_run(list(settings.MIDDLEWARE))
    assert settings.MIDDLEWARE[start:end] == DJANGO_SYNC and len(DJANGO_SYNC) == 7


def test_the_handler_loads_one_group_and_leaves_settings_as_they_were():
    before = list(settings.MIDDLEWARE)
    handler = GroupingASGIHandler()
    assert list(settings.MIDDLEWARE) == before  # Django's checks (admin, check --deploy) read what really runs
    assert SyncMiddlewareGroup.member_paths == DJANGO_SYNC
    assert len(handler._view_middleware) == 1  # the group's process_view, which runs CSRF's


@pytest.mark.django_db(transaction=True)
def test_a_page_gets_the_same_headers_and_cookies_as_from_djangos_handler():
    grouped = request(GroupingASGIHandler(), "GET", "/admin/login/")
    plain = request(ASGIHandler(), "GET", "/admin/login/")
    assert grouped[0] == plain[0] == 200
    for name in ("x-frame-options", "x-content-type-options", "referrer-policy", "cross-origin-opener-policy",
                 "content-security-policy"):
        assert grouped[1].get(name) == plain[1].get(name) and grouped[1].get(name), name
    assert "csrftoken=" in grouped[1]["set-cookie"]  # CSRF's process_response, as from Django's handler


@pytest.mark.django_db(transaction=True)
def test_a_post_without_a_csrf_token_is_refused_by_the_grouped_csrf_check():
    body = b"username=someone&password=secret"
    status, _, content = request(GroupingASGIHandler(), "POST", "/admin/login/", body,
                                 [(b"content-type", b"application/x-www-form-urlencoded")])
    assert status == 403 and b"CSRF" in content


@pytest.mark.django_db(transaction=True)
def test_the_group_takes_fewer_thread_hops_than_djangos_handler():
    hops = []
    original = sync.SyncToAsync.__call__

    async def counted(self, *args, **kwargs):
        hops.append(getattr(self.func, "__qualname__", repr(self.func)))
        return await original(self, *args, **kwargs)

    counts = {}
    for name, handler in (("grouped", GroupingASGIHandler()), ("django", ASGIHandler())):
        hops.clear()
        with mock.patch.object(sync.SyncToAsync, "__call__", counted):
            assert request(handler, "GET", "/admin/login/")[0] == 200
        counts[name] = len(hops)
    # Django: two per middleware with both hooks (process_request, process_response), one with only one.
    assert counts["django"] >= 12
    assert counts["grouped"] <= counts["django"] - 10, counts
