"""Whether this process is draining: after SIGTERM (`manage.py serve`) it admits no new work. Set by the launcher,
read by every surface that admits work (chat/ops/drain.py for HTTP, the WebSocket consumer)."""

from __future__ import annotations

import threading
import time

RETRY_AFTER_SECONDS = 5  # a client retrying after this reaches another instance through the balancer

_lock = threading.Lock()
_draining_since: float | None = None


def drain_begin() -> None:
    global _draining_since
    with _lock:
        if _draining_since is None:
            _draining_since = time.monotonic()


def drain_reset() -> None:
    """Admit again (tests)."""
    global _draining_since
    with _lock:
        _draining_since = None


def is_draining() -> bool:
    return _draining_since is not None
