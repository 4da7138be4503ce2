"""Readiness checks: the database, the default model, Redis (when configured). Nothing secret in results."""

from __future__ import annotations

import os

from django.conf import settings
from django.db import connection

from chat.engine import EngineError

from chat.engines import get_engine, get_registry

from .drain import is_draining


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True}
    except Exception:
        return {"ok": False, "error": "the database does not answer"}


def check_model() -> dict:
    registry = get_registry()
    spec = registry.spec()
    result = {"ok": True, "model": spec.name, "loaded": registry.is_loaded()}
    engine = registry.loaded()
    if engine is not None and not engine.alive:
        # Not replaced here: the next request reloads it; until then this instance is not ready.
        # Stopped, or stalled: no scheduler step for longer than its bound while requests wait.
        return {**result, "ok": False, "error": "the model's scheduler stopped or stalled; the next request reloads it"}
    # A remote model (base_urls) has no file here; its upstreams are not probed, so that a pool outage
    # answers 503 per request instead of taking every web instance out of the load balancer.
    if not result["loaded"] and not spec.base_urls and not os.path.exists(spec.path):
        return {**result, "ok": False, "error": f"model file {os.path.basename(spec.path)} is missing"}
    try:
        get_engine()  # loads it if needed: a ready instance can answer at once
    except EngineError as exc:
        return {**result, "ok": False, "error": getattr(exc, "reason", "the model cannot be loaded")}
    return {**result, "loaded": True}


def check_redis() -> dict | None:
    if not settings.REDIS_URL:
        return None
    import redis

    try:
        redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
        return {"ok": True}
    except redis.RedisError:
        return {"ok": False, "error": "Redis does not answer"}


def readiness() -> tuple[bool, dict]:
    checks = {"database": check_database(), "model": check_model()}
    redis_check = check_redis()
    if redis_check is not None:
        checks["redis"] = redis_check
    if is_draining():  # SIGTERM received (manage.py serve): the balancer must stop sending requests here
        checks["drain"] = {"ok": False, "error": "this instance is shutting down"}
    return all(check["ok"] for check in checks.values()), checks
