"""Per-key quotas: concurrent generations, and tokens per minute and per UTC day, on the shared cache.

Limits come from the key (ApiKey.max_concurrent, tokens_per_minute, tokens_per_day); an empty field
takes the setting (API_KEY_MAX_CONCURRENT, API_KEY_TOKENS_PER_MINUTE, API_KEY_TOKENS_PER_DAY); 0 is no
limit (the default). A browser session (no key) gets the settings' limits, counted per user.

A request is admitted with a `Hold`: one concurrency slot per sequence it generates (`n` choices take
n), and its most tokens (prompt + max_tokens × n) reserved in this minute's and this day's budget.
Admitted only when the reservation fits what is left of both budgets (or nothing was spent in the
window: a request larger than the whole budget runs alone), so concurrent requests cannot overshoot
a budget by more than one request's reservation. When a generation ends its Hold is settled: the
slots are given back and the reservation replaced by the tokens actually used (chat/tenancy/metering.py).
A background job counts against max_concurrent from its submission until it ends (its Job row, while
queued or running with a live heartbeat); its tokens are reserved when it is submitted and settled by
the worker's generation, or given back when it ends without one.

Counters are atomic (add + incr, as chat/api/throttling.py); a cache outage admits everything (no
quota rather than no service), a flushed cache forgets what was spent.
"""

from __future__ import annotations

import math
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.db.models import Q
from django.utils import timezone

from chat.errors import ApiError
from chat.models import Job

from .owners import Tenant

# A slot whose release never ran (its process was killed mid-generation) frees itself after this long: the
# counter expires SLOT_TTL after the caller's last take or release, never while it keeps generating.
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


# --- Counters on the shared cache -------------------------------------------------------------------


def _counter_add(key: str, delta: int, timeout: int) -> int | None:
    """Add `delta` to a counter, creating it when it is missing and delta > 0; its new value (None: cache down)."""
    if delta > 0 and cache.add(key, delta, timeout=timeout):
        return delta
    try:
        return cache.incr(key, delta)
    except ValueError:  # expired meanwhile: a window that ended, or a slot counter past SLOT_TTL
        if delta > 0 and cache.add(key, delta, timeout=timeout):
            return delta
        return None


def _tokens_key(identity: str, window: str, period: int, now: float) -> str:
    return f"quota:tokens:{identity}:{window}:{int(now // period)}"


def tokens_spent(identity: str, window: str, *, now: float | None = None) -> int:
    """Tokens charged and reserved in the current window."""
    now = time.time() if now is None else now
    period = dict(WINDOWS)[window]
    return cache.get(_tokens_key(identity, window, period, now)) or 0


def _fits(before: int, tokens: int, limit: int) -> bool:
    """Whether `tokens` more fit a budget with `before` spent: within it, or alone in an empty window."""
    return not limit or before == 0 or before + tokens <= limit


def _refused(limit: int, window: str, period: int, now: float) -> QuotaExceeded:
    return QuotaExceeded(f"Token quota reached for this API key: {limit} tokens per {window}; retry later.",
                         code="token_quota_exceeded", retry_after=math.ceil(period - now % period))


def tokens_check(identity: str, limits: Limits, *, tokens: int = 0, now: float | None = None) -> None:
    """Raise QuotaExceeded when `tokens` more do not fit a budget of the current window (nothing is reserved)."""
    now = time.time() if now is None else now
    for window, period in WINDOWS:
        limit = limits.tokens_per(window)
        if not _fits(tokens_spent(identity, window, now=now), tokens, limit):
            raise _refused(limit, window, period, now)


def tokens_reserve(identity: str, limits: Limits, tokens: int, *, enforce: bool = True,
                   now: float | None = None) -> tuple[str, ...]:
    """Reserve `tokens` in the current minute and day (QuotaExceeded when they do not fit and `enforce`);
    the keys of the window counters that hold the reservation."""
    now = time.time() if now is None else now
    held: list[str] = []
    for window, period in WINDOWS:
        key = _tokens_key(identity, window, period, now)
        after = _counter_add(key, tokens, period + 60)
        held.append(key)
        limit = limits.tokens_per(window)
        if enforce and after is not None and not _fits(after - tokens, tokens, limit):
            for counted in held:
                _counter_add(counted, -tokens, period + 60)
            raise _refused(limit, window, period, now)
    return tuple(held)


