"""API keys: stored hashed, shown once, revocable, expiring; the command prints a working key."""

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from chat.api.keys import api_key_create, hash_key
from chat.models import ApiKey
from tests.factories import api_client

pytestmark = pytest.mark.django_db


def status_with(raw_key):
    return api_client(raw_key).get("/v1/characters/").status_code


def test_keys_are_stored_hashed(django_user_model):
    _, raw_key = api_key_create(user=django_user_model.objects.create_user("u"), name="k")
    row = ApiKey.objects.get()
    assert raw_key not in (row.key_hash, row.prefix) and row.key_hash == hash_key(raw_key)
    assert raw_key.startswith(row.prefix)
    assert status_with(raw_key) == 200


def test_expired_revoked_and_inactive_user_keys_fail(django_user_model):
    user = django_user_model.objects.create_user("u")
    _, expired = api_key_create(user=user, name="old", expires_at=timezone.now() - timedelta(seconds=1))
    assert status_with(expired) == 401
    key, revoked = api_key_create(user=user, name="revoked")
    key.revoked_at = timezone.now()
    key.save()
    assert status_with(revoked) == 401
    _, valid = api_key_create(user=user, name="valid")
    user.is_active = False
    user.save()
    assert status_with(valid) == 401


def test_create_api_key_command_prints_a_working_key():
    out = StringIO()
    call_command("create_api_key", "--name", "ops script", stdout=out, stderr=StringIO())
    raw_key = out.getvalue().strip()
    assert status_with(raw_key) == 200


def test_create_api_key_without_user_gives_each_key_a_user_of_its_own():
    keys = []
    for name in ("team a", "team b"):
        out = StringIO()
        call_command("create_api_key", "--name", name, stdout=out, stderr=StringIO())
        keys.append(ApiKey.objects.get(key_hash=hash_key(out.getvalue().strip())))
    users = [key.user for key in keys]
    assert users[0] != users[1]
    for key, user in zip(keys, users):
        assert user.username == f"key-{key.prefix}"
        assert not user.has_usable_password() and not user.is_staff and not user.is_superuser


def test_create_api_key_with_user_shares_that_user():
    for name in ("laptop", "phone"):
        call_command("create_api_key", "--name", name, "--user", "ops", stdout=StringIO(), stderr=StringIO())
    assert {key.user.username for key in ApiKey.objects.all()} == {"ops"}


def test_admin_shows_a_new_key_once_and_revokes(admin_client):
    response = admin_client.post("/admin/chat/apikey/add/", {"name": "mobile", "user": admin_client.session["_auth_user_id"]},
                                 follow=True)
    shown = [str(m) for m in response.context["messages"]]
    raw_key = next(word for message in shown for word in message.split() if word.startswith("llms-"))
    assert status_with(raw_key) == 200
    key = ApiKey.objects.get(name="mobile")
    page = admin_client.get(f"/admin/chat/apikey/{key.pk}/change/")
    assert raw_key.encode() not in page.content
    admin_client.post("/admin/chat/apikey/", {"action": "revoke", "_selected_action": [key.pk]})
    assert status_with(raw_key) == 401
