"""Typed readers for environment variables (12-factor settings); a bad value stops start-up with one line."""

import logging
import os
import re
from urllib.parse import urlparse

TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}
# The periods chat/api/throttling.py understands, as "<count>/<period>".
RATE_PATTERN = re.compile(r"^\s*(\d+)\s*/\s*(s|sec|second|m|min|minute|h|hour|d|day)\s*$", re.IGNORECASE)
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingError(SystemExit):
    """A setting that cannot work: SystemExit prints the one line and exits without a traceback."""

    def __init__(self, message: str):
        super().__init__(f"llmsite: configuration error: {message}")


def env_bool(name: str, default: bool) -> bool:
    raw = os.environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise SettingError(f"{name}={raw!r} is not a yes/no value")


def env_int(name: str, default: int, *, minimum: int | None = None) -> int:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not an integer") from None
    if minimum is not None and value < minimum:
        raise SettingError(f"{name}={raw!r} must be at least {minimum}")
    return value


def env_float(name: str, default: float, *, minimum: float | None = None, maximum: float | None = None) -> float:
    raw = os.environ.get(name)
    if raw is None or raw.strip() == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingError(f"{name}={raw!r} is not a number") from None
    if minimum is not None and value < minimum:
        raise SettingError(f"{name}={raw!r} must be at least {minimum}")
    if maximum is not None and value > maximum:
        raise SettingError(f"{name}={raw!r} must be at most {maximum}")
    return value


def env_list(name: str, default: list[str]) -> list[str]:
    raw = os.environ.get(name)
    if raw is None:
        return list(default)
    return [item.strip() for item in raw.split(",") if item.strip()]


def env_rate(name: str, default: str) -> str:
    """A rate limit such as "120/min" (empty: no limit), checked now rather than on every request."""
    raw = os.environ.get(name, default).strip()
    if raw == "":
        return ""
    match = RATE_PATTERN.match(raw)
    if not match or int(match.group(1)) < 1:
        raise SettingError(f"{name}={raw!r} is not a rate like '120/min' (periods: s, min, h, day; empty: no limit)")
    return raw


def env_log_level(name: str, default: str) -> str:
    raw = os.environ.get(name, default).strip().upper()
    if raw not in LOG_LEVELS or not isinstance(logging.getLevelName(raw), int):
        raise SettingError(f"{name}={raw!r} is not one of {', '.join(LOG_LEVELS)}")
    return raw


def env_url(name: str, default: str, *, schemes: tuple[str, ...]) -> str:
    """A service URL whose scheme is one of `schemes` (empty stays empty: the service is not used)."""
    raw = os.environ.get(name, default).strip()
    if raw == "":
        return ""
    parsed = urlparse(raw)
    if parsed.scheme not in schemes or not (parsed.hostname or parsed.path):
        raise SettingError(f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)}")
    return raw


def redis_database(url: str) -> tuple[str, int]:
    """(host:port, database number) of a redis:// URL, to tell whether two URLs share a database."""
    parsed = urlparse(url)
    path = parsed.path.strip("/")
    database = int(path) if path.isdigit() else 0
    return f"{parsed.hostname}:{parsed.port or 6379}", database


def load_env_file(path) -> None:
    """Set the variables of a local KEY=VALUE file (`make run` writes `.env` with DEBUG=1 and a generated
    SECRET_KEY) that the environment does not set: a variable of the environment always wins. A missing
    file is nothing to load; blank lines and `#` comments are skipped; values may be quoted."""
    try:
        lines = open(path, encoding="utf-8").read().splitlines()
    except FileNotFoundError:
        return
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        name, value = name.strip(), value.strip()
        if not sep or not name.isidentifier():
            raise SettingError(f"{path}:{number} is not a NAME=value line")
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        os.environ.setdefault(name, value)
