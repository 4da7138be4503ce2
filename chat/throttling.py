"""Per-key rate limit on the shared cache, with an atomic counter so it holds under concurrency."""

import time

from django.conf import settings
from django.core.cache import cache
from rest_framework.throttling import BaseThrottle

from .models import ApiKey

PERIODS = {"s": 1, "sec": 1, "second": 1, "m": 60, "min": 60, "minute": 60, "h": 3600, "hour": 3600,
           "d": 86400, "day": 86400}


def parse_rate(rate: str) -> tuple[int, int]:
    count, _, period = rate.partition("/")
    return int(count), PERIODS[period.strip().lower()]


class ApiKeyRateThrottle(BaseThrottle):
    """Fixed-window limit per API key (or per user for session auth, per address otherwise)."""

    def allow_request(self, request, view):
        rate = settings.API_RATE_LIMIT
        if not rate:
            return True
        limit, period = parse_rate(rate)
        window = int(time.time() // period)
        self.retry_after = period - (time.time() % period)
        key = f"throttle:{self._identity(request)}:{window}"
        # add() creates the counter atomically; incr() is atomic on Redis and on the local-memory cache.
        if cache.add(key, 1, timeout=period + 1):
            return True
        try:
            count = cache.incr(key)
        except ValueError:  # the window expired between add() and incr()
            cache.add(key, 1, timeout=period + 1)
            return True
        # None: the cache is down (django-redis ignores the error); no limit rather than no service.
        return count is None or count <= limit

    def wait(self):
        return getattr(self, "retry_after", None)

    def _identity(self, request) -> str:
        if isinstance(request.auth, ApiKey):
            return f"key:{request.auth.pk}"
        if request.user and request.user.is_authenticated:
            return f"user:{request.user.pk}"
        return f"addr:{self.get_ident(request)}"