def tokens_charge(identity: str, tokens: int, *, now: float | None = None) -> None:
    """Add tokens used outside any reservation to the current minute and day (whether limited or not)."""
    if tokens > 0:
        tokens_reserve(identity, Limits(), tokens, enforce=False, now=now)


# --- Concurrency ------------------------------------------------------------------------------------


def concurrency_key(identity: str) -> str:
    return f"quota:active:{identity}"


def jobs_in_progress(tenant: Tenant) -> int:
    """The slots the caller's background jobs hold (n each): queued, or running with a live heartbeat."""
    if getattr(tenant.user, "pk", None) is None:
        return 0
    now = timezone.now()
    mine = Q(api_key=tenant.api_key) if tenant.api_key is not None else Q(owner=tenant.user, api_key=None)
    alive = Q(status=Job.Status.QUEUED) | Q(status=Job.Status.RUNNING,
                                             heartbeat_at__gt=now - timedelta(seconds=settings.JOB_HEARTBEAT_TIMEOUT))
    choices = Job.objects.filter(mine, alive, expires_at__gt=now).values_list("request__n", flat=True)
    return sum(n if isinstance(n, int) and n > 0 else 1 for n in choices)


def quota_precheck(tenant: Tenant, *, slots: int = 1) -> None:
    """Raise QuotaExceeded when the caller is at its concurrency limit or has spent a token budget already: before
    its prompt is composed (scenario matching and tokenizing cost CPU that a refused request should not). Nothing
    is taken: quota_admit decides, later."""
    limits = limits_for(tenant.api_key)
    if limits.max_concurrent:
        running = cache.get(concurrency_key(tenant.quota_identity)) or 0
        if slots > limits.max_concurrent or running + slots > limits.max_concurrent:
            raise _at_concurrency_limit(limits.max_concurrent, slots)
    now = time.time()
    for window, period in WINDOWS:
        limit = limits.tokens_per(window)
        if limit and tokens_spent(tenant.quota_identity, window, now=now) >= limit:
            raise _refused(limit, window, period, now)


def _at_concurrency_limit(limit: int, slots: int) -> QuotaExceeded:
    return QuotaExceeded(f"This API key already has {limit} generation(s) running or queued"
                         f"{f' (this request needs {slots})' if slots > 1 else ''}; retry when one ends.",
                         code="concurrency_limit_exceeded", retry_after=CONCURRENCY_RETRY_AFTER)


def _slots_take(tenant: Tenant, limit: int, slots: int) -> str | None:
    """Count `slots` more generations of the caller (its running ones and its jobs), or raise QuotaExceeded;
    the counter's key (None: no limit, or the cache is down)."""
    if not limit:
        return None
    key = concurrency_key(tenant.quota_identity)
    count = _counter_add(key, slots, SLOT_TTL)
    if count is None:
        return None
    cache.touch(key, SLOT_TTL)  # its expiry was set when it was created: a busy caller's count must not lapse
    if slots > limit or count + jobs_in_progress(tenant) > limit:
        _slots_give_back(key, slots)
        raise _at_concurrency_limit(limit, slots)
    return key


def _slots_give_back(key: str | None, slots: int) -> None:
    if key is None or not slots:
        return
    left = _counter_add(key, -slots, SLOT_TTL)
    if left is not None and left < 0:  # it expired and was recreated meanwhile: never below zero
        cache.incr(key, -left)
    if left:
        cache.touch(key, SLOT_TTL)


