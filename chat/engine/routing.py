"""Which upstream serves a request: prefix affinity (consistent hashing with bounded load) or round-robin.

Pure Python, no I/O: `Router.order(key, in_flight)` returns the upstream indices to try, first
choice first, failover candidates after. With affinity, a request's key (its first system message: system
prompt and character; else the start of its prompt) picks its place on a hash ring
of virtual nodes; walking the ring clockwise gives a stable preference list per key, so the same
character keeps landing on the upstream whose prompt cache already holds it (and a conversation's next turn on
the upstream its last one ran on), and adding or removing
an upstream moves only about 1/N of the keys. Bounded load (Mirrokni et al., "Consistent Hashing
with Bounded Loads"): an upstream already holding ceil(load_factor × (in flight + 1) / N)
requests is passed over for the next one on the ring.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import math
import threading

POLICIES = ("affinity", "round_robin")
VIRTUAL_NODES = 64  # points per upstream on the ring: keeps the shares within a few percent of 1/N
LOAD_FACTOR = 1.25  # no upstream above 1.25× the mean of in-flight requests (with the new one counted)
# ...except for a key already in flight there (its prefix is being evaluated or cached there), up to 1.5× the mean:
# the bound spreads keys, not the requests of one key (few characters hash unevenly onto few upstreams). Under 2×,
# so that with 2 upstreams one key (a site system prompt every request shares) still reaches both.
HOME_LOAD_FACTOR = 1.5
AFFINITY_PREFIX_CHARS = 512  # how much of the rendered prompt keys the choice


def _point(text: str) -> int:
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def affinity_key(prompt: str, messages=(), *, chars: int = AFFINITY_PREFIX_CHARS) -> str:
    """The part of a prompt that picks its upstream: its first message, whole, when that is a system message (the
    system prompt and the character's profile: the same for every turn of every conversation with a character,
    different between characters even behind a long shared site prompt); else its first `chars` characters."""
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return "system\n" + messages[0]["content"]
    return str(prompt)[:chars]


def conversation_key(messages=()) -> str | None:
    """What a conversation's every turn starts with: its first system message and its first user message. Its
    later turns go back to the upstream its last turn ran on, where the whole conversation is cached."""
    system = next((m.get("content") for m in messages[:1] if m.get("role") == "system"), "")
    first_user = next((m.get("content") for m in messages if m.get("role") == "user"), None)
    if not isinstance(first_user, str) or not isinstance(system, str):
        return None
    return f"conversation\n{system}\n{first_user}"


class Router:
    """Orders upstreams (identified by stable labels) for each request; thread-safe."""

    def __init__(self, labels, *, policy: str = "affinity", load_factor: float = LOAD_FACTOR,
                 virtual_nodes: int = VIRTUAL_NODES):
        if policy not in POLICIES:
            raise ValueError(f"routing must be one of {POLICIES}, got {policy!r}")
        if load_factor < 1:
            raise ValueError("load_factor must be at least 1")
        self.labels = list(labels)
        if not self.labels:
            raise ValueError("at least one upstream is needed")
        self.policy = policy
        self.load_factor = load_factor
        ring = sorted((_point(f"{label}#{replica}"), index)
                      for index, label in enumerate(self.labels) for replica in range(virtual_nodes))
        self._points = [point for point, _ in ring]
        self._owners = [index for _, index in ring]
        self._rotation = itertools.count()
        self._lock = threading.Lock()

    def preference(self, key: str) -> list[int]:
        """Every upstream index once, in the order the ring gives for `key` (the same key, the same order)."""
        start = bisect.bisect(self._points, _point(key)) % len(self._points)
        order: list[int] = []
        for owner in itertools.chain(self._owners[start:], self._owners[:start]):
            if owner not in order:
                order.append(owner)
                if len(order) == len(self.labels):
                    break
        return order

    def capacity(self, in_flight: list[int], *, factor: float | None = None) -> int:
        """The most requests one upstream may hold, the new one included."""
        factor = self.load_factor if factor is None else factor
        return max(1, math.ceil(factor * (sum(in_flight) + 1) / len(self.labels)))

    def order(self, key: str | None, in_flight: list[int], *, home: int | None = None, keys_at: list[int] | None = None,
              key_capacity: int = 0, conversation_home: int | None = None) -> list[int]:
        """Upstream indices to try for one request, best first; `in_flight[i]` is upstream i's open requests.

        Affinity: the key's preference list with the upstreams at capacity moved behind the others
        (they stay failover candidates); `conversation_home`, where the request's conversation last ran (all of it
        cached there), then `home`, the upstream serving this key now or last, first while it holds under
        HOME_LOAD_FACTOR x the mean. With `key_capacity` (an upstream's slots) a key without a home
        also passes over upstreams whose slots all hold other keys with open requests (`keys_at[i]`), while another
        has room: few characters then spread so that each stays in a slot. Round-robin (or no key): the next rotation.
        """
        count = len(self.labels)
        if self.policy == "round_robin" or key is None:
            with self._lock:
                start = next(self._rotation) % count
            return [(start + step) % count for step in range(count)]
        preferred = self.preference(key)
        home_limit = self.capacity(in_flight, factor=max(HOME_LOAD_FACTOR, self.load_factor))
        for place in (conversation_home, home):
            if place is not None and in_flight[place] < home_limit:
                return [place] + [index for index in preferred if index != place]  # its prompt is cached there
        limit = self.capacity(in_flight)
        below = [index for index in preferred if in_flight[index] < limit]
        if key_capacity and keys_at is not None:
            with_room = [index for index in below if keys_at[index] < key_capacity]
            below = with_room + [index for index in below if index not in with_room]
        return below + [index for index in preferred if index not in below]
