"""A memory-bounded store of evaluated prompt prefixes (saved sequence states), looked up by longest common prefix.

An entry may hold more than a prompt's whole chunks: a suspended sequence's state (its prompt and the tokens it
decoded) is kept here until it resumes. Its `exact` part (whole aligned prompt chunks) is all that another prompt
may reuse; the rest is restored only by the sequence itself (match `exact_only=False`).

Entries belong to the owner (tenant) whose sequence was saved. Another owner's prompt reuses an entry only as far
as both hold the site's own content (`shared`: a character's system prompt and persona), never a tenant's text:
reuse shows in usage.cached_tokens and in the time to the first token, so it would confirm a guess of another
tenant's prompt (docs/ARCHITECTURE.md, "Tenants and the prefix cache").
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


def reusable_across(length: int, *, saved_owner: str, saved_shared: int, owner: str, shared: int) -> int:
    """How much of a common prefix of `length` tokens a prompt of `owner` (its first `shared` tokens the site's own)
    may reuse from cells evaluated for `saved_owner`'s (its first `saved_shared`): all for the same owner, the
    site's content common to both for another."""
    return length if saved_owner == owner else min(length, saved_shared, shared)


def fair_victims(entries: Sequence[tuple[str, int, Any]], budget: int, *, keep: Any = None) -> list:
    """Which of `entries` (owner, size, key), least recently used first, to drop to fit `budget` bytes: always the
    oldest entry of the owner holding the most bytes, so that one tenant's flood of long prompts evicts its own
    entries, not everyone's (plain LRU let six distinct long prompts a minute keep all other tenants cold). `keep`
    (the entry just stored) counts toward its owner's bytes but is never picked."""
    held: dict[str, int] = {}
    queues: dict[str, list] = {}
    for owner, size, key in entries:
        held[owner] = held.get(owner, 0) + size
        if key != keep:
            queues.setdefault(owner, []).append((size, key))
    total = sum(held.values())
    victims = []
    while total > budget and queues:
        heaviest = max(queues, key=held.get)
        size, key = queues[heaviest].pop(0)
        victims.append(key)
        total -= size
        held[heaviest] -= size
        if not queues[heaviest]:
            del queues[heaviest]
    return victims


@dataclass(frozen=True)
class CachedPrefix:
    tokens: tuple[int, ...]  # the tokens whose evaluated state `state` holds, from position 0
    state: Any  # opaque to the cache (a ctypes buffer of llama_state_seq_get_data)
    size: int  # bytes, counted against the budget
    exact: int | None = None  # leading tokens a cold prompt computes the same (whole chunks); None: all of them
    owner: str = ""  # whose sequence it was
    shared: int = 0  # its leading tokens that are the site's own content, which other owners may reuse

    @property
    def reusable(self) -> int:
        """How many leading tokens a prompt of its owner may reuse."""
        return len(self.tokens) if self.exact is None else min(self.exact, len(self.tokens))

    def reusable_by(self, length: int, *, owner: str, shared: int) -> int:
        """How much of a common prefix of `length` tokens a prompt of `owner` may reuse (see reusable_across)."""
        return reusable_across(min(length, self.reusable), saved_owner=self.owner, saved_shared=self.shared,
                               owner=owner, shared=shared)


class PrefixCache:
    """Keeps saved states of token prefixes within `budget_bytes`, evicting the least recently used of the owner
    that holds the most bytes (fair_victims).

    Keyed by owner and tokens: one owner's entry never replaces or removes another's (which would tell the first
    owner that the other sent those tokens). Thread-safe: the scheduler thread uses it; request threads only ask
    `match_length` (whether a saved state on disk is worth reading).
    """

    def __init__(self, budget_bytes: int):
        self.budget_bytes = budget_bytes
        self._entries: OrderedDict[tuple[str, tuple[int, ...]], CachedPrefix] = OrderedDict()  # oldest first
        self.total_bytes = 0
        self._demoted: set = set()  # keys to evict before any other (demote), until used again
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def longest_match(self, tokens: Sequence[int], *, exact_only: bool = True, owner: str = "",
                      shared: int = 0) -> tuple[CachedPrefix | None, int]:
        """The entry sharing the longest prefix with `tokens` that a prompt of `owner` (its first `shared` tokens the
        site's own) may reuse, and that length (0 if none). `exact_only`: counted only as far as the entry may be
        reused by another prompt; False: as far as its tokens go (a suspended sequence restoring its own state)."""
        with self._lock:
            best, best_length = self._best(tokens, exact_only, owner, shared)
            if best is not None:
                self._entries.move_to_end((best.owner, best.tokens))  # recently used
                self._demoted.discard((best.owner, best.tokens))
            return best, best_length

    def match_length(self, tokens: Sequence[int], *, owner: str = "", shared: int = 0) -> int:
        """How much of `tokens` the best entry holds for `owner`, without counting it as used."""
        with self._lock:
            return self._best(tokens, True, owner, shared)[1]

    def covers(self, tokens: Sequence[int], *, exact: int | None = None, owner: str = "") -> bool:
        """Whether an entry of `owner` already holds all of `tokens`, its first `exact` (default: all) reusable (so
        saving them again is pointless)."""
        n = len(tokens)
        needed = n if exact is None else exact
        with self._lock:
            return any(entry.owner == owner and len(key) >= n and entry.reusable >= needed
                       and common_prefix_length(key, tokens) == n for (_, key), entry in self._entries.items())

    def put(self, tokens: Sequence[int], state: Any, size: int, *, exact: int | None = None, owner: str = "",
            shared: int = 0) -> bool:
        """Store a state of `owner`'s (`exact`, `shared`: see CachedPrefix); the owner's entries it extends, and
        holds as reusably, are dropped. Returns False if it cannot fit at all."""
        if size > self.budget_bytes:
            return False
        tokens = tuple(tokens)
        entry = CachedPrefix(tokens, state, size, exact, owner, shared)
        with self._lock:
            if (owner, tokens) in self._entries:  # replaced: its bytes are counted once
                self._remove((owner, tokens))
            for key in [(o, k) for (o, k), old in self._entries.items()
                        if o == owner and len(k) <= len(tokens) and tokens[: len(k)] == k
                        and old.reusable <= entry.reusable and old.shared <= entry.shared]:
                self._remove(key)
            self._entries[(owner, tokens)] = entry
            self.total_bytes += size
            self._evict(keep=(owner, tokens))
        return True

    def demote(self, tokens: Sequence[int], *, owner: str = "") -> None:
        """Make `owner`'s entry of exactly `tokens` (if any) the first to be evicted: a resumed sequence's saved
        state, kept only for the prefix others may reuse, must not push out prompts that are used."""
        with self._lock:
            key = (owner, tuple(tokens))
            if key in self._entries:
                self._entries.move_to_end(key, last=False)
                self._demoted.add(key)

    def _evict(self, *, keep) -> None:
        """Fit the budget: demoted entries first, then fairly (fair_victims); `keep`, the entry just stored, last
        (evicting it would cache nothing for an owner whose one prompt is its heaviest)."""
        for key in [key for key in self._entries if key in self._demoted and key != keep]:
            if self.total_bytes <= self.budget_bytes:
                return
            self._remove(key)
        entries = [(o, e.size, (o, k)) for (o, k), e in self._entries.items()]
        for key in fair_victims(entries, self.budget_bytes, keep=keep):
            self._remove(key)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._demoted.clear()
            self.total_bytes = 0

    def _best(self, tokens: Sequence[int], exact_only: bool, owner: str,
              shared: int) -> tuple[CachedPrefix | None, int]:
        best, best_length = None, 0
        for entry in self._entries.values():
            length = common_prefix_length(entry.tokens, tokens)
            if exact_only or entry.owner != owner:  # another owner's decoded tokens are never restored
                length = entry.reusable_by(length, owner=owner, shared=shared)
            if length > best_length:
                best, best_length = entry, length
        return best, best_length

    def _remove(self, key: tuple[str, tuple[int, ...]]) -> None:
        self.total_bytes -= self._entries.pop(key).size
        self._demoted.discard(key)
