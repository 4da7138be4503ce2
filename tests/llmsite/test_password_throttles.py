"""The password pages are throttled: reset mails per client address and per email address (PASSWORD_RESET_RATE_LIMIT,
llmsite/password_reset_throttle.py), and wrong old passwords on the password-change pages count as failed logins
(llmsite/login_throttle.py), so a stolen session cannot guess the password it would need to take the account."""

import pytest
from django.core import mail
from django.core.cache import cache
from django.test import Client

from tests.factories import make_superuser, make_user

pytestmark = [pytest.mark.django_db, pytest.mark.urls("tests.llmsite.urls_with_password_reset")]

PASSWORD = "Right-password-123"
NEW = {"new_password1": "N3w-pass-xyz-987", "new_password2": "N3w-pass-xyz-987"}


@pytest.fixture(autouse=True)
def fresh_counters(settings):
    settings.PASSWORD_RESET_RATE_LIMIT = "3/hour"
    settings.AXES_FAILURE_LIMIT = 3
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]  # fast: many checks here
    cache.clear()
    yield
    cache.clear()


def reset(email: str, address: str = "10.0.0.1"):
    return Client().post("/accounts/password_reset/", {"email": email}, REMOTE_ADDR=address)


def test_reset_mails_to_one_address_stop_at_the_limit_whoever_asks():
    make_user("victim", email="victim@example.com", password=PASSWORD)
    answers = [reset("victim@example.com", address=f"10.0.0.{n}") for n in range(6)]
    assert [a.status_code for a in answers] == [302, 302, 302, 429, 429, 429]
    assert len(mail.outbox) == 3
    assert "Too many password reset requests" in answers[-1].content.decode()
    assert 0 < int(answers[-1]["Retry-After"]) <= 3600
    assert reset("VICTIM@example.com", address="10.0.0.9").status_code == 429  # the same mailbox
    assert reset("other@example.com", address="10.0.0.9").status_code == 302


def test_one_client_address_is_limited_whatever_the_email_and_nothing_tells_who_has_an_account():
    make_user("victim", email="victim@example.com", password=PASSWORD)
    codes = [reset(f"nobody{n}@example.com").status_code for n in range(3)]
    assert codes == [302, 302, 302] and not mail.outbox
    refused = reset("victim@example.com")
    assert refused.status_code == 429 and not mail.outbox
    assert reset("victim@example.com", address="10.0.0.2").status_code == 302 and len(mail.outbox) == 1


def change_password(client: Client, old: str, path: str = "/accounts/password_change/"):
    return client.post(path, {"old_password": old, **NEW}, REMOTE_ADDR="10.0.0.1")


@pytest.mark.parametrize("path", ["/accounts/password_change/", "/admin/password_change/"])
def test_wrong_old_passwords_lock_the_user_out_and_end_the_session(path):
    user = make_superuser("victim", password=PASSWORD)
    stolen = Client()
    stolen.force_login(user)
    assert [change_password(stolen, f"guess{n}", path).status_code for n in range(2)] == [200, 200]
    assert change_password(stolen, "guess2", path).status_code == 429  # the limit: locked out, logged out
    assert "_auth_user_id" not in stolen.session
    assert change_password(stolen, PASSWORD, path).status_code == 302  # to the login page: no session any more
    user.refresh_from_db()
    assert user.check_password(PASSWORD)
    # The lockout is the login page's too: the right password is refused at that address.
    login = Client().post("/accounts/login/", {"username": "victim", "password": PASSWORD}, REMOTE_ADDR="10.0.0.1")
    assert login.status_code == 429


def test_a_locked_out_user_cannot_change_the_password_even_with_the_right_one():
    user = make_superuser("victim", password=PASSWORD)
    for n in range(3):
        Client().post("/accounts/login/", {"username": "victim", "password": f"wrong{n}"}, REMOTE_ADDR="10.0.0.1")
    session = Client()
    session.force_login(user)
    assert change_password(session, PASSWORD).status_code == 429
    user.refresh_from_db()
    assert user.check_password(PASSWORD) and "_auth_user_id" not in session.session


def test_a_right_old_password_changes_it():
    user = make_user("owner", password=PASSWORD)
    session = Client()
    session.force_login(user)
    assert change_password(session, "typo").status_code == 200
    assert change_password(session, PASSWORD).status_code == 302
    user.refresh_from_db()
    assert user.check_password(NEW["new_password1"])
