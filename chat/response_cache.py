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
    if key is not None and completion.finish_reason in ("stop", "length"):
        cache.set(key, dataclasses.asdict(completion), timeout=settings.RESPONSE_CACHE_TTL)


class ReplayedGeneration:
    """A cached reply served through the same streaming path as a live generation."""

    def __init__(self, completion: Completion):
        self.id = "cached"
        self.result = completion

    async def __aiter__(self):
        yield self.result.text

    def cancel(self) -> None:
        pass
