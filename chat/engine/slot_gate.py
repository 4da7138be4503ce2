"""Requests beyond an upstream's slots wait here, and a freed slot goes to a request whose prefix it holds.

A llama-server upstream runs `--parallel` requests at once and queues the rest first come, first
served. It reuses a prompt prefix only from an idle slot whose prompt shares it (picked by prompt
similarity) or from its RAM prompt cache. When a burst queues there, a slot freed by character A's
reply is taken by whichever request is next, often character B's: A's sheet is evicted, B's is
evaluated, and A's next request evaluates A's sheet again; two requests of one new character that
start together evaluate its sheet twice. Holding the excess here instead (`upstream_slots`: the
upstream's --parallel) lets each freed slot go to, in this order:

1. a request whose key an idle slot holds (the upstream picks that slot and reuses its prompt);
2. else one whose key has no request running there (two at once would evaluate one prefix twice);
3. else the oldest, once it has waited HOLD_SECONDS: a request whose key is running there waits that long even
   beside a free slot, for a request of another key to take the slot, or for the running one to end and leave
   its prompt in an idle slot. (On a compute-bound upstream its own evaluation of the prefix would have shared
   the compute with the running one's anyway.)

Between owners (tenants) first, as the local engine admits: the freed slot goes to a request of the waiting owner
with the fewest requests running through this gate, then of the one let through least recently, and the order
above applies among that owner's requests (one owner's twelve queued requests no longer all go before another's
one). Only when none of that owner's may go now (each held) does another owner's go that may.
A request that younger ones have passed PASSES_PER_SLOT x slots times goes next whatever its key: none is passed
over without bound. (Counted in requests, not seconds: a wave of replies takes seconds on a loaded CPU upstream and
a fraction of one on a GPU.)
Which slot holds what is modelled, not asked: a finished request leaves its key in an idle slot, a new
request takes the idle slot holding its key or else the least recently used one, as llama-server does.
Pure Python, no I/O.
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable

PASSES_PER_SLOT = 4
# An upstream frees the slots of one batch step together, and their last bytes reach us a few ms apart: a release
# waits this long so that every slot freed with it is known before any is handed out, and again between the
# requests that go to the slots holding their prefixes and the others, so that those reach the upstream first
# (it gives a request with no matching slot the least recently used idle one, which may be one a match was due).
SETTLE_SECONDS = 0.03
HOLD_SECONDS = 1.0
MAX_REMEMBERED_OWNERS = 1024  # owners whose last grant is remembered while they have nothing here
WAIT_TICK = 0.1  # how often a waiting request checks whether it was cancelled or its hold is over


class _Waiter:
    __slots__ = ("key", "owner", "since", "passed", "granted")

    def __init__(self, key: str | None, owner: str, since: float):
        self.key, self.owner, self.since, self.passed, self.granted = key, owner, since, 0, threading.Event()


class SlotGate:
    """At most `slots` requests running at one upstream; the rest wait in `acquire`. Thread-safe."""

    def __init__(self, slots: int, *, passes_per_slot: int = PASSES_PER_SLOT, settle: float = SETTLE_SECONDS,
                 hold: float = HOLD_SECONDS, clock=time.monotonic):
        if slots < 1:
            raise ValueError("an upstream has at least one slot")
        self.slots = slots
        self.max_passed = passes_per_slot * slots
        self.settle = settle
        self.hold = hold
        self._clock = clock
        self._busy = 0
        self._running: Counter[str | None] = Counter()  # key -> its requests running upstream
        self._owners_running: Counter[str] = Counter()  # owner -> its requests running upstream
        self._owner_grants: dict[str, int] = {}  # owner -> when it was last let through (a grant count)
        self._grants = 0
        self._idle: deque[str] = deque()  # keys held by idle slots, least recently used first
        self._waiting: list[_Waiter] = []  # oldest first
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        with self._lock:
            return len(self._waiting)

    def acquire(self, key: str | None, *, owner: str = "", stop: Callable[[], bool] = lambda: False,
                on_wait: Callable[[], None] | None = None) -> bool:
        """Block until a slot is this request's (of `owner`): True. False once `stop()` is true first (nothing to
        release)."""
        waiter = _Waiter(key, owner, self._clock())
        with self._lock:
            self._waiting.append(waiter)
            self._dispatch()
        if waiter.granted.is_set():
            return True
        if on_wait is not None:
            on_wait()
        while not waiter.granted.wait(WAIT_TICK):
            with self._lock:
                self._dispatch()  # a hold may be over
            if waiter.granted.is_set():
                break
            if stop():
                with self._lock:
                    if not waiter.granted.is_set():
                        self._waiting.remove(waiter)
                        return False
                self.release(key, owner=owner)  # granted just now: hand the slot on
                return False
        return True

    def release(self, key: str | None, *, owner: str = "") -> None:
        """A request that `acquire` let through is over: its slot is idle and holds its key."""
        with self._lock:
            self._busy -= 1
            self._running[key] -= 1
            if self._running[key] <= 0:
                del self._running[key]
            self._owners_running[owner] -= 1
            if self._owners_running[owner] <= 0:
                del self._owners_running[owner]
            if key is not None:
                self._idle.append(key)  # two idle slots may hold one key: each can serve one of its requests
            self._trim_idle()
            waiting = bool(self._waiting)
        if waiting and self.settle:
            time.sleep(self.settle)
            with self._lock:
                self._dispatch(matching_only=True)
            time.sleep(self.settle)
        with self._lock:
            self._dispatch()

    def _trim_idle(self) -> None:
        while len(self._idle) > self.slots - self._busy:
            self._idle.popleft()

    def _choose(self, *, matching_only: bool) -> _Waiter | None:
        oldest = self._waiting[0]
        if oldest.passed >= self.max_passed:
            return oldest
        owner = min({waiter.owner for waiter in self._waiting},
                    key=lambda o: (self._owners_running[o], self._owner_grants.get(o, -1)))
        mine = [waiter for waiter in self._waiting if waiter.owner == owner]
        chosen = self._choose_among(mine, matching_only=matching_only, hold=True)
        if chosen is None and not matching_only:  # none of that owner's may go yet: another's that may, now
            chosen = self._choose_among(self._waiting, matching_only=False, hold=False)
        return chosen

    def _choose_among(self, waiters: list[_Waiter], *, matching_only: bool, hold: bool) -> _Waiter | None:
        for waiter in waiters:
            if waiter.key is not None and waiter.key in self._idle:
                return waiter
        if matching_only:
            return None
        for waiter in waiters:
            if not self._running.get(waiter.key):
                return waiter
        return waiters[0] if hold and self._clock() - waiters[0].since >= self.hold else None

    def _dispatch(self, *, matching_only: bool = False) -> None:
        while self._waiting and self._busy < self.slots:
            waiter = self._choose(matching_only=matching_only)
            if waiter is None:
                return
            position = self._waiting.index(waiter)
            for older in self._waiting[:position]:
                older.passed += 1
            del self._waiting[position]
            self._busy += 1
            self._running[waiter.key] += 1
            self._owners_running[waiter.owner] += 1
            self._grants += 1
            self._owner_grants[waiter.owner] = self._grants
            if len(self._owner_grants) > MAX_REMEMBERED_OWNERS:  # forget owners with nothing here now
                present = set(self._owners_running) | {other.owner for other in self._waiting}
                self._owner_grants = {o: when for o, when in self._owner_grants.items() if o in present}
            if waiter.key is not None and waiter.key in self._idle:
                self._idle.remove(waiter.key)  # it takes a slot holding its prefix
            else:
                self._trim_idle()  # it takes the least recently used idle slot
            waiter.granted.set()
