"""The upstream servers of a remote model: the choice (chat/engine/routing.py), skipping the ones that failed,
per-upstream counters, error mapping.

Pure Python (no httpx here): chat/engine/remote.py does the HTTP and reports each outcome back.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from urllib.parse import urlsplit

from .errors import ContextOverflow, EngineError, InvalidRequest, ModelUnavailable
from .routing import Router
from .slot_gate import SlotGate

logger = logging.getLogger(__name__)

RETRY_DOWN_AFTER = 5.0  # seconds a failed upstream is skipped before a request tries it again
PLACEMENTS_KEPT = 4096  # keys whose last upstream is remembered (least recently used forgotten first)

# How OpenAI-compatible servers word "the prompt does not fit": OpenAI and llama-cpp-python
# ("This model's maximum context length is N tokens"), vLLM (same, plus "max_model_len"),
# llama-server ("exceeds the available context size", type exceed_context_size_error).
_CONTEXT_ERROR = re.compile(r"context length|context window|context size|max_model_len|exceed_context_size",
                            re.IGNORECASE)
_CONTEXT_NUMBER = re.compile(r"(?:maximum context length is|context window of|context size \(|n_ctx[^0-9]*|"
                             r"max_model_len[^0-9]*)\s*(\d+)", re.IGNORECASE)


@dataclass
class Upstream:
    """One server of the pool. `label` is host:port: safe to show clients (no path, no credentials)."""

    root: str  # the server's root URL: "/v1" and a trailing "/" are removed
    label: str
    down_until: float = 0.0  # 0 while it answers
    failures: int = 0  # in a row; 0 once it answers again
    # Counters since start (per-upstream metrics): requests sent, errors, open now, seconds of finished requests.
    requests: int = 0
    errors: int = 0
    in_flight: int = 0
    seconds_total: float = 0.0
    seconds_count: int = 0
    gate: SlotGate | None = None  # with upstream_slots: holds the requests beyond its slots

    @classmethod
    def from_url(cls, url: str) -> Upstream:
        parts = urlsplit(url.strip())
        root = url.strip().rstrip("/")
        if root.endswith("/v1"):
            root = root[: -len("/v1")]
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return cls(root=root, label=f"{parts.hostname}:{port}")

    @property
    def up(self) -> bool:
        return self.down_until == 0.0


class UpstreamPool:
    """Upstreams in the router's order (prefix affinity or round-robin); one that fails is skipped until it
    answers again.

    A failed upstream is tried again by one request after RETRY_DOWN_AFTER seconds (and again
    after each further failure); when every upstream is down, the one due soonest is still tried,
    so a recovered pool is noticed at once instead of failing requests without asking.
    """

    def __init__(self, urls, *, retry_after: float = RETRY_DOWN_AFTER, routing: str = "round_robin", slots: int = 0):
        self.upstreams = [Upstream.from_url(url) for url in urls]
        if not self.upstreams:
            raise ValueError("at least one upstream URL is needed")
        for upstream in self.upstreams:
            upstream.gate = SlotGate(slots) if slots else None
        self.slots = slots
        self.retry_after = retry_after
        self.router = Router([upstream.root for upstream in self.upstreams], policy=routing)
        self._homes: dict[str, list[int]] = {}  # key -> [upstream index, its requests chosen there and not settled]
        # digest of a key -> the upstream its last request started on: its prompt is cached there, so it goes back
        # while that upstream is within the home bound, even after a bounded load or a full upstream sent it off its
        # hash. Digests, not keys: a key is a whole system message, and a client could send thousands of long ones.
        self._placed: OrderedDict[bytes, int] = OrderedDict()
        self._next = 0
        self._lock = threading.Lock()

    @property
    def label(self) -> str:
        return ", ".join(upstream.label for upstream in self.upstreams)

    def candidates(self, *, rotate: bool = True, key: str | None = None, begin: bool = False,
                   conversation: str | None = None) -> list[Upstream]:
        """The upstreams to try for one request, in order: answering ones (the router's order for `key`),
        then those due a retry.

        rotate=False (token counting) takes the upstreams as they stand without moving the rotation:
        otherwise a request's own tokenize call would take every other turn, and generations would all
        land on one upstream. begin=True counts the request in flight on the first one (as `began`) under the
        lock that chose it: concurrent requests see each other's load, so none goes past the bound.
        """
        now = time.monotonic()
        placement = _digest(key) if key is not None else None
        conversation_placement = _digest(conversation) if key is not None and conversation is not None else None
        with self._lock:
            if rotate:
                home = self._homes.get(key) if key is not None else None
                home_index = home[0] if home else self._placed.get(placement)
                order = self.router.order(key, [upstream.in_flight for upstream in self.upstreams], home=home_index,
                                          keys_at=self._keys_at() if self.slots else None, key_capacity=self.slots,
                                          conversation_home=self._placed.get(conversation_placement))
            else:
                order = [(self._next + step) % len(self.upstreams) for step in range(len(self.upstreams))]
            self._next = (order[0] + 1) % len(self.upstreams)
            rotated = [self.upstreams[index] for index in order]
            up = [upstream for upstream in rotated if upstream.up]
            due = [upstream for upstream in rotated if not upstream.up and upstream.down_until <= now]
            for upstream in due:  # one request at a time probes a down upstream
                upstream.down_until = now + self.retry_after
            chosen = up + due if up or due else [min(rotated, key=lambda upstream: upstream.down_until)]
            if begin:
                self._begin(chosen[0])
                if key is not None:  # the key's home while any of its requests is open (see settled)
                    index = self.upstreams.index(chosen[0])
                    home = self._homes.setdefault(key, [index, 0])
                    home[1] += home[0] == index
                    for digest in filter(None, (placement, conversation_placement)):
                        self._placed[digest] = index
                        self._placed.move_to_end(digest)
                    while len(self._placed) > PLACEMENTS_KEPT:
                        self._placed.popitem(last=False)
            return chosen

    def _keys_at(self) -> list[int]:
        """How many keys have requests open on each upstream (each holds a slot's prompt there)."""
        counts = Counter(index for index, _ in self._homes.values())
        return [counts[index] for index in range(len(self.upstreams))]

    def settled(self, key: str | None, upstream: Upstream) -> None:
        """A request chosen with begin=True for `key` on `upstream` is over (whatever became of it)."""
        with self._lock:
            home = self._homes.get(key)
            if home is not None and self.upstreams[home[0]] is upstream:
                home[1] -= 1
                if home[1] <= 0:
                    del self._homes[key]

    def succeeded(self, upstream: Upstream) -> None:
        with self._lock:
            upstream.down_until, upstream.failures = 0.0, 0

    def failed(self, upstream: Upstream) -> None:
        with self._lock:
            upstream.down_until = time.monotonic() + self.retry_after
            upstream.failures += 1

    def began(self, upstream: Upstream) -> None:
        """A request was sent to `upstream` (counts towards its load until `ended`)."""
        with self._lock:
            self._begin(upstream)

    def withdrawn(self, upstream: Upstream) -> None:
        """A request counted by `began` was not sent after all (cancelled first)."""
        with self._lock:
            upstream.requests -= 1
            upstream.in_flight -= 1

    def _begin(self, upstream: Upstream) -> None:
        upstream.requests += 1
        upstream.in_flight += 1

    def ended(self, upstream: Upstream, *, seconds: float, error: bool) -> None:
        with self._lock:
            upstream.in_flight -= 1
            upstream.seconds_total += seconds
            upstream.seconds_count += 1
            upstream.errors += int(error)

    def status(self) -> list[dict]:
        with self._lock:
            return [{"upstream": upstream.label, "up": upstream.up, "failures": upstream.failures,
                     "requests": upstream.requests, "errors": upstream.errors, "in_flight": upstream.in_flight,
                     "waiting": upstream.gate.waiting if upstream.gate else 0,
                     "seconds_total": round(upstream.seconds_total, 6), "seconds_count": upstream.seconds_count}
                    for upstream in self.upstreams]


def _digest(key: str) -> bytes:
    return hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def upstream_error_message(body: bytes) -> str:
    """The message of an OpenAI-style error body ({"error": {"message"}} or {"detail"}), else the raw text."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return body.decode("utf-8", "replace").strip()[:300]
    if isinstance(data, dict):
        error = data.get("error", data)
        if isinstance(error, dict):
            for key in ("message", "detail", "msg"):
                if isinstance(error.get(key), str):
                    return error[key][:300]
            return json.dumps(error)[:300]
        if isinstance(error, str):
            return error[:300]
    return json.dumps(data)[:300]


def upstream_client_message(body: bytes, status: int) -> str:
    """What a client may read of an upstream's rejection: the error's own message when it is one line of text.
    A validation error's structure or a raw body can echo the request, whose first message is the character's
    system prompt (FastAPI's 422 lists each invalid field with its `input`)."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        data = None
    error = data.get("error", data) if isinstance(data, dict) else None
    message = next((error[key] for key in ("message", "msg") if isinstance(error, dict) and
                    isinstance(error.get(key), str)), None)
    if message is None and isinstance(error, dict) and isinstance(error.get("detail"), str):
        message = error["detail"]
    if message is None or "\n" in message.strip():
        return f"HTTP {status} (the details are in the server's log)."
    return message.strip()[:300]


def _upstream_counts(body: bytes) -> tuple[int, int] | None:
    """(prompt tokens, context size) from llama-server's error fields n_prompt_tokens and n_ctx, if present."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, UnicodeDecodeError, AttributeError):
        return None
    if not isinstance(error, dict):
        return None
    counts = error.get("n_prompt_tokens"), error.get("n_ctx")
    if all(isinstance(count, int) and not isinstance(count, bool) and count > 0 for count in counts):
        return counts
    return None


def is_context_error(status: int, body: bytes) -> bool:
    if status not in (400, 413, 422):
        return False
    text = body.decode("utf-8", "replace")
    return "context_length_exceeded" in text or bool(_CONTEXT_ERROR.search(text))


def error_for_status(*, model: str, upstream: Upstream, status: int, body: bytes, prompt_tokens: int,
                     context_length: int) -> EngineError:
    """The engine error for an upstream's non-200 answer that no other upstream would answer differently (4xx)."""
    if is_context_error(status, body):
        counted = _upstream_counts(body)
        if counted:  # llama-server says how many tokens it counted and how many its slot holds
            return ContextOverflow(*counted)
        found = _CONTEXT_NUMBER.search(body.decode("utf-8", "replace"))
        return ContextOverflow(prompt_tokens, int(found.group(1)) if found else context_length)
    if status in (401, 403):
        return ModelUnavailable(model, upstream.label, f"the upstream server refused our API key (HTTP {status}); "
                                                       "check api_key_env.")
    if status == 404:
        return ModelUnavailable(model, upstream.label, "the upstream server does not serve this model or API "
                                                       "(HTTP 404); check remote_model and base_url.")
    if status in (400, 422):
        logger.info("upstream %s rejected a request (HTTP %s): %s", upstream.label, status, upstream_error_message(body))
        return InvalidRequest(f"The upstream server rejected the request: {upstream_client_message(body, status)}")
    return ModelUnavailable(model, upstream.label, f"the upstream server answered HTTP {status}.")
