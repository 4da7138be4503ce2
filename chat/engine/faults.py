"""Fault injection for tests: a scheduler step that stalls, a sequence whose sampling fails. Off unless set.

In-process tests set `Faults` on an engine (`engine.faults = Faults(...)`); a live server in a child
process reads LLMSITE_ENGINE_FAULTS when an engine starts, e.g. "stall_step=40:1.5,fail_seed=4242":
step 40 of the scheduler sleeps 1.5 s; sampling any sequence whose seed is 4242 raises.
Never set it in production.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable

ENVIRONMENT_VARIABLE = "LLMSITE_ENGINE_FAULTS"


class InjectedFault(RuntimeError):
    """Raised by an injected fault (never by real code)."""


@dataclass
class Faults:
    step: Callable[[int], None] | None = None  # called with the step number at the start of each step
    sample: Callable[[object], None] | None = None  # called with a Sequence before it is sampled

    @classmethod
    def from_environment(cls) -> Faults | None:
        text = os.environ.get(ENVIRONMENT_VARIABLE, "").strip()
        if not text:
            return None
        faults = cls()
        for item in text.split(","):
            name, _, value = item.strip().partition("=")
            if name == "stall_step":
                number, _, seconds = value.partition(":")
                faults.step = _stall_at(int(number), float(seconds or 1))
            elif name == "fail_seed":
                faults.sample = _fail_seed(int(value))
            else:
                raise ValueError(f"{ENVIRONMENT_VARIABLE}: unknown fault {name!r}")
        return faults


def _stall_at(number: int, seconds: float) -> Callable[[int], None]:
    def stall(step: int) -> None:
        if step == number:
            time.sleep(seconds)

    return stall


def _fail_seed(seed: int) -> Callable[[object], None]:
    def fail(seq) -> None:
        if seq.params.seed == seed:
            raise InjectedFault(f"injected sampling fault (seed {seed})")

    return fail
