"""Every page a browser renders sends a Content-Security-Policy (llmsite/content_security.py): the site's own pages
POLICY, the admin (style attributes) and the API docs their own. tests/chat/test_browser.py runs the chat page under
it, tests/llmsite/test_admin_under_policy.py the admin, tests/llmsite/test_api_docs.py the docs."""

import pytest
from django.test import Client

from llmsite.content_security import STYLED_POLICY, DOCS_POLICY, POLICY
from tests.factories import make_superuser

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.llmsite.urls_with_password_reset")]


@pytest.fixture
def browser():
    client = Client()
    client.force_login(make_superuser("csp-user"))
    return client


@pytest.mark.parametrize("path", ["/", "/accounts/password_change/", "/accounts/password_change/done/",
                                  "/accounts/password_reset/", "/accounts/password_reset/done/"])
def test_the_sites_own_pages_send_the_policy(browser, path):
    response = browser.get(path)
    assert response.status_code == 200
    assert response["Content-Security-Policy"] == POLICY


def test_the_login_page_sends_the_policy():
    response = Client().get("/accounts/login/")
    assert response.status_code == 200 and response["Content-Security-Policy"] == POLICY


def test_the_policy_allows_this_origin_only_and_no_framing():
    directives = dict(d.strip().split(" ", 1) for d in POLICY.split(";"))
    assert directives["default-src"] == "'self'" and directives["connect-src"] == "'self'"
    assert directives["object-src"] == directives["base-uri"] == directives["frame-ancestors"] == "'none'"


@pytest.mark.parametrize("path", ["/admin/", "/admin/login/", "/admin/characters/character/", "/admin/nowhere/",
                                  "/v1/models", "/api-auth/login/"])
def test_other_pages_send_a_policy_that_keeps_their_inline_styles_and_no_inline_script(browser, path):
    """The admin, DRF's browsable API and its login page."""
    assert browser.get(path, HTTP_ACCEPT="text/html")["Content-Security-Policy"] == STYLED_POLICY
    directives = dict(d.strip().split(" ", 1) for d in STYLED_POLICY.split(";"))
    assert directives["style-src"] == "'self' 'unsafe-inline'" and "script-src" not in directives


@pytest.mark.parametrize("path", ["/api/docs/", "/api/docs/?script=", "/api/redoc/"])
def test_the_api_docs_send_their_policy_and_start_swagger_from_a_file(browser, path):
    response = browser.get(path)
    assert response.status_code == 200 and response["Content-Security-Policy"] == DOCS_POLICY
    if path == "/api/docs/":
        assert b"<script>" not in response.content and b"?script=" in response.content


def test_api_answers_in_json_carry_no_policy(browser):
    response = browser.get("/v1/models", HTTP_ACCEPT="application/json")
    assert response.status_code == 200 and "Content-Security-Policy" not in response
