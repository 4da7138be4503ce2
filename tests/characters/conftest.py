"""Fixtures of the characters tests."""

import pytest

from tests.factories import make_superuser, make_user


@pytest.fixture
def staff_client(client):
    """Django's test client, logged in as a superuser (the admin pages)."""
    client.force_login(make_superuser())
    return client


@pytest.fixture
def editor_client(client):
    """Django's test client, logged in as a staff member (not a superuser) of the "Content editors" group."""
    from django.contrib.auth.models import Group

    editor = make_user("content-editor", is_staff=True)
    editor.groups.add(Group.objects.get(name="Content editors"))
    client.force_login(editor)
    client.user = editor
    return client
