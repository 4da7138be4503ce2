"""The site's own pages (chat, login, password pages) send a Content-Security-Policy; the admin, whose templates
use style attributes, does not (llmsite/content_security.py). tests/chat/test_browser.py runs the chat page under it."""

import pytest
from django.test import Client

from llmsite.content_security import POLICY
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


def test_the_admin_keeps_its_inline_styles(browser):
    assert "Content-Security-Policy" not in browser.get("/admin/")
