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
        assert user.username.startswith("key-") and key.prefix[len("llms-"):] not in user.username
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


def test_users_named_after_their_keys_are_renamed_by_the_migration(transactional_db):
    """`key-<prefix>` held seven characters of the secret, shown to other users (participants, authors)."""
    from django.db import connection
    from django.db.migrations.executor import MigrationExecutor

    before, after = ("chat", "0010_message_ids_count_nothing"), ("chat", "0011_key_users_named_apart_from_their_keys")
    executor = MigrationExecutor(connection)
    executor.migrate([before])
    try:
        old = executor.loader.project_state([before]).apps
        own = old.get_model("auth", "User").objects.create(username="key-llms-Abc1234")
        chosen = old.get_model("auth", "User").objects.create(username="key-llms-Zzz9999")  # not its key's prefix
        for user, prefix in ((own, "llms-Abc1234"), (chosen, "llms-Qqq0000")):
            old.get_model("chat", "ApiKey").objects.create(user=user, name="k", prefix=prefix, key_hash=prefix * 4)
        executor = MigrationExecutor(connection)
        executor.migrate([after])
        users = executor.loader.project_state([after]).apps.get_model("auth", "User").objects
        renamed = users.get(pk=own.pk).username
        assert renamed.startswith("key-") and "Abc1234" not in renamed
        assert users.get(pk=chosen.pk).username == "key-llms-Zzz9999"
    finally:  # the tests after this one need the whole schema
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
