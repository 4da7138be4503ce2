"""Cache of deterministic replies (temperature 0, or an explicit seed) on the shared cache (Redis).

The key hashes the model, the rendered prompt, every sampling parameter and the edit stamps of
the content that composed the prompt, so an admin edit is never answered from a stale entry. A
cache outage reads as a miss (django-redis ignores its errors).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time

from django.conf import settings
from django.core.cache import cache

from chat.engine import Completion

from .metrics import response_cache as response_cache_lookups

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


def cache_key(plan) -> str | None:
    if not settings.RESPONSE_CACHE_ENABLED or not plan.cache_allowed or not is_deterministic(plan.params):
        return None
    material = json.dumps({"model": plan.model_name, "prompt": plan.prompt.text,
                           "params": dataclasses.asdict(plan.params), "content": content_version(plan)},
                          sort_keys=True, default=str)
    return "reply:" + hashlib.sha256(material.encode()).hexdigest()


def cached_completion(plan) -> Completion | None:
    """The cached reply for this plan, or None; sets plan.cache_status."""
    key = cache_key(plan)
    stored = cache.get(key) if key is not None else None
    plan.cache_status = BYPASS if key is None else MISS if stored is None else HIT
    response_cache_lookups.labels(plan.cache_status.lower()).inc()
    if stored is None:
        return None
    plan.completion = Completion(**stored)
    return plan.completion


def remember_completion(plan, completion: Completion) -> None:
    key = cache_key(plan)
    if key is None or completion.finish_reason not in ("stop", "length"):
        return
    cache.set(key, dataclasses.asdict(completion), timeout=settings.RESPONSE_CACHE_TTL)
    if plan.request_key:
        from .services import scenarios_used

        cache.set(plan.request_key, {"completion": dataclasses.asdict(completion), "model": plan.model_name,
                                     "scenarios": scenarios_used(plan)}, timeout=settings.RESPONSE_CACHE_TTL)


# --- Fast path: identical stateless requests, answered before composing the prompt -----------------

CONTENT_VERSION_KEY = "content-version"
REQUEST_FIELDS_IGNORED = ("stream", "stream_options", "user", "store", "background")


def request_cache_key(data: dict, *, allowed: bool) -> str | None:
    """A key for requests whose reply depends only on the request and the content: deterministic,
    no stored conversation to read or write. None when the request does not qualify."""
    deterministic = data.get("temperature") == 0 or data.get("seed") is not None
    stateless = not data.get("conversation") and (not (data.get("character") or data.get("character_id"))
                                                  or data.get("store") is False)
    if not (settings.RESPONSE_CACHE_ENABLED and allowed and deterministic and stateless) or data.get("background"):
        return None
    version = cache.get(CONTENT_VERSION_KEY)
    if version is None:  # unknown (first use, or the cache restarted): start a fresh version
        version = time.time_ns()
        cache.add(CONTENT_VERSION_KEY, version, timeout=None)
    fields = {key: value for key, value in data.items() if key not in REQUEST_FIELDS_IGNORED}
    material = json.dumps({"request": fields, "content": version, "default_model": settings.LLMSITE.default_model},
                          sort_keys=True, default=str)
    return "request:" + hashlib.sha256(material.encode()).hexdigest()


def cached_request(key: str | None) -> dict | None:
    stored = cache.get(key) if key else None
    if stored is not None:
        response_cache_lookups.labels("hit").inc()
    return stored


def content_changed(**kwargs) -> None:
    """Any edit of a character, scenario or system prompt retires every request-level entry at once."""
    cache.set(CONTENT_VERSION_KEY, time.time_ns(), timeout=None)


class ReplayedGeneration:
    """A cached reply served through the same streaming path as a live generation."""

    def __init__(self, completion: Completion):
        self.id = "cached"
        self.result = completion

    async def __aiter__(self):
        yield self.result.text

    def cancel(self) -> None:
        pass
