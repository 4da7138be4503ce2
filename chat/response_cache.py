"""Cache of deterministic replies (temperature 0, or an explicit seed) on the shared cache (Redis).

The key hashes the model, the rendered prompt, every sampling parameter, the edit stamps of the
content that composed the prompt and the loaded config.yaml, so an edit is never answered from a
stale entry. Entries are scoped to the caller's owner (chat/tenancy/owners.py: the user the session
or API key acts as, the scope of conversations and jobs too): one owner never receives, or learns
from X-Cache, what another asked. A cache outage reads
as a miss (django-redis ignores its errors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging

from django.conf import settings
from django.core.cache import caches
from django.db import IntegrityError, transaction
from django.db.models import F

from characters.models import ContentRevision

from .engine import Completion
from .metrics import response_cache as response_cache_lookups
from .selectors import user_display_name
from .tenancy.owners import owner_label

logger = logging.getLogger("llmsite.cache")

HIT, MISS, BYPASS = "HIT", "MISS", "BYPASS"


def is_deterministic(params) -> bool:
    return params.temperature <= 0 or params.seed is not None


def content_version(plan) -> str:
    stamps = []
    if plan.character is not None:
        stamps.append(f"c{plan.character.pk}:{plan.character.updated_at.isoformat()}")
    stamps.extend(f"s{s.pk}:{s.updated_at.isoformat()}" for s in plan.prompt.scenarios)
    return "|".join(stamps)


def caller_scope(user) -> str:
    """Whose entries these are: replies are shared only between requests of one owner (any of their keys)."""
    return owner_label(user)


_fingerprinted: tuple[object, str] | None = None  # (config object, its hash): config.yaml loads once per process


def config_fingerprint() -> str:
    """A hash of the loaded config.yaml (models, system prompt, sampling defaults): a change is a new key."""
    global _fingerprinted
    config = settings.LLMSITE
    if _fingerprinted is None or _fingerprinted[0] is not config:
        material = dataclasses.asdict(config) if dataclasses.is_dataclass(config) else repr(config)
        digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]
        _fingerprinted = (config, digest)
    return _fingerprinted[1]


def cache_key(plan) -> str | None:
    if not settings.RESPONSE_CACHE_ENABLED or not plan.cache_allowed or not is_deterministic(plan.params):
        return None
    if plan.params.logprobs is not None:  # entries do not keep logprobs: such requests always generate
        return None
    material = json.dumps({"model": plan.model_name, "prompt": plan.prompt.text,
                           # Client text that mimics the template's markup is another prompt (docs/PROMPTS.md).
                           "markup": getattr(plan.prompt.text, "markup_offsets", None),
                           "params": dataclasses.asdict(plan.params), "content": content_version(plan),
                           "config": config_fingerprint(), "scope": caller_scope(plan.user),
                           "end_user": plan.end_user},  # one end user's replies are not served to another
                          sort_keys=True, default=str)
    return "reply:" + hashlib.sha256(material.encode()).hexdigest()


def _replies():
    """Cached replies' own cache: any client can add entries, so they must not crowd out counters and leases."""
    return caches[settings.REPLY_CACHE]


def cached_completion(plan) -> tuple[Completion | None, str]:
    """(the cached reply for this plan or None, HIT / MISS / BYPASS)."""
    key = cache_key(plan)
    stored = _replies().get(key) if key is not None else None
    status = BYPASS if key is None else MISS if stored is None else HIT
    response_cache_lookups.labels(status.lower()).inc()
    return (Completion(**stored) if stored is not None else None), status


def remember_completion(plan, completion: Completion) -> None:
    key = cache_key(plan)
    if key is None or completion.finish_reason not in ("stop", "length"):
        return
    _replies().set(key, dataclasses.asdict(completion), timeout=settings.RESPONSE_CACHE_TTL)
    if plan.request_key:
        _replies().set(plan.request_key, {"completion": dataclasses.asdict(completion), "model": plan.model_name,
                                     "scenarios": plan.prompt.scenarios_used}, timeout=settings.RESPONSE_CACHE_TTL)


# --- Fast path: identical stateless requests, answered before composing the prompt -----------------

REQUEST_FIELDS_IGNORED = ("stream", "stream_options", "store", "background")


def request_cache_key(data: dict, *, allowed: bool, user=None) -> str | None:
    """A key for requests whose reply depends only on the request, the content and the config:
    deterministic, no stored conversation to read or write. None when the request does not qualify.

    `user` scopes the entry to one caller. The request's `user` field (an end-user id) stays in the key:
    one end user's replies are not served to another."""
    deterministic = data.get("temperature") == 0 or data.get("seed") is not None
    stateless = not data.get("conversation") and (not (data.get("character") or data.get("character_id"))
                                                  or data.get("store") is False)
    if not (settings.RESPONSE_CACHE_ENABLED and allowed and deterministic and stateless) or data.get("background"):
        return None
    if data.get("logprobs"):  # entries do not keep logprobs (see cache_key)
        return None
    fields = {key: value for key, value in data.items() if key not in REQUEST_FIELDS_IGNORED}
    material = json.dumps({"request": fields, "content": content_revision(), "config": config_fingerprint(),
                           "scope": caller_scope(user),
                           # {{user}} in a prompt is the caller's display name: renamed, another prompt.
                           "name": user_display_name(user)}, sort_keys=True, default=str)
    return "request:" + hashlib.sha256(material.encode()).hexdigest()


def cached_request(key: str | None) -> dict | None:
    stored = _replies().get(key) if key else None
    if stored is not None:
        response_cache_lookups.labels("hit").inc()
    return stored


def content_revision() -> int:
    """The database's count of content edits (characters/models.py ContentRevision)."""
    return ContentRevision.objects.filter(pk=1).values_list("number", flat=True).first() or 0


def content_changed(**kwargs) -> None:
    """Any edit of a character, scenario or system prompt retires every request-level entry at once.

    Connected to post_save/post_delete (chat/apps.py), so it runs for the admin, the API and
    management commands alike, in the writer's transaction: the new number is visible exactly
    when the new content is. Kept in the database so that every process, whatever its cache
    backend, sees it.
    """
    if ContentRevision.objects.filter(pk=1).update(number=F("number") + 1):
        return
    try:
        with transaction.atomic():
            ContentRevision.objects.create(pk=1, number=1)
    except IntegrityError:  # created meanwhile by another writer
        ContentRevision.objects.filter(pk=1).update(number=F("number") + 1)


class ReplayedGeneration:
    """A cached reply served through the same streaming path as a live generation."""

    def __init__(self, completion: Completion):
        self.id = "cached"
        self.result = completion

    async def __aiter__(self):
        yield self.result.text

    def keep_alive_every(self, seconds) -> None:
        pass  # the whole text comes at once

    def deliver_every(self, seconds) -> None:
        pass

    def __iter__(self):
        yield self.result.text

    def cancel(self) -> None:
        pass
