"""The queue in front of the sequence slots: fair between owners, first come first served within one.

When a slot frees up, the next request comes from the owner with the fewest active sequences; among
equals, from the owner admitted least recently (never admitted first), then the oldest request. A
flood by one owner therefore queues behind its own requests, not in front of everyone else's. The
scheduler lets one owner hold at most half of a bounded queue (owner_share), so a flood cannot fill it, and
keeps its last quarter for owners with nothing waiting (queue_bound), so two floods cannot fill it either.
"""

from __future__ import annotations

import itertools
from collections import deque
from typing import Iterator, Mapping

from .sequence import Sequence

MAX_REMEMBERED_OWNERS = 4096  # when each owner was last admitted; the oldest are forgotten beyond this


def owner_share(max_queue: int) -> int:
    """The most places of a queue of `max_queue` (0: unbounded) one owner may hold: half, rounded up."""
    return -(-max_queue // 2)


def queue_bound(max_queue: int, waiting_of_owner: int) -> int:
    """How many may wait in a queue of `max_queue` places when an owner with `waiting_of_owner` sequences queued
    submits one more: the last quarter (at least one place) is for owners with nothing waiting."""
    return max_queue if waiting_of_owner == 0 else max_queue - max(1, max_queue // 4)


class AdmissionQueue:
    """Waiting sequences grouped by `Sequence.owner`. Not thread-safe: the scheduler guards it with its lock."""

    def __init__(self):
        self._by_owner: dict[str, deque[tuple[int, Sequence]]] = {}
        self._tickets = itertools.count()  # arrival order
        self._turns = itertools.count(1)  # admission order
        self._last_admitted: dict[str, int] = {}
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __iter__(self) -> Iterator[Sequence]:
        """Every waiting sequence (a snapshot: the queue may be changed while iterating)."""
        return iter([seq for waiting in self._by_owner.values() for _, seq in waiting])

    def waiting_of(self, owner: str) -> int:
        """How many sequences of `owner` wait."""
        return len(self._by_owner.get(owner, ()))

    def append(self, seq: Sequence) -> None:
        self._by_owner.setdefault(seq.owner, deque()).append((next(self._tickets), seq))
        self._size += 1

    def requeue(self, seq: Sequence) -> None:
        """Put back a sequence that was running (suspended): ahead of its owner's other waiting sequences."""
        waiting = self._by_owner.setdefault(seq.owner, deque())
        waiting.appendleft((waiting[0][0] if waiting else next(self._tickets), seq))
        self._size += 1

    def next_owner(self, active: Mapping[str, int]) -> str | None:
        """The owner pop_next would admit from (None if nobody waits)."""
        if not self._by_owner:
            return None
        return min(self._by_owner, key=lambda name: self._order(name, active))

    def _order(self, owner: str, active: Mapping[str, int]) -> tuple[int, int, int]:
        return active.get(owner, 0), self._last_admitted.get(owner, 0), self._by_owner[owner][0][0]

    def remove(self, seq: Sequence) -> None:
        waiting = self._by_owner[seq.owner]
        for item in waiting:
            if item[1] is seq:
                waiting.remove(item)
                break
        else:
            raise ValueError("not queued")
        self._size -= 1
        if not waiting:
            del self._by_owner[seq.owner]

    def pop_next(self, active: Mapping[str, int]) -> Sequence:
        """The next sequence to admit, given how many sequences each owner has active."""
        owner = min(self._by_owner, key=lambda name: self._order(name, active))
        waiting = self._by_owner[owner]
        _, seq = waiting.popleft()
        self._size -= 1
        if not waiting:
            del self._by_owner[owner]
        self._last_admitted.pop(owner, None)  # re-inserted last: the dict stays ordered oldest turn first
        self._last_admitted[owner] = next(self._turns)
        if len(self._last_admitted) > MAX_REMEMBERED_OWNERS:
            del self._last_admitted[next(iter(self._last_admitted))]
        return seq

    def drain(self) -> list[Sequence]:
        """Remove and return every waiting sequence."""
        drained = list(self)
        self._by_owner.clear()
        self._size = 0
        return drained
