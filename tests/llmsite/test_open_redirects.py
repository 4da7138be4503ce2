"""A `next` parameter on the login and logout pages (the site's, the admin's, the browsable API's) only ever leads
back into this site: a link to the login page must not send the user on to a look-alike page elsewhere."""

import html
import re

import pytest
from django.test import Client

from tests.factories import make_user

pytestmark = pytest.mark.django_db

FOREIGN = ["https://evil.example/", "//evil.example/", "/\\evil.example/", "\\\\evil.example", "http:evil.example",
           "https:/evil.example", " //evil.example", "javascript:alert(1)", "/%2F%2Fevil.example",
           "///evil.example", "http://testserver@evil.example/"]
LOGIN_PAGES = ["/accounts/login/", "/admin/login/", "/api-auth/login/"]
LOGOUT_PAGES = ["/accounts/logout/", "/admin/logout/", "/api-auth/logout/"]


def _stays_here(location: str) -> bool:
    from urllib.parse import urlsplit

    parts = urlsplit(location.strip())
    return not parts.scheme and not parts.netloc and not location.startswith(("//", "/\\", "\\"))


@pytest.mark.parametrize("login", LOGIN_PAGES)
@pytest.mark.parametrize("target", FOREIGN)
def test_login_never_redirects_elsewhere(login, target):
    make_user("walker", password="pw-123456789-long", is_staff=True)
    browser = Client()
    page = browser.get(login, {"next": target})
    hidden = re.findall(r'name="next" value="([^"]*)"', page.content.decode())
    assert all(_stays_here(html.unescape(value)) for value in hidden), hidden
    response = browser.post(login + "?next=" + target, {"username": "walker", "password": "pw-123456789-long",
                                                          "next": target})
    assert response.status_code == 302, response.content
    assert _stays_here(response["Location"]), response["Location"]


@pytest.mark.parametrize("logout", LOGOUT_PAGES)
@pytest.mark.parametrize("target", FOREIGN)
def test_logout_never_redirects_elsewhere(logout, target):
    browser = Client()
    browser.force_login(make_user("walker", is_staff=True))
    response = browser.post(logout + "?next=" + target, {"next": target})
    if response.status_code == 302:
        assert _stays_here(response["Location"]), response["Location"]
    else:
        assert response.status_code == 200
