"""The usage ledger: one UsageRecord per generation, and the sums the API and the admin show."""

from __future__ import annotations

import logging
from datetime import date, datetime, time as dtime, timedelta, timezone as dt_timezone

from django.db import DatabaseError
from django.db.models import Count, F, Sum
from django.db.models.functions import Coalesce, TruncDate

from chat.models import UsageRecord

from .owners import Tenant

END_USER_MAX = UsageRecord._meta.get_field("end_user").max_length

logger = logging.getLogger("llmsite.usage")

SUMS = {"requests": Count("id"), "prompt_tokens": Coalesce(Sum("prompt_tokens"), 0),
        "completion_tokens": Coalesce(Sum("completion_tokens"), 0)}


def usage_record_write(*, tenant: Tenant, model: str, character_id: int | None, prompt_tokens: int,
                       completion_tokens: int, duration: float, outcome: str) -> UsageRecord | None:
    """Write one ledger row; bookkeeping, so a failed write is logged, never raised."""
    try:
        return UsageRecord.objects.create(owner=tenant.user, api_key=tenant.api_key, model=model,
                                          character_id=character_id, prompt_tokens=max(prompt_tokens, 0),
                                          completion_tokens=max(completion_tokens, 0), duration=max(duration, 0.0),
                                          outcome=outcome, end_user=tenant.end_user[:END_USER_MAX])
    except DatabaseError:
        logger.warning("usage of %s not recorded", tenant.owner, exc_info=True)
        return None


def _with_total(row: dict) -> dict:
    return {**row, "total_tokens": row["prompt_tokens"] + row["completion_tokens"]}


def usage_totals(queryset) -> dict:
    return _with_total(queryset.aggregate(**SUMS))


def usage_by_day(queryset) -> list[dict]:
    """Sums per UTC day, oldest first (days without usage left out)."""
    rows = (queryset.annotate(day=TruncDate("created_at", tzinfo=dt_timezone.utc)).values("day")
            .annotate(**SUMS).order_by("day"))
    return [_with_total({"date": row["day"].isoformat(), **{name: row[name] for name in SUMS}}) for row in rows]


def usage_grouped(queryset, field: str, label: str) -> list[dict]:
    """Sums per value of `field` (e.g. "api_key"), labelled by `label` (e.g. "api_key__name"), most tokens first."""
    rows = (queryset.values(field, name=F(label)).annotate(**SUMS)
            .order_by("-prompt_tokens", "-completion_tokens"))
    return [_with_total(row) for row in rows]


def usage_window(*, start: date | None, end: date | None, today: date) -> tuple[date, date]:
    """The days a usage query covers: `start`..`end` inclusive; by default the last 30 days up to today."""
    end = end or today
    start = start or end - timedelta(days=29)
    return start, end


def usage_of_owner(*, user, start: date, end: date) -> dict:
    """GET /v1/usage: the user's own usage (all of their keys and sessions), totals and per day."""
    since = datetime.combine(start, dtime.min, tzinfo=dt_timezone.utc)
    until = datetime.combine(end + timedelta(days=1), dtime.min, tzinfo=dt_timezone.utc)
    records = UsageRecord.objects.filter(owner=user, created_at__gte=since, created_at__lt=until)
    by_outcome = {row["outcome"]: row["requests"] for row in records.values("outcome").annotate(requests=Count("id"))}
    return {"object": "usage", "start": start.isoformat(), "end": end.isoformat(),
            "totals": {**usage_totals(records), "outcomes": by_outcome},
            "data": usage_by_day(records)}
