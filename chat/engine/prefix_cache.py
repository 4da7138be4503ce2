"""A memory-bounded LRU store of evaluated prompt prefixes (saved sequence states), looked up by longest common prefix.

An entry may hold more than a prompt's whole chunks: a suspended sequence's state (its prompt and the tokens it
decoded) is kept here until it resumes. Its `exact` part (whole aligned prompt chunks) is all that another prompt
may reuse; the rest is restored only by the sequence itself (match `exact_only=False`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, Sequence


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token lists."""
    limit = min(len(a), len(b))
    if list(a[:limit]) == list(b[:limit]):  # the usual case (one extends the other) at C speed
        return limit
    for index in range(limit):
        if a[index] != b[index]:
            return index
    return limit


@dataclass(frozen=True)
class CachedPrefix:
    tokens: tuple[int, ...]  # the tokens whose evaluated state `state` holds, from position 0
    state: Any  # opaque to the cache (a ctypes buffer of llama_state_seq_get_data)
    size: int  # bytes, counted against the budget
    exact: int | None = None  # leading tokens a cold prompt computes the same (whole chunks); None: all of them

    @property
    def reusable(self) -> int:
        """How many leading tokens any prompt may reuse."""
        return len(self.tokens) if self.exact is None else min(self.exact, len(self.tokens))


class PrefixCache:
    """Keeps saved states of token prefixes within `budget_bytes`, evicting the least recently used.

    Thread-safe: the scheduler thread uses it; request threads only ask `match_length` (whether a saved state
    on disk is worth reading).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[int, ...], CachedPrefix] = OrderedDict()  # oldest first
        self.total_bytes = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def longest_match(self, tokens: Sequence[int], *, exact_only: bool = True) -> tuple[CachedPrefix | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length (0 if none). `exact_only`: counted
        only as far as the entry may be reused by any prompt; False: as far as its tokens go (a suspended sequence
        restoring its own state)."""
        with self._lock:
            best, best_length = self._best(tokens, exact_only)
            if best is not None:
                self._entries.move_to_end(best.tokens)  # recently used
            return best, best_length

    def match_length(self, tokens: Sequence[int]) -> int:
        """How much of `tokens` the best entry holds, without counting it as used."""
        with self._lock:
            return self._best(tokens, True)[1]

    def covers(self, tokens: Sequence[int], *, exact: int | None = None) -> bool:
        """Whether some entry already holds all of `tokens`, its first `exact` (default: all) reusable by any prompt
        (so saving them again is pointless)."""
        n = len(tokens)
        needed = n if exact is None else exact
        with self._lock:
            return any(len(key) >= n and entry.reusable >= needed and common_prefix_length(key, tokens) == n
                       for key, entry in self._entries.items())

    def put(self, tokens: Sequence[int], state: Any, size: int, *, exact: int | None = None) -> bool:
        """Store a state (`exact`: see CachedPrefix); entries it extends, and holds as reusably, are dropped.
        Returns False if it cannot fit at all."""
        if size > self.budget_bytes:
            return False
        tokens = tuple(tokens)
        entry = CachedPrefix(tokens, state, size, exact)
        with self._lock:
            if tokens in self._entries:  # replaced: its bytes are counted once
                self._remove(tokens)
            for key in [k for k, old in self._entries.items()
                        if len(k) <= len(tokens) and tokens[: len(k)] == k and old.reusable <= entry.reusable]:
                self._remove(key)
            self._entries[tokens] = entry
            self.total_bytes += size
            while self.total_bytes > self.budget_bytes:
                self._remove(next(iter(self._entries)))
        return True

    def demote(self, tokens: Sequence[int]) -> None:
        """Make the entry of exactly `tokens` (if any) the first to be evicted: a resumed sequence's saved state,
        kept only for the prefix others may reuse, must not push out prompts that are used."""
        with self._lock:
            key = tuple(tokens)
            if key in self._entries:
                self._entries.move_to_end(key, last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total_bytes = 0

    def _best(self, tokens: Sequence[int], exact_only: bool) -> tuple[CachedPrefix | None, int]:
        best, best_length = None, 0
        for entry in self._entries.values():
            length = common_prefix_length(entry.tokens, tokens)
            if exact_only:
                length = min(length, entry.reusable)
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def _remove(self, key: tuple[int, ...]) -> None:
        self.total_bytes -= self._entries.pop(key).size
