"""How many bytes of WebSocket frames one user may have parsed per second.

A frame is parsed as JSON on the event loop that carries every HTTP stream and socket of the process: a 1 MB
frame held it for 0.2-0.3 s, and frames that turn out invalid never reach the rate limit (which counts
operations). So every frame is charged here, by its size (at least READ_MIN_CHARGE), before it is parsed; a
user past the budget gets a 429 error event and the frame is dropped unread. A token bucket per user, shared by
the user's sockets in this process: it refills at WS_READ_BYTES_PER_SECOND up to API_MAX_REQUEST_BYTES, so one
frame of the largest size passes at once and a steady flood is held to the rate.
"""

from __future__ import annotations

import time

READ_MIN_CHARGE = 1024  # bytes charged for a frame however small: frames cost more than their bytes to answer


class ReadBudget:
    def __init__(self, *, rate: float, burst: float):
        self.rate, self.burst = rate, burst
        self.level, self.checked = burst, time.monotonic()

    def take(self, size: int) -> bool:
        """Charge a frame of `size` bytes; False (nothing charged) when the user is over the budget."""
        now = time.monotonic()
        self.level = min(self.burst, self.level + (now - self.checked) * self.rate)
        self.checked = now
        charge = max(size, READ_MIN_CHARGE)
        if charge > self.level:
            return False
        self.level -= charge
        return True

    def seconds_until(self, size: int) -> float:
        return max(0.0, (max(size, READ_MIN_CHARGE) - self.level) / self.rate)

    def full(self) -> bool:
        return self.level + (time.monotonic() - self.checked) * self.rate >= self.burst