class Hold:
    """What one admitted request holds until it ends: `slots` of its caller's concurrency and `tokens`
    reserved in the windows it was admitted in. settle() is idempotent and safe from any thread."""

    def __init__(self, *, slot_key: str | None = None, slots: int = 0, tokens: int = 0,
                 token_keys: tuple[str, ...] = ()):
        self.slot_key, self.slots, self.tokens, self.token_keys = slot_key, slots, tokens, token_keys
        self._lock = threading.Lock()
        self._settled = False

    def split(self, *, slots: int, tokens: int) -> "Hold":
        """Hand part of this hold to another sequence of the same request, which settles it on its own."""
        with self._lock:
            slots, tokens = min(slots, self.slots), min(tokens, self.tokens)
            self.slots -= slots
            self.tokens -= tokens
        return Hold(slot_key=self.slot_key, slots=slots, tokens=tokens, token_keys=self.token_keys)

    def settle(self, used_tokens: int = 0) -> None:
        """Give the slots back and replace the reservation by the tokens used (0: given back whole)."""
        with self._lock:
            if self._settled:
                return
            self._settled = True
        try:
            _slots_give_back(self.slot_key, self.slots)
        finally:
            for key, (_, period) in zip(self.token_keys, WINDOWS):
                _counter_add(key, used_tokens - self.tokens, period + 60)


def quota_admit(tenant: Tenant, *, slots: int = 1, tokens: int = 0, now: float | None = None) -> Hold:
    """Admit a request of `tenant` generating `slots` sequences and at most `tokens` (raises QuotaExceeded)."""
    limits = limits_for(tenant.api_key)
    slot_key = _slots_take(tenant, limits.max_concurrent, slots)
    try:
        token_keys = tokens_reserve(tenant.quota_identity, limits, tokens, now=now)
    except BaseException:
        _slots_give_back(slot_key, slots)
        raise
    return Hold(slot_key=slot_key, slots=slots if slot_key else 0, tokens=tokens, token_keys=token_keys)


def quota_count(tenant: Tenant, *, tokens: int = 0) -> Hold:
    """A hold that only counts (work admitted earlier whose reservation is gone): its tokens reserved, never refused."""
    keys = tokens_reserve(tenant.quota_identity, Limits(), tokens, enforce=False)
    return Hold(tokens=tokens, token_keys=keys)


# --- Background jobs: admitted when submitted, generated later by a worker ---------------------------


def _job_hold_key(job_id) -> str:
    return f"quota:job:{job_id}"


@contextmanager
def quota_admit_job(tenant: Tenant, *, job_id, slots: int = 1, tokens: int = 0):
    """Admit background job `job_id` of `tenant` (raises QuotaExceeded). Its slots count as taken during the
    block, while the job is created and committed; from then its Job row counts. Its tokens are reserved now
    and kept under the job's id until its worker takes them over (quota_job_hold) or it ends without
    generating (quota_job_release)."""
    limits = limits_for(tenant.api_key)
    slot_key = _slots_take(tenant, limits.max_concurrent, slots)
    try:
        keys = tokens_reserve(tenant.quota_identity, limits, tokens)
        cache.set(_job_hold_key(job_id), {"tokens": tokens, "keys": list(keys)}, timeout=settings.JOB_TTL_SECONDS)
        try:
            yield
        except BaseException:
            quota_job_release(job_id)
            raise
    finally:
        _slots_give_back(slot_key, slots)


def _job_hold_take(job_id) -> Hold | None:
    """The hold kept for `job_id`, taken by one caller only (the one whose delete removed it)."""
    key = _job_hold_key(job_id)
    saved = cache.get(key)
    if saved is None or not cache.delete(key):
        return None
    return Hold(tokens=saved["tokens"], token_keys=tuple(saved["keys"]))


def quota_job_hold(tenant: Tenant, *, job_id, tokens: int) -> Hold:
    """What job `job_id` was admitted with, for its generation to settle; when it is gone (a second attempt,
    a flushed cache), a hold that counts `tokens` without refusing."""
    return _job_hold_take(job_id) or quota_count(tenant, tokens=tokens)


def quota_job_release(job_id) -> None:
    """Give back the tokens job `job_id` still holds (cancelled while queued, failed before generating)."""
    hold = _job_hold_take(job_id)
    if hold is not None:
        hold.settle(0)
