"""Fixtures of the characters tests."""

import pytest

from tests.factories import make_superuser


@pytest.fixture
def staff_client(client):
    """Django's test client, logged in as a superuser (the admin pages)."""
    client.force_login(make_superuser())
    return client
