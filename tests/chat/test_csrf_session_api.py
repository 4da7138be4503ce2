"""Every unsafe method of the REST API, reached with the browser's login session, needs Django's CSRF token: a
page elsewhere that the user visits must not be able to post, patch or delete in their name. Walks the URLconf,
so an endpoint added later is checked too (and an API key, which a foreign page cannot send, needs no token)."""

import uuid

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver

from tests.factories import make_api_client, make_user

pytestmark = pytest.mark.django_db

UNSAFE = ("post", "put", "patch", "delete")
SAMPLE = {"lookup_uuid": str(uuid.uuid4()), "lookup_int": "1", "str": "someone", "path": "some/model"}


def _routes(patterns=None, prefix=""):
    for pattern in get_resolver().url_patterns if patterns is None else patterns:
        if isinstance(pattern, URLResolver):
            yield from _routes(pattern.url_patterns, prefix + str(pattern.pattern))
        elif isinstance(pattern, URLPattern):
            yield prefix + str(pattern.pattern), pattern.callback


def _concrete(route: str) -> str:
    import re

    return "/" + re.sub(r"<(?:(\w+):)?\w+>", lambda m: SAMPLE[m.group(1) or "str"], route)


def unsafe_api_endpoints():
    found = []
    for route, callback in _routes():
        view_class = getattr(callback, "cls", None) or getattr(getattr(callback, "__wrapped__", None), "cls", None)
        if view_class is None or route.startswith(("admin/", "accounts/", "api-auth/", "api/")):
            continue
        for method in UNSAFE:
            if hasattr(view_class, method):
                found.append((method, _concrete(route)))
    return found


ENDPOINTS = unsafe_api_endpoints()


def test_the_walk_finds_the_unsafe_endpoints():
    urls = {url for _, url in ENDPOINTS}
    assert ("post", "/v1/chat/completions") in ENDPOINTS and ("delete", f"/v1/conversations/{SAMPLE['lookup_uuid']}/") in ENDPOINTS
    assert any(url.endswith("/accept/") for url in urls) and ("post", "/tokenize") in ENDPOINTS
    assert len(ENDPOINTS) >= 30


@pytest.fixture
def browser():
    user = make_user("victim", password="pw-123456789-long")
    strict = Client(enforce_csrf_checks=True)
    strict.force_login(user)
    return strict


@pytest.mark.parametrize(("method", "url"), ENDPOINTS, ids=[f"{m} {u}" for m, u in ENDPOINTS])
def test_the_session_needs_the_csrf_token_on_every_unsafe_method(browser, method, url):
    refused = getattr(browser, method)(url, data="{}", content_type="application/json")
    assert refused.status_code == 403, refused.content
    assert refused.json()["error"]["code"] == "csrf_failed", refused.content
    assert "CSRF" in refused.json()["error"]["message"]
    # With the token (as the chat page would send it) the same request gets past the check.
    browser.get("/")  # the page sets the csrftoken cookie
    token = browser.cookies["csrftoken"].value
    allowed = getattr(browser, method)(url, data="{}", content_type="application/json", HTTP_X_CSRFTOKEN=token,
                                       HTTP_ACCEPT="application/json")
    assert allowed.status_code != 403 or allowed.json()["error"]["code"] != "csrf_failed", allowed.content


@pytest.mark.parametrize("url", ["/v1/chat/completions", "/v1/conversations/" + SAMPLE["lookup_uuid"] + "/"])
def test_an_api_key_needs_no_csrf_token(url):
    client = make_api_client("keyed")
    response = client.delete(url) if url.endswith("/") else client.post(url, {}, format="json")
    assert response.status_code != 403, response.content
