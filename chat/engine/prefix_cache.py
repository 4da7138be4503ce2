"""A memory-bounded LRU store of evaluated prompt prefixes (saved sequence states), looked up by longest common prefix."""

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

    def longest_match(self, tokens: Sequence[int]) -> tuple[CachedPrefix | None, int]:
        """The entry sharing the longest prefix with `tokens`, and that length (0 if none)."""
        with self._lock:
            best, best_length = self._best(tokens)
            if best is not None:
                self._entries.move_to_end(best.tokens)  # recently used
            return best, best_length

    def match_length(self, tokens: Sequence[int]) -> int:
        """How much of `tokens` the best entry holds, without counting it as used."""
        with self._lock:
            return self._best(tokens)[1]

    def covers(self, tokens: Sequence[int]) -> bool:
        """Whether some entry already holds all of `tokens` (so saving them again is pointless)."""
        n = len(tokens)
        with self._lock:
            return any(len(key) >= n and common_prefix_length(key, tokens) == n for key in self._entries)

    def put(self, tokens: Sequence[int], state: Any, size: int) -> bool:
        """Store a state; entries it extends are dropped. Returns False if it cannot fit at all."""
        if size > self.budget_bytes:
            return False
        tokens = tuple(tokens)
        with self._lock:
            for key in [k for k in self._entries if len(k) <= len(tokens) and tokens[: len(k)] == k]:
                self._remove(key)
            self._entries[tokens] = CachedPrefix(tokens, state, size)
            self.total_bytes += size
            while self.total_bytes > self.budget_bytes:
                self._remove(next(iter(self._entries)))
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.total_bytes = 0

    def _best(self, tokens: Sequence[int]) -> tuple[CachedPrefix | None, int]:
        best, best_length = None, 0
        for entry in self._entries.values():
            length = common_prefix_length(entry.tokens, tokens)
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def _remove(self, key: tuple[int, ...]) -> None:
        self.total_bytes -= self._entries.pop(key).size
