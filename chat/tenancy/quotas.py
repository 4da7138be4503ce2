"""Per-key quotas: concurrent generations, and tokens per minute and per UTC day, on the shared cache.

Limits come from the key (ApiKey.max_concurrent, tokens_per_minute, tokens_per_day); an empty field
takes the setting (API_KEY_MAX_CONCURRENT, API_KEY_TOKENS_PER_MINUTE, API_KEY_TOKENS_PER_DAY); 0 is no
limit. A browser session (no key) gets the settings' limits, counted per user. A generation is
admitted when its caller has not spent this minute's or this day's tokens and has a free slot; it
holds the slot until it ends (released in a finally, chat/tenancy/metering.py) and is charged its
actual prompt + completion tokens then, so one generation may overshoot a budget and the next is
refused until the window ends. Counters are atomic (add + incr, as chat/api/throttling.py); a cache
outage admits everything (no quota rather than no service), a flushed cache forgets what was spent.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass

from django.conf import settings
from django.core.cache import cache

from chat.errors import ApiError

from .owners import Tenant

# A slot whose release never ran (its process was killed mid-generation) frees itself after this long.
SLOT_TTL = 3600
# A caller at its concurrency limit may retry as soon as one of its generations ends: soon.
CONCURRENCY_RETRY_AFTER = 1
WINDOWS = (("minute", 60), ("day", 86400))


class QuotaExceeded(ApiError):
    status = 429
    type = "rate_limit_error"
    code = "quota_exceeded"


@dataclass(frozen=True)
class Limits:
    """A caller's limits; 0 means none."""

    max_concurrent: int = 0
    tokens_per_minute: int = 0
    tokens_per_day: int = 0

    def tokens_per(self, window: str) -> int:
        return self.tokens_per_minute if window == "minute" else self.tokens_per_day


def limits_for(api_key) -> Limits:
    """The key's own limits where set, else the settings' defaults."""
    def pick(field: str, setting: str) -> int:
        own = getattr(api_key, field, None) if api_key is not None else None
        return own if own is not None else getattr(settings, setting)

    return Limits(max_concurrent=pick("max_concurrent", "API_KEY_MAX_CONCURRENT"),
                  tokens_per_minute=pick("tokens_per_minute", "API_KEY_TOKENS_PER_MINUTE"),
                  tokens_per_day=pick("tokens_per_day", "API_KEY_TOKENS_PER_DAY"))


def _tokens_key(identity: str, window: str, period: int, now: float) -> str:
    return f"quota:tokens:{identity}:{window}:{int(now // period)}"


def tokens_spent(identity: str, window: str, *, now: float | None = None) -> int:
    now = time.time() if now is None else now
    period = dict(WINDOWS)[window]
    return cache.get(_tokens_key(identity, window, period, now)) or 0


def tokens_check(identity: str, limits: Limits, *, now: float | None = None) -> None:
    """Raise QuotaExceeded when a token budget of the current window is spent."""
    now = time.time() if now is None else now
    for window, period in WINDOWS:
        limit = limits.tokens_per(window)
        if limit and tokens_spent(identity, window, now=now) >= limit:
            raise QuotaExceeded(f"Token quota reached for this API key: {limit} tokens per {window}; retry later.",
                                code="token_quota_exceeded", retry_after=math.ceil(period - now % period))


def tokens_charge(identity: str, tokens: int, *, now: float | None = None) -> None:
    """Add a finished generation's tokens to the current minute and day (whether limited or not)."""
    if tokens <= 0:
        return
    now = time.time() if now is None else now
    for window, period in WINDOWS:
        key = _tokens_key(identity, window, period, now)
        if cache.add(key, tokens, timeout=period + 60):
            continue
        try:
            cache.incr(key, tokens)
        except ValueError:  # the window's counter expired between add() and incr()
            cache.add(key, tokens, timeout=period + 60)


class Slot:
    """One held concurrency slot; release() is idempotent and safe from any thread."""

    def __init__(self, key: str | None):
        self.key = key
        self._lock = threading.Lock()
        self._held = key is not None

    def release(self) -> None:
        with self._lock:
            if not self._held:
                return
            self._held = False
        try:
            left = cache.decr(self.key)
        except ValueError:  # the counter expired (SLOT_TTL): nothing to give back
            return
        if left is not None and left < 0:  # it expired and was recreated meanwhile: never below zero
            cache.incr(self.key, -left)


NO_SLOT = Slot(None)


def concurrency_key(identity: str) -> str:
    return f"quota:active:{identity}"


def slot_acquire(identity: str, limit: int) -> Slot:
    """Take one of the caller's `limit` slots, or raise QuotaExceeded (no limit: nothing is counted)."""
    if not limit:
        return NO_SLOT
    key = concurrency_key(identity)
    if cache.add(key, 1, timeout=SLOT_TTL):
        return Slot(key)
    try:
        count = cache.incr(key)
    except ValueError:  # expired between add() and incr()
        cache.add(key, 1, timeout=SLOT_TTL)
        return Slot(key)
    if count is None:  # the cache is down (django-redis ignores its errors)
        return NO_SLOT
    slot = Slot(key)
    if count > limit:
        slot.release()
        raise QuotaExceeded(f"This API key already has {limit} generation(s) running; retry when one ends.",
                            code="concurrency_limit_exceeded", retry_after=CONCURRENCY_RETRY_AFTER)
    return slot


def quota_admit(tenant: Tenant, *, now: float | None = None) -> Slot:
    """Admit one generation of `tenant` (raises QuotaExceeded); the caller releases the slot when it ends."""
    limits = limits_for(tenant.api_key)
    tokens_check(tenant.quota_identity, limits, now=now)
    return slot_acquire(tenant.quota_identity, limits.max_concurrent)


def quota_check_tokens(tenant: Tenant) -> None:
    """The token budgets alone: for work that will run later (a background job)."""
    tokens_check(tenant.quota_identity, limits_for(tenant.api_key))
