"""Issuing and checking API keys: random secrets, stored only as SHA-256 hashes.

A key acts as a user (docs/API.md, "Ownership"): everything it creates belongs to that user. A key
issued without a user gets a user of its own, so two keys share nothing unless they are given the
same user on purpose.
"""

from __future__ import annotations

import hashlib
import logging
import secrets

from django.contrib.auth import get_user_model
from django.db import DatabaseError, transaction
from django.db.models import Q
from django.utils import timezone

from chat.models import ApiKey

logger = logging.getLogger("llmsite.api")

KEY_PREFIX = "llms-"


def hash_key(raw_key: str) -> str:
    # Keys are 256-bit random secrets, so a plain SHA-256 is enough (no salt/stretching needed).
    return hashlib.sha256(raw_key.encode()).hexdigest()


def api_key_issue(*, api_key: ApiKey) -> str:
    """Give an unsaved key row a fresh secret; returns the raw key, which is never stored."""
    raw_key = KEY_PREFIX + secrets.token_urlsafe(32)
    api_key.prefix = raw_key[:12]
    api_key.key_hash = hash_key(raw_key)
    return raw_key


def api_key_create(*, user, name: str, expires_at=None) -> tuple[ApiKey, str]:
    """Create a key; returns the row and the raw key, which cannot be shown again."""
    api_key = ApiKey(user=user, name=name, expires_at=expires_at)
    raw_key = api_key_issue(api_key=api_key)
    api_key.save()
    return api_key, raw_key


def own_user_name() -> str:
    """A new key's own user's name: random, never part of the key (other users see it: a group's participants,
    a message's author, an invitation's sender)."""
    users = get_user_model().objects
    while True:
        name = f"key-{secrets.token_hex(6)}"
        if not users.filter(username=name).exists():
            return name


def api_key_own_user_create(*, api_key: ApiKey) -> None:
    """Give an issued, unsaved key a new user of its own (a random name, no usable password, not staff)."""
    user = get_user_model()(username=own_user_name(), is_staff=False, is_superuser=False)
    user.set_unusable_password()
    user.save()
    api_key.user = user


def api_key_create_with_own_user(*, name: str, expires_at=None) -> tuple[ApiKey, str]:
    """A key acting as a new user of its own; returns the row and the raw key, which cannot be shown again."""
    api_key = ApiKey(name=name, expires_at=expires_at)
    raw_key = api_key_issue(api_key=api_key)
    with transaction.atomic():
        api_key_own_user_create(api_key=api_key)
        api_key.save()
    return api_key, raw_key


def api_keys_valid():
    """Keys that may act now: not revoked, not expired, and acting as an active user."""
    return ApiKey.objects.filter(Q(expires_at__isnull=True) | Q(expires_at__gt=timezone.now()),
                                 revoked_at__isnull=True, user__is_active=True)


def api_key_find_valid(*, raw_key: str) -> ApiKey | None:
    now = timezone.now()
    api_key = api_keys_valid().select_related("user").filter(key_hash=hash_key(raw_key)).first()
    if api_key is not None and (api_key.last_used_at is None or (now - api_key.last_used_at).total_seconds() > 60):
        # Touch at most once a minute: a write per request would serialise SQLite under load. The touch
        # is bookkeeping: a busy database must not fail the request it belongs to.
        try:
            with transaction.atomic():
                ApiKey.objects.filter(pk=api_key.pk).update(last_used_at=now)
        except DatabaseError:
            logger.debug("could not record the use of key %s now", api_key.prefix)
    return api_key


def api_keys_revoke(*, queryset) -> int:
    return queryset.filter(revoked_at__isnull=True).update(revoked_at=timezone.now())
