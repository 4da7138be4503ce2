"""A handle on one running request: text deltas flow from the scheduler thread to the caller."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from contextlib import contextmanager
from contextvars import ContextVar
from typing import AsyncIterator, Callable, Iterator

from .errors import EngineError
from .types import Completion

_TEXT, _DONE, _ERROR = "text", "done", "error"
# Generations created in the current context (see generations_started); None when nobody collects them.
_started_here: ContextVar[list | None] = ContextVar("generations_started_here", default=None)


@contextmanager
def generations_started():
    """Collect the Generations created inside this block (threads run via asgiref's sync_to_async included),
    so that a caller that loses its client can cancel what was started on its behalf."""
    started: list[Generation] = []
    token = _started_here.set(started)
    try:
        yield started
    finally:
        _started_here.reset(token)


class Generation:
    """Stream of text deltas of one request, readable from sync code (iterate) or async code.

    The scheduler thread pushes events; the reader pops them. Async readers wait on a future that
    the scheduler resolves through the reader's own event loop, so the loop is never blocked.
    Stopping iteration early (break, a closed async generator) cancels the request.
    """

    def __init__(self, id: str, *, on_cancel: Callable[[], None] = lambda: None, queued: bool = False,
                 admission_wait: float | None = None):
        self.id = id
        self.result: Completion | None = None
        self._on_cancel = on_cancel
        # A queued generation waits for a sequence slot; `wait_admitted` waits (at most admission_wait s) for it.
        self._admitted = not queued
        self.admission_wait = admission_wait
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._events: deque[tuple[str, object]] = deque()
        self._async_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._end_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = []  # woken by the final event only
        self._keepalive: float | None = None  # see keep_alive_every
        self._delivery_interval: float = 0.0  # see deliver_every
        self._cancel_requested = False
        self._closed = False  # a final event (done or error) was pushed
        self._unread_logprobs: list = []  # TokenLogprob records of text already handed to the reader
        collector = _started_here.get()
        if collector is not None:
            collector.append(self)

    def __repr__(self) -> str:
        state = self.result.finish_reason if self.result else ("cancelling" if self._cancel_requested else "running")
        return f"<Generation {self.id} {state}>"

    # -- reader side -------------------------------------------------------------------------

    def cancel(self) -> None:
        """Ask the scheduler to drop this request; idempotent, returns at once, safe from any thread.

        It sets a flag and wakes the scheduler: it never takes this generation's lock, which the
        scheduler holds while it pushes a token (a cancel from inside a push must not deadlock).
        """
        if self._cancel_requested or self._closed:
            return
        self._cancel_requested = True  # one attribute store: atomic, read by the scheduler between steps
        self._on_cancel()

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    @property
    def done(self) -> bool:
        return self._closed

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            while True:
                with self._ready:
                    while not self._events:
                        self._ready.wait()
                    kind, value = self._pop_locked()
                if kind == _TEXT:
                    yield value
                    continue
                finished = True
                if kind == _ERROR:
                    raise value
                return
        finally:
            if not finished:
                self.cancel()

    def keep_alive_every(self, seconds: float | None) -> None:
        """Make async readers also get None whenever `seconds` passed without a delta (time for a keep-alive)."""
        self._keepalive = seconds or None

    def deliver_every(self, seconds: float) -> None:
        """Make async readers get text at most every `seconds`: what is decoded meanwhile comes as one delta. The first
        delta and the end come at once. Each delta handed over costs the server (and its client) a write and a
        read per stream whatever its length, on the cores that decode."""
        self._delivery_interval = max(0.0, seconds or 0.0)

    async def __aiter__(self) -> AsyncIterator[str | None]:
        # Per delta: at most one future (and one timer with deliver_every); per stream: one keep-alive timer,
        # re-armed only when it fires.
        loop = asyncio.get_running_loop()
        interval = self._keepalive
        finished = False
        waiter = timer = None
        last = loop.time()

        def keepalive_due() -> None:
            nonlocal timer
            quiet = loop.time() - last
            if quiet >= interval and waiter is not None and not waiter.done():
                waiter.set_result(None)
            timer = loop.call_later(interval - quiet if quiet < interval else interval, keepalive_due)

        if interval:
            timer = loop.call_later(interval, keepalive_due)
        try:
            while True:
                with self._lock:
                    if self._events:
                        kind, value = self._pop_locked()
                        waiter = None
                    else:
                        waiter = loop.create_future()
                        self._async_waiters.append((loop, waiter))
                if waiter is not None:
                    await waiter
                    if interval and loop.time() - last >= interval and not self._events:
                        last = loop.time()
                        yield None
                    continue
                if kind == _TEXT:
                    last = loop.time()
                    yield value
                    if self._delivery_interval:
                        await self._hold_until(loop, last + self._delivery_interval)
                    continue
                finished = True
                if kind == _ERROR:
                    raise value
                return
        finally:
            if timer is not None:
                timer.cancel()
            if not finished:
                self.cancel()

    async def _hold_until(self, loop: asyncio.AbstractEventLoop, until: float) -> None:
        """Wait until `until` (loop time) or the final event, whichever comes first; text pushed meanwhile waits."""
        with self._lock:
            if self._closed:
                return
            waiter = loop.create_future()
            self._end_waiters.append((loop, waiter))
        timer = loop.call_at(until, _resolve, waiter)
        try:
            await waiter
        finally:
            timer.cancel()
            with self._lock:
                if (loop, waiter) in self._end_waiters:
                    self._end_waiters.remove((loop, waiter))

    async def wait_admitted(self) -> None:
        """Return once the request holds a sequence slot or has ended; raise its error if it failed before it was
        admitted (e.g. EngineOverloaded after queue_timeout). Gives up silently after `admission_wait` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.admission_wait if self.admission_wait else None
        while True:
            with self._lock:
                if self._admitted:  # what goes wrong from now on is reported by the stream itself
                    return
                if self._events:  # ended before it was admitted: refused, or cancelled
                    kind, value = self._events[0]
                    if kind == _ERROR:
                        raise value
                    return
                waiter = loop.create_future()
                self._async_waiters.append((loop, waiter))
            timeout = None if deadline is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                return
            try:
                await asyncio.wait_for(waiter, timeout)
            except asyncio.TimeoutError:
                return

    def take_logprobs(self) -> list:
        """The logprobs (TokenLogprob) of the tokens whose text this reader was handed since the last call."""
        with self._lock:
            taken, self._unread_logprobs = self._unread_logprobs, []
        return taken

    def _pop_locked(self) -> tuple[str, object]:
        kind, value = self._events[0]
        if kind != _TEXT:
            return kind, value  # final events stay, so iterating again ends (or raises) again
        # Deltas that piled up while the reader was busy are handed over as one.
        parts = []
        while self._events and self._events[0][0] == _TEXT:
            text, logprobs = self._events.popleft()[1]
            parts.append(text)
            self._unread_logprobs.extend(logprobs)
        return _TEXT, "".join(parts)

    # -- scheduler side ----------------------------------------------------------------------

    def _push_text(self, text: str, logprobs=()) -> None:
        """A text delta, with the logprobs of the tokens it completes (possibly with no text of its own)."""
        if text or logprobs:
            self._push(_TEXT, (text, tuple(logprobs)))

    def _push_done(self, completion: Completion) -> None:
        self.result = completion
        self._push(_DONE, completion)

    def _push_error(self, error: EngineError) -> None:
        self._push(_ERROR, error)

    def _mark_admitted(self) -> None:
        """The scheduler gave it a slot: a reader waiting in wait_admitted goes on."""
        with self._lock:
            self._admitted = True
            waiters, self._async_waiters = self._async_waiters, []
        _wake(waiters)

    def _push(self, kind: str, value: object) -> None:
        with self._ready:
            if self._closed:
                return
            self._events.append((kind, value))
            self._closed = kind != _TEXT
            self._ready.notify_all()
            waiters, self._async_waiters = self._async_waiters, []
            if self._closed:  # a reader holding back text (deliver_every) takes it and the end at once
                waiters, self._end_waiters = waiters + self._end_waiters, []
        _wake(waiters)


_step_wakes = threading.local()  # waiters to wake at the end of the scheduler step running in this thread


@contextmanager
def wakes_batched():
    """Readers woken during the block are woken at its end, with one call per event loop: a scheduler step
    pushes a token to every stream, and each wake of a loop from another thread is a write to its self-pipe."""
    _step_wakes.waiters = []
    try:
        yield
    finally:
        waiters, _step_wakes.waiters = _step_wakes.waiters, None
        by_loop: dict = {}
        for loop, waiter in waiters:
            by_loop.setdefault(loop, []).append(waiter)
        for loop, futures in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, futures)
            except RuntimeError:  # that loop is closed; nobody is waiting any more
                pass


def _wake(waiters) -> None:
    batched = getattr(_step_wakes, "waiters", None)
    if batched is not None:
        batched.extend(waiters)
        return
    for loop, waiter in waiters:
        try:
            loop.call_soon_threadsafe(_resolve, waiter)
        except RuntimeError:  # that loop is closed; nobody is waiting any more
            pass


def _resolve(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


def _resolve_all(waiters: list[asyncio.Future]) -> None:
    for waiter in waiters:
        _resolve(waiter)
