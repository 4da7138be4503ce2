"""One thread per model that owns its backend: admits requests, decodes them together, routes tokens.

Continuous batching: every loop iteration is one backend step over all active sequences; new
requests join between steps and finished or cancelled ones leave, freeing their slot at once.
Back-pressure: the queue in front of the slots is bounded (max_queue) and a request may wait in it
only queue_timeout seconds; beyond either it fails with EngineOverloaded (503 + Retry-After).
Waiting requests are admitted fairly between owners (chat/engine/admission.py), and one owner may hold
at most half of the queue's places, so a flood by one owner never fills it for the others.

Preemption: fair admission shares only the slots that free up, so an owner holding every slot with long
generations would keep the others waiting until queue_timeout. When another owner's request has waited
PREEMPT_AFTER_SECONDS for a full engine, the owner holding the most slots, if more than its fair share
(ceil(slots / owners active or waiting)) and not the owner that would be admitted, has its most recently started
sequence suspended (at most one per step; decoding, or between whole chunks of its prompt: Backend.suspendable): the backend keeps its state (Backend.suspend), it goes back
to the queue ahead of its owner's other requests, without a queue_timeout, and resumes where it stopped when
admitted again; its client's stream just pauses. A resumed sequence decodes RESUME_GRACE_TOKENS before it may be
suspended again. One owner alone is never preempted, nor is a backend that cannot suspend. With as many owners as
slots or more, each holds at most its share: then a request of an owner holding none that has waited half its
queue_timeout (SLICE_AFTER_SECONDS without one) takes the turn of the sequence running longest (time slicing).

Liveness: every step records a heartbeat. A scheduler that made no step for `stall_seconds` while
work waits is not `alive` (/ready fails, the registry replaces its engine). Closing never waits
long for a hung step: the thread frees the backend itself (`on_stopped`) whenever it gets out.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import Counter
from contextlib import contextmanager
from typing import Callable

from .admission import AdmissionQueue, owner_share, queue_bound
from .backends import Backend
from .errors import EngineClosed, EngineError, EngineOverloaded, GenerationFailed, SequencesFailed
from .faults import Faults
from .generation import wakes_batched
from .sequence import Sequence
from .types import Completion

logger = logging.getLogger(__name__)


MAX_RETRY_AFTER = 60  # seconds; a longer estimate is no better a hint to a client
STALL_SECONDS = 120.0  # a step longer than this while work waits means a hung scheduler (a long prefill step takes seconds)
# Another owner's request waits this long for a full engine before a slot is taken back for it: short replies
# just finish, and one owner's long generations cannot keep the others out.
PREEMPT_AFTER_SECONDS = 1.5
# With no queue_timeout: how long a request of an owner holding no slot waits before it takes a turn from the
# sequence running longest (time slicing, when there are as many owners as slots or more).
SLICE_AFTER_SECONDS = 30.0
RESUME_GRACE_TOKENS = 8  # tokens a resumed sequence decodes before it may be suspended again (no thrashing)


class Scheduler:
    def __init__(self, backend: Backend, model_name: str, *, max_queue: int = 0, queue_timeout: float = 0.0,
                 stall_seconds: float = STALL_SECONDS, faults: Faults | None = None):
        self._backend = backend
        self.stall_seconds = stall_seconds
        self.faults = faults  # test-only (chat/engine/faults.py)
        self._steps = 0
        self._heartbeat = time.monotonic()  # when the thread last made a step or woke up
        self._idle = False  # waiting for work (no heartbeat expected)
        self._stopped = False  # the thread's loop has ended
        self._on_stopped: Callable[[], None] | None = None
        self._model_name = model_name
        self._max_queue = max_queue  # 0 = unbounded
        self._queue_timeout = queue_timeout  # seconds; 0 = no limit
        self._queued_at: dict[Sequence, float] = {}
        self._started_at: dict[Sequence, float] = {}  # scheduler thread only
        self._start_order: dict[Sequence, int] = {}  # when each active sequence was first started (scheduler thread)
        self._running_since: dict[Sequence, float] = {}  # when each active sequence was last (re)admitted
        self._starts = itertools.count()
        self._grace: dict[Sequence, int] = {}  # resumed sequences: completion_tokens from which they may be suspended
        self._suspended: set[Sequence] = set()  # queued sequences that were running; changed under the lock
        self._last_preemption_step = -1
        self._generation_seconds: float | None = None  # moving average, for Retry-After
        self._crashed = False
        self._wakeup = threading.Condition()
        self._queued = AdmissionQueue()
        self._holds = 0  # admission_held blocks in progress
        self._active: list[Sequence] = []  # touched by the scheduler thread only
        self._admitting: list[Sequence] = []  # taken from the queue for the step being run
        self._closing = False
        self._counters = dict(
            prefix_hits=0, prefix_misses=0, tokens_generated=0, prompt_tokens=0, cached_prompt_tokens=0, peak_active=0,
            rejected_queue_full=0, rejected_queue_timeout=0, preemptions=0, resumptions=0,
        )
        self._busy_seconds = 0.0  # wall time of loop iterations that decoded something
        self._thread = threading.Thread(target=self._run, name=f"engine-{model_name}", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------------

    def submit(self, seq: Sequence) -> None:
        with self._wakeup:
            if self._closing:
                raise EngineClosed(f"Model {self._model_name!r} is shutting down.")
            # One owner holds at most half of the queue, and the last quarter waits for owners with nothing
            # queued: floods are refused while others still find a place.
            # Suspended sequences (running requests waiting for their slot back) take no place of the queue, and
            # neither do the requests that free slots take at the thread's next step (a burst that arrives before
            # it, or one admission_held keeps together): they are not waiting for a slot. (Which owner's requests
            # those are is the next step's choice, so an owner may hold up to `free` more places until then.)
            free = max(0, self._backend.max_sequences - len(self._active) - len(self._admitting)
                       - len(self._suspended))
            waiting = max(0, self._queued.waiting_of(seq.owner) - free
                          - sum(1 for s in self._suspended if s.owner == seq.owner))
            queued = max(0, len(self._queued) - len(self._suspended) - free)
            if self._max_queue and (queued >= queue_bound(self._max_queue, waiting) or
                                    waiting >= owner_share(self._max_queue)):
                self._counters["rejected_queue_full"] += 1
                raise EngineOverloaded(self._model_name, self._retry_after_locked())
            self._queued.append(seq)
            self._queued_at[seq] = time.monotonic()
            self._wakeup.notify()

    @contextmanager
    def admission_held(self):
        """No queued request is admitted during the block (running ones go on): what is submitted in it is
        admitted in one step, so sequences of one prompt find each other (n choices fork from the first)."""
        with self._wakeup:
            self._holds += 1
        try:
            yield
        finally:
            with self._wakeup:
                self._holds -= 1
                self._wakeup.notify()

    def wake(self) -> None:
        """Make the thread look at cancellations now, even when it is idle."""
        with self._wakeup:
            self._wakeup.notify()

    @property
    def alive(self) -> bool:
        """False once the scheduler thread has died, was closed, or is stalled: the engine must be replaced."""
        return self._thread.is_alive() and not self._crashed and not self._closing and not self.stalled

    @property
    def stalled(self) -> bool:
        """Work waits and the thread has made no step for longer than stall_seconds (a hung step)."""
        busy = bool(self._active or self._queued or self._admitting)
        return busy and not self._idle and time.monotonic() - self._heartbeat > self.stall_seconds

    def _retry_after_locked(self) -> int:
        """Seconds until a slot is likely free: the queue ahead, served `max_sequences` at a time."""
        per_request = self._generation_seconds or 1.0
        waves = (len(self._queued) + 1) / max(self._backend.max_sequences, 1)
        return max(1, min(MAX_RETRY_AFTER, math.ceil(waves * per_request)))

    def stats(self) -> dict:
        with self._wakeup:
            suspended = len(self._suspended)
            queued = len(self._queued) - suspended
        active = list(self._active)  # a copy: the scheduler thread changes the list
        return {
            "active": len(active),
            "active_by_owner": dict(Counter(seq.owner for seq in active)),
            "queued": queued,
            "suspended": suspended,  # preempted sequences waiting for a slot (not counted in queued)
            **self._counters,
            "busy_seconds": self._busy_seconds,
            **self._backend.stats(),
        }

    def close(self, on_stopped: Callable[[], None] | None = None) -> None:
        """Stop the thread; `on_stopped` (freeing the backend) runs once the thread is out of its loop.

        Waits for the thread at most `stall_seconds`: a hung step is not waited for; its requests fail
        now, and the thread runs `on_stopped` itself if it ever gets out.
        """
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
            if not self._stopped:
                self._on_stopped, on_stopped = on_stopped, None
            queued = self._queued.drain()
        closed = EngineClosed(f"Model {self._model_name!r} was shut down.")
        for seq in queued:
            seq.generation._push_error(closed)
        if on_stopped is not None:  # the thread ended earlier (crashed): nobody else will use the backend
            on_stopped()
        if threading.current_thread() is not self._thread:
            self._thread.join(0 if self.stalled else self.stall_seconds)
            if self._thread.is_alive():
                logger.error("scheduler of model %r is stuck in a step; its requests fail now", self._model_name)
                for seq in list(self._active) + list(self._admitting):
                    seq.generation._push_error(closed)  # later pushes of the thread are ignored

    # -- scheduler thread --------------------------------------------------------------------

    def _run(self) -> None:
        try:
            try:
                while self._next_step():
                    pass
            except BaseException:  # a bug here must not leave callers waiting forever
                self._crashed = True
                logger.exception("scheduler of model %r crashed", self._model_name)
                self._fail_all(GenerationFailed(self._model_name))
            else:
                self._fail_all(EngineClosed(f"Model {self._model_name!r} was shut down."))
        finally:
            with self._wakeup:
                self._stopped = True
                on_stopped, self._on_stopped = self._on_stopped, None
            if on_stopped is not None:
                on_stopped()

    def _next_step(self) -> bool:
        newcomers = self._take_newcomers()
        if newcomers is None:
            return False
        started = time.perf_counter()
        try:
            self._steps += 1
            if self.faults is not None and self.faults.step is not None:
                self.faults.step(self._steps)
            with wakes_batched():  # the step's tokens wake each event loop once
                self._advance(newcomers)
        finally:
            self._busy_seconds += time.perf_counter() - started
        self._admitting = []
        return True

    def _advance(self, newcomers: list[Sequence]) -> None:
        """Admit newcomers, drop cancelled sequences, decode one step and route its tokens."""
        for seq in newcomers:
            self._start(seq)
        for seq in [s for s in self._active if s.generation.cancel_requested]:
            self._finish(seq, "cancelled")
        if not self._active:
            return
        try:
            sampled = self._backend.step(self._active)
        except SequencesFailed as partial:  # the backend could tell which sequences the failure concerns
            for seq in partial.failed:
                self._finish(seq, error=partial.errors.get(seq) or GenerationFailed(self._model_name))
            sampled = partial.sampled
        except Exception:
            logger.exception("decode step of model %r failed", self._model_name)
            for seq in list(self._active):
                self._finish(seq, error=GenerationFailed(self._model_name))
            return
        for seq, token in sampled:
            try:
                self._accept(seq, token)
            except Exception:  # one bad sequence must not take the others down
                logger.exception("model %r: handling a sampled token failed", self._model_name)
                if seq in self._active:
                    self._finish(seq, error=GenerationFailed(self._model_name))

    def _take_newcomers(self) -> list[Sequence] | None:
        """Queued requests that fit into free slots; blocks while there is nothing to do. None = stop."""
        while True:
            ended: list[tuple[Sequence, EngineError | None]] = []  # told after the lock is released
            victim: Sequence | None = None
            with self._wakeup:
                if self._closing:
                    return None
                # Requests cancelled while still queued leave without ever taking a slot (or, suspended, without
                # taking one again).
                for seq in [s for s in self._queued if s.generation.cancel_requested]:
                    self._queued.remove(seq)
                    self._queued_at.pop(seq, None)
                    ended.append((seq, None))
                self._expire_queued_locked(ended)
                admitting = self._queued and not self._holds
                if not ended and not (self._active or admitting):
                    self._idle = True
                    self._wakeup.wait()
                    self._heartbeat = time.monotonic()  # first: `stalled` reads both without the lock
                    self._idle = False
                self._heartbeat = time.monotonic()
                admitting = self._queued and not self._holds
                if not ended and (self._active or admitting):
                    active = Counter(seq.owner for seq in self._active)
                    newcomers = []
                    for _ in range(min(self._backend.max_sequences - len(self._active),
                                       len(self._queued) if admitting else 0)):
                        seq = self._queued.pop_next(active)
                        active[seq.owner] += 1
                        self._queued_at.pop(seq, None)
                        newcomers.append(seq)
                    # Set under the lock: neither queued nor active yet, they must neither count as free slots in
                    # submit() nor be missed by _fail_all.
                    self._admitting = newcomers
                    if newcomers or not admitting:
                        return newcomers
                    victim = self._preemption_victim_locked(active)
                    if victim is None:
                        return newcomers
            if victim is not None:
                self._suspend(victim)  # then admit into the slot it freed
                continue
            for seq, error in ended:
                if seq in self._suspended:  # it held sampler state: the backend frees it
                    self._forget_suspended(seq)
                if error is None:
                    seq.generation._push_done(self._completion(seq, "cancelled"))
                else:
                    seq.generation._push_error(error)

    def _preemption_victim_locked(self, active: Counter) -> Sequence | None:
        """The sequence to suspend so that a waiting owner gets a slot, or None (see the module's docstring)."""
        slots = self._backend.max_sequences
        if (not self._backend.can_suspend or self._last_preemption_step == self._steps
                or len(self._active) < slots):
            return None
        waiting = [seq for seq in self._queued if seq not in self._suspended]
        owners = set(active) | {seq.owner for seq in self._queued}
        if not waiting or len(owners) < 2:
            return None
        fair = math.ceil(slots / len(owners))
        due = time.monotonic() - PREEMPT_AFTER_SECONDS
        for owner, held in active.most_common():
            if held <= fair:
                break
            if not any(seq.owner != owner and self._queued_at.get(seq, due) < due for seq in waiting):
                continue  # nobody else has waited long enough
            if self._queued.next_owner(active - Counter({owner: 1})) == owner:
                continue  # the slot would go back to the same owner
            candidates = [seq for seq in self._active if seq.owner == owner and self._may_suspend(seq)]
            if candidates:
                self._last_preemption_step = self._steps
                return max(candidates, key=lambda seq: self._start_order.get(seq, -1))
        return self._time_slice_victim_locked(active, waiting)

    def _time_slice_victim_locked(self, active: Counter, waiting: list[Sequence]) -> Sequence | None:
        """With as many owners as slots or more, each holds at most its share: a request of an owner holding none
        that has waited half its queue_timeout (SLICE_AFTER_SECONDS without one) takes the slot of the sequence
        running longest since it was (re)admitted, rather than wait out the timeout into a 503."""
        after = max(PREEMPT_AFTER_SECONDS, self._queue_timeout / 2) if self._queue_timeout else SLICE_AFTER_SECONDS
        due = time.monotonic() - after
        starving = {seq.owner for seq in waiting if not active.get(seq.owner) and self._queued_at.get(seq, due) < due}
        if not starving:
            return None
        candidates = [seq for seq in self._active if seq.owner not in starving and self._may_suspend(seq)
                      and self._queued.next_owner(active - Counter({seq.owner: 1})) != seq.owner]
        if not candidates:
            return None
        self._last_preemption_step = self._steps
        return min(candidates, key=lambda seq: self._running_since.get(seq, 0.0))

    def _may_suspend(self, seq: Sequence) -> bool:
        return (not seq.generation.cancel_requested and seq.completion_tokens >= self._grace.get(seq, 0)
                and self._backend.suspendable(seq))

    def _suspend(self, seq: Sequence) -> None:
        """Take `seq`'s slot away; it waits in the queue, ahead of its owner's other requests, to go on later."""
        held = sum(1 for other in self._active if other.owner == seq.owner)
        try:
            self._backend.suspend(seq)
        except Exception:
            logger.exception("model %r could not suspend a sequence", self._model_name)
            self._finish(seq, error=GenerationFailed(self._model_name))
            return
        self._active.remove(seq)
        self._running_since.pop(seq, None)
        self._counters["preemptions"] += 1
        logger.info("model %r: suspended a sequence of owner %s (it held %d of %d slots; %d tokens generated) "
                    "for another owner's waiting request", self._model_name, seq.owner or "-", held,
                    self._backend.max_sequences, seq.completion_tokens)
        with self._wakeup:
            self._queued.requeue(seq)  # not in _queued_at: no queue_timeout
            self._suspended.add(seq)

    def _forget_suspended(self, seq: Sequence) -> None:
        """A suspended sequence that will not resume (cancelled): the backend frees what it kept."""
        with self._wakeup:
            self._suspended.discard(seq)
        for table in (self._started_at, self._start_order, self._grace, self._running_since):
            table.pop(seq, None)
        try:
            self._backend.release(seq)
        except Exception:
            logger.exception("model %r could not release a suspended sequence", self._model_name)

    def _expire_queued_locked(self, ended: list) -> None:
        """Fail requests that waited longer than queue_timeout: a clear 503 beats a hang."""
        if not self._queue_timeout:
            return
        deadline = time.monotonic() - self._queue_timeout
        for seq in [s for s in self._queued if self._queued_at.get(s, deadline) < deadline]:
            self._queued.remove(seq)
            self._queued_at.pop(seq, None)
            self._counters["rejected_queue_timeout"] += 1
            ended.append((seq, EngineOverloaded(self._model_name, self._retry_after_locked(), waited=True)))

    def _start(self, seq: Sequence) -> None:
        resumed = seq in self._suspended
        if resumed:
            with self._wakeup:
                self._suspended.discard(seq)
        try:
            self._backend.start(seq)
        except Exception as error:
            for table in (self._started_at, self._start_order, self._grace, self._running_since):
                table.pop(seq, None)
            if not isinstance(error, EngineError):
                logger.exception("model %r could not start a sequence", self._model_name)
                error = GenerationFailed(self._model_name)
            try:
                self._backend.release(seq)  # whatever start claimed before it failed (a no-op if nothing)
            except Exception:
                logger.exception("model %r could not release a sequence that failed to start", self._model_name)
            seq.generation._push_error(error)
            return
        self._active.append(seq)
        self._running_since[seq] = time.monotonic()
        self._counters["peak_active"] = max(self._counters["peak_active"], len(self._active))
        if resumed:  # its prompt and first start were counted once
            self._counters["resumptions"] += 1
            self._grace[seq] = seq.completion_tokens + RESUME_GRACE_TOKENS
            return
        seq.generation._mark_admitted()
        self._started_at[seq] = time.monotonic()
        self._start_order[seq] = next(self._starts)
        self._counters["prompt_tokens"] += len(seq.prompt_tokens)
        self._counters["cached_prompt_tokens"] += seq.cached_prompt_tokens
        self._counters["prefix_hits" if seq.cached_prompt_tokens else "prefix_misses"] += 1

    def _accept(self, seq: Sequence, token: int) -> None:
        if self._backend.is_end_of_generation(token):
            self._finish(seq, "stop")
            return
        seq.completion_tokens += 1
        self._counters["tokens_generated"] += 1
        piece = self._backend.token_bytes(token)
        delta = seq.assembler.feed(piece)
        track, record, seq.token_logprob = seq.logprob_track, seq.token_logprob, None  # never reused for a later token
        if track is not None and record is not None:
            track.add(record, len(piece))
        seq.generation._push_text(delta, track.release(delta) if track is not None else ())
        if seq.assembler.stopped:
            self._finish(seq, "stop")
        elif seq.completion_tokens >= seq.max_new_tokens:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str = "", error: EngineError | None = None) -> None:
        self._active.remove(seq)
        self._start_order.pop(seq, None)
        self._running_since.pop(seq, None)
        self._grace.pop(seq, None)
        started = self._started_at.pop(seq, None)
        if started is not None and reason in ("stop", "length"):
            seconds = time.monotonic() - started
            average = self._generation_seconds
            self._generation_seconds = seconds if average is None else 0.8 * average + 0.2 * seconds
        try:
            self._backend.release(seq)
        except Exception:
            logger.exception("model %r could not release a sequence", self._model_name)
        if error is not None:
            seq.generation._push_error(error)
            return
        if reason != "cancelled":  # a cancelled reader is gone; held-back text would go nowhere
            tail = seq.assembler.finish()
            seq.generation._push_text(tail, seq.logprob_track.finish(tail) if seq.logprob_track is not None else ())
        seq.generation._push_done(self._completion(seq, reason))

    def _completion(self, seq: Sequence, reason: str) -> Completion:
        return Completion(
            text=seq.assembler.text,
            finish_reason=reason,
            prompt_tokens=len(seq.prompt_tokens),
            completion_tokens=seq.completion_tokens,
            cached_prompt_tokens=seq.cached_prompt_tokens,
            logprobs=tuple(seq.logprob_track.released) if seq.logprob_track is not None else None,
        )

    def _fail_all(self, error: EngineError) -> None:
        for seq in list(self._active):
            try:
                self._finish(seq, error=error)
            except Exception:  # whatever broke the loop may break this too; the callers must still hear
                seq.generation._push_error(error)
        for seq in self._admitting:
            seq.generation._push_error(error)  # ignored by generations that already ended
        with self._wakeup:
            self._closing = True
            queued = self._queued.drain()
        for seq in queued:
            seq.generation._push_error(error)
