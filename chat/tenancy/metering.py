"""One generation's tenancy bookkeeping: admitted under the caller's quotas (its slots taken, its most
tokens reserved), then settled exactly once when it ends (completed, stopped at max_tokens, cancelled or
failed): its slots released, its reservation replaced by the tokens used, its UsageRecord written.

`MeteredGeneration` wraps an engine Generation and settles when iteration ends, on the reader's
side and after the last token (never per token). An async reader that finishes awaits the write; a
cancelled or failed one, or a generation never read (its client left first), hands it to a short
thread so that nothing blocks the event loop or a closing request.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass, field

from asgiref.sync import sync_to_async
from django.db import connection

from chat.models import UsageRecord

from .owners import Tenant
from .quotas import Hold, quota_admit
from .usage import usage_record_write

logger = logging.getLogger("llmsite.usage")

Outcome = UsageRecord.Outcome


def outcome_of(finish_reason: str | None) -> str:
    if finish_reason == "length":
        return Outcome.LENGTH
    if finish_reason == "cancelled":
        return Outcome.CANCELLED
    return Outcome.COMPLETED


@dataclass
class Meter:
    """Admission and the ledger entry of one generation."""

    tenant: Tenant
    model: str
    character_id: int | None
    prompt_tokens: int          # as composed; the completion's own count replaces it when there is one
    hold: Hold = field(default_factory=Hold)
    started: float = field(default_factory=time.monotonic)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    _settled: bool = False

    def _claim(self) -> bool:
        with self._lock:
            if self._settled:
                return False
            self._settled = True
            return True

    def abandon(self) -> None:
        """Give the slots and tokens back without a ledger entry: the engine refused the request before generating."""
        if self._claim():
            self.hold.settle(0)

    def settle(self, *, outcome: str, completion=None, completion_tokens: int = 0) -> None:
        """Release the slots, charge the tokens used, write the ledger row; once, whatever calls it first."""
        if not self._claim():
            return
        prompt_tokens = completion.prompt_tokens if completion is not None else self.prompt_tokens
        completion_tokens = completion.completion_tokens if completion is not None else completion_tokens
        try:
            self.hold.settle(prompt_tokens + completion_tokens)
        finally:
            usage_record_write(tenant=self.tenant, model=self.model, character_id=self.character_id,
                               prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                               duration=time.monotonic() - self.started, outcome=outcome)


def meter_open(*, tenant: Tenant, model: str, character=None, prompt_tokens: int = 0, max_tokens: int = 0,
               sequences: int = 1, admitted: Hold | None = None) -> Meter:
    """Admit a generation of `sequences` sequences under `tenant`'s quotas (raises QuotaExceeded), reserving
    prompt_tokens + max_tokens × sequences; `admitted`: what it was admitted with earlier (a background job,
    when it was submitted)."""
    hold = admitted if admitted is not None else quota_admit(tenant, slots=sequences,
                                                             tokens=prompt_tokens + max_tokens * sequences)
    return Meter(tenant=tenant, model=model, character_id=getattr(character, "pk", None),
                 prompt_tokens=prompt_tokens, hold=hold)


def _settle_partial(meter: Meter, parts: list, count_tokens, outcome: str, completion) -> None:
    if completion is not None:
        meter.settle(outcome=outcome_of(completion.finish_reason) if outcome == Outcome.COMPLETED else outcome,
                     completion=completion)
        return
    text = "".join(parts)
    try:
        tokens = count_tokens(text) if text else 0
    except Exception:  # counting is bookkeeping too: a failure must not lose the slot
        logger.warning("could not count the tokens of a %s reply", outcome, exc_info=True)
        tokens = 0
    meter.settle(outcome=outcome, completion_tokens=tokens)


def _settle_detached(meter: Meter, parts: list, count_tokens, outcome: str, generation) -> None:
    """Settle in a thread of its own (it writes to the database), closing that thread's connection."""
    def run():
        result = getattr(generation, "result", None)
        # Never read, and ended without a completion: the engine failed it (e.g. it waited past queue_timeout).
        ended_failed = generation is not None and result is None and getattr(generation, "done", False)
        try:
            _settle_partial(meter, parts, count_tokens, Outcome.FAILED if ended_failed else outcome, result)
        finally:
            connection.close()

    if meter._settled:
        return
    threading.Thread(target=run, name="usage-settle", daemon=True).start()


class MeteredGeneration:
    """An engine Generation whose end settles its Meter (the other attributes are the generation's)."""

    def __init__(self, generation, meter: Meter, *, count_tokens):
        self._generation = generation
        self._meter = meter
        self._count_tokens = count_tokens
        self._parts: list[str] = []
        # Never read (the client left before the first chunk): settled when dropped.
        self._finalizer = weakref.finalize(self, _settle_detached, meter, self._parts, count_tokens,
                                           Outcome.CANCELLED, generation)
        self._finalizer.atexit = False  # no thread can start while the interpreter exits
        self._read = False

    def __getattr__(self, name):
        return getattr(self._generation, name)

    def cancel(self) -> None:
        self._generation.cancel()
        if not self._read:  # nobody will read it to the end: settle now, not when the garbage collector finds it
            self._finalizer()  # (a failed request's traceback can hold it in a cycle for many seconds)

    def __iter__(self):
        self._read = True
        outcome = Outcome.CANCELLED
        try:
            for delta in self._generation:
                self._parts.append(delta)
                yield delta
            outcome = Outcome.COMPLETED
        except Exception:
            outcome = Outcome.FAILED
            raise
        finally:
            _settle_partial(self._meter, self._parts, self._count_tokens, outcome,
                            self._generation.result if outcome == Outcome.COMPLETED else None)

    async def __aiter__(self):
        self._read = True
        outcome = Outcome.CANCELLED
        try:
            async for delta in self._generation:
                if delta is not None:  # None: a keep-alive is due
                    self._parts.append(delta)
                yield delta
            outcome = Outcome.COMPLETED
            await sync_to_async(_settle_partial)(self._meter, self._parts, self._count_tokens, outcome,
                                                 self._generation.result)
        except Exception:
            outcome = Outcome.FAILED
            raise
        finally:
            if outcome != Outcome.COMPLETED:
                _settle_detached(self._meter, self._parts, self._count_tokens, outcome, None)
