"""The embedded default's cache: Django's LocMemCache, which drops expired entries before culling live ones.

LocMemCache removes an expired entry only when it is read, and when full it culls a third of its entries, least
recently used first, expired or not. Rate-limit and quota windows leave an expired counter behind every minute, so a
full cache culled live entries that must stay (conversation leases, a job's quota hold, a day's token counter)
while holding dead ones.
"""

from __future__ import annotations

import time

from django.core.cache.backends.locmem import LocMemCache


class SweepingLocMemCache(LocMemCache):
    def _cull(self):
        now = time.time()
        for key in [key for key, expires in self._expire_info.items() if expires is not None and expires <= now]:
            self._delete(key)
        if len(self._cache) >= self._max_entries:  # still full of live entries: Django's own culling
            super()._cull()
