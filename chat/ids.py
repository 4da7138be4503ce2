"""Ids of stored messages: in the order they were made, but counting nothing.

A database sequence handed every tenant the number of messages written by everyone between two of its own
(two requests, two ids). These ids are milliseconds since 2026 with 12 random bits below, never lower than the
last id this process made, so sorting by id still follows creation; they stay below 2**53 (exact in JavaScript)
until 2095."""

from __future__ import annotations

import secrets
import threading
import time

EPOCH_MS = 1_767_225_600_000  # 2026-01-01 00:00 UTC
RANDOM_BITS = 12

_lock = threading.Lock()
_last = 0


def new_message_id() -> int:
    global _last
    milliseconds = time.time_ns() // 1_000_000 - EPOCH_MS
    candidate = (milliseconds << RANDOM_BITS) | secrets.randbelow(1 << RANDOM_BITS)
    with _lock:
        _last = max(candidate, _last + 1)
        return _last
