"""Per-key rate limit on the shared cache, with an atomic counter so it holds under concurrency.

One counter per identity and window, shared by HTTP requests (DRF throttle) and WebSocket
messages (chat/api/consumers.py), so a key gets the same budget whichever way it talks.
"""

import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import BaseThrottle

from chat.models import ApiKey

PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
           "d": 86400, "day": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    count, _, period = rate.partition("/")
    return int(count), PERIODS[period.strip().lower()]


def rate_limit_wait(identity: str, *, rate: str | None = None) -> float | None:
    """Count one request of `identity` against `rate` (API_RATE_LIMIT unless given; empty: no limit); None when
    allowed, else the seconds until the window ends."""
    rate = settings.API_RATE_LIMIT if rate is None else rate
    if not rate:
        return None
    limit, period = parse_rate(rate)
    window = int(time.time() // period)
    retry_after = period - (time.time() % period)
    key = f"throttle:{identity}:{window}"
    # add() creates the counter atomically; incr() is atomic on Redis and on the local-memory cache.
    if cache.add(key, 1, timeout=period + 1):
        return None
    try:
        count = cache.incr(key)
    except ValueError:  # the window expired between add() and incr()
        cache.add(key, 1, timeout=period + 1)
        return None
    # None: the cache is down (django-redis ignores the error); no limit rather than no service.
    return None if count is None or count <= limit else retry_after


def identity_of(*, api_key: ApiKey | None, user, address: str | None) -> str:
    """Whose budget a request spends: the API key's, else the logged-in user's, else the address's."""
    if isinstance(api_key, ApiKey):
        return f"key:{api_key.pk}"
    if user is not None and user.is_authenticated:
        return f"user:{user.pk}"
    return f"addr:{address}"


class ApiKeyRateThrottle(BaseThrottle):
    """Fixed-window limit per API key (or per user for session auth, per address otherwise)."""

    def allow_request(self, request, view):
        self.retry_after = rate_limit_wait(identity_of(api_key=request.auth, user=request.user,
                                                       address=self.get_ident(request)))
        return self.retry_after is None

    def wait(self):
        return getattr(self, "retry_after", None)
