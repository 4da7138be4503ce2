"""Login throttling on the three login pages (django-axes, llmsite/settings.py): a username failing at one
address is locked out there with a 429, without locking out other users or the same user elsewhere; an
address failing for many usernames (password spraying) is locked out after a higher limit."""

import pytest
from django.test import AsyncClient, Client

from tests.factories import make_superuser, make_user

pytestmark = pytest.mark.django_db

LOGIN_PAGES = ["/accounts/login/", "/admin/login/", "/api-auth/login/"]
PASSWORD = "pw-123456789-long"


def attempt(page: str, username: str, password: str, address: str):
    return Client().post(page, {"username": username, "password": password, "next": "/"}, REMOTE_ADDR=address)


def logged_in(response) -> bool:
    return response.status_code == 302


@pytest.fixture
def users(settings):
    settings.AXES_FAILURE_LIMIT = 3
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast: many logins here
    # /admin/login/ lets only staff in: everyone is staff here so that one rule holds on every page.
    return {name: make_user(name, password=PASSWORD, is_staff=True) for name in ("alice", "bob")}


@pytest.mark.parametrize("page", LOGIN_PAGES)
def test_repeated_failures_lock_out_that_username_at_that_address(users, page):
    for _ in range(2):
        assert attempt(page, "alice", "wrong", "10.0.0.1").status_code == 200  # the form again, with an error
    locked = attempt(page, "alice", "wrong", "10.0.0.1")
    assert locked.status_code == 429
    # Locked out: even the right password is refused now.
    assert attempt(page, "alice", PASSWORD, "10.0.0.1").status_code == 429

    # Nobody else is: another user at that address, the same user at another address.
    assert logged_in(attempt(page, "bob", PASSWORD, "10.0.0.1"))
    assert logged_in(attempt(page, "alice", PASSWORD, "10.0.0.2"))


def test_a_lockout_on_one_page_holds_on_the_others(users):
    for _ in range(3):
        attempt("/accounts/login/", "alice", "wrong", "10.0.0.1")
    for page in LOGIN_PAGES:
        assert attempt(page, "alice", PASSWORD, "10.0.0.1").status_code == 429


def test_a_success_before_the_limit_resets_the_count(users):
    for _ in range(2):
        attempt("/accounts/login/", "alice", "wrong", "10.0.0.1")
    assert logged_in(attempt("/accounts/login/", "alice", PASSWORD, "10.0.0.1"))
    for _ in range(2):
        assert attempt("/accounts/login/", "alice", "wrong", "10.0.0.1").status_code == 200


def test_logins_by_code_are_not_throttled(users):
    """The test client's login() (no request: no client address) keeps working, as the suite relies on."""
    make_superuser("root", password=PASSWORD)
    for _ in range(5):
        assert not Client().login(username="root", password="wrong")
    assert Client().login(username="root", password=PASSWORD)


@pytest.mark.django_db(transaction=True)
async def test_the_lockout_holds_under_asgi(users):
    """daphne serves the site through Django's ASGI handler, where the middleware runs asynchronously."""
    client = AsyncClient(REMOTE_ADDR="10.0.0.9")
    for _ in range(3):
        response = await client.post("/accounts/login/", {"username": "alice", "password": "wrong"})
    assert response.status_code == 429
    assert (await client.post("/accounts/login/", {"username": "alice", "password": PASSWORD})).status_code == 429
    assert (await client.post("/accounts/login/", {"username": "bob", "password": PASSWORD})).status_code == 302


@pytest.mark.parametrize("page", LOGIN_PAGES)
def test_password_spraying_locks_out_the_address_after_its_own_higher_limit(users, settings, page):
    settings.LOGIN_ADDRESS_FAILURE_LIMIT = 5  # the per-username limit is 3
    for name in ("carol", "dave", "erin", "frank"):  # one try each: no username reaches its limit
        assert attempt(page, name, "wrong", "10.0.0.1").status_code == 200
    assert logged_in(attempt(page, "alice", PASSWORD, "10.0.0.1"))  # 4 < 5: the address may still log in
    # The success cleared alice's failures only: the address's count goes on, and the fifth failure locks it.
    assert attempt(page, "grace", "wrong", "10.0.0.1").status_code == 429
    assert attempt(page, "bob", PASSWORD, "10.0.0.1").status_code == 429  # every username at that address
    assert logged_in(attempt(page, "bob", PASSWORD, "10.0.0.2"))  # another address is not
