"""The slot gate (chat/engine/slot_gate.py): at most `slots` requests at an upstream, and a freed slot goes to a
request whose prefix it holds, else to one whose prefix is not being evaluated, else to the oldest."""

from __future__ import annotations

import threading
import time

import pytest

from chat.engine.slot_gate import SlotGate


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def enter(gate: SlotGate, key: str, granted: list, stop=lambda: False, owner: str = "") -> threading.Thread:
    """acquire() in a thread that records its key once let through; returns when it is waiting or through."""
    def run():
        if gate.acquire(key, owner=owner, stop=stop):
            granted.append(key)

    before = gate.waiting
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while gate.waiting == before and len(granted) == 0 and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.001)
    return thread


def settle(granted: list, count: int, timeout: float = 5.0) -> list:
    """The keys let through once `count` are (or `timeout` passed: a test that expects fewer gives a short one)."""
    deadline = time.monotonic() + timeout
    while len(granted) < count and time.monotonic() < deadline:
        time.sleep(0.001)
    time.sleep(0.02)  # nothing more gets through
    return list(granted)


def test_at_most_slots_requests_run_and_a_release_lets_the_next_through():
    gate, granted = SlotGate(2), []
    for key in ("a", "b", "c"):
        enter(gate, key, granted)
    assert settle(granted, 3, timeout=0.3) == ["a", "b"] and gate.waiting == 1
    gate.release("a")
    assert settle(granted, 3) == ["a", "b", "c"] and gate.waiting == 0


def test_a_freed_slot_goes_to_a_waiting_request_whose_prefix_it_holds_before_older_ones():
    gate, granted = SlotGate(1), []
    enter(gate, "a", granted)
    for key in ("b", "c", "a"):  # a's second request arrives last
        enter(gate, key, granted)
    settle(granted, 1)
    gate.release("a")  # the idle slot holds a's prompt
    assert settle(granted, 2) == ["a", "a"]
    gate.release("a")
    assert settle(granted, 3)[-1] == "b"  # then the oldest


def test_two_idle_slots_holding_one_prefix_serve_two_of_its_waiting_requests():
    gate, granted = SlotGate(3), []
    for key in ("a", "a", "x"):
        enter(gate, key, granted)
    for key in ("b", "c", "a", "a"):
        enter(gate, key, granted)
    settle(granted, 3)
    releases = [threading.Thread(target=gate.release, args=("a",)) for _ in range(2)]
    for thread in releases:  # two slots freed in one step: both are known before either is handed out
        thread.start()
    assert settle(granted, 5)[3:] == ["a", "a"]


def test_a_prefix_being_evaluated_waits_behind_one_that_is_not():
    gate, granted = SlotGate(2), []
    enter(gate, "a", granted)
    enter(gate, "b", granted)
    enter(gate, "b", granted)  # b is running: a second b now would evaluate b's prompt twice
    enter(gate, "c", granted)
    settle(granted, 2)
    gate.release("a")  # the idle slot holds a, which nobody waits for: c goes before the older b
    assert settle(granted, 3) == ["a", "b", "c"]


def test_a_request_whose_prefix_is_running_waits_beside_a_free_slot_for_another_prefix_to_take_it():
    clock = Clock()
    gate, granted = SlotGate(2, hold=1.0, clock=clock), []
    enter(gate, "a", granted)
    enter(gate, "a", granted)  # a second a now would evaluate a's prompt beside the first
    assert settle(granted, 2, timeout=0.3) == ["a"] and gate.waiting == 1
    enter(gate, "b", granted)  # another prefix takes the free slot
    assert settle(granted, 3, timeout=0.3) == ["a", "b"] and gate.waiting == 1
    gate.release("a")  # the idle slot holds a's prompt: the held request takes it
    assert settle(granted, 3) == ["a", "b", "a"]


def test_a_held_request_goes_once_its_hold_is_over_when_no_other_prefix_came():
    clock = Clock()
    gate, granted = SlotGate(2, hold=1.0, clock=clock), []
    enter(gate, "a", granted)
    enter(gate, "a", granted)
    assert settle(granted, 2, timeout=0.3) == ["a"]
    clock.now = 1.0
    assert settle(granted, 2) == ["a", "a"]


def test_the_least_recently_used_idle_slot_is_the_one_a_new_prefix_takes():
    gate, granted = SlotGate(2), []
    enter(gate, "a", granted)
    enter(gate, "b", granted)
    settle(granted, 2)
    gate.release("a")
    gate.release("b")  # idle slots hold a (older) and b
    enter(gate, "c", granted)  # takes a's slot
    enter(gate, "x", granted)  # takes b's slot: both busy now
    settle(granted, 4)
    enter(gate, "b", granted)
    enter(gate, "a", granted)
    gate.release("c")  # idle: c only; neither a nor b is held any more, so the oldest goes
    assert settle(granted, 5)[-1] == "b"


def test_a_request_passed_over_slots_times_the_bound_goes_next_whatever_its_prefix():
    gate, granted = SlotGate(1, passes_per_slot=2), []
    enter(gate, "a", granted)
    enter(gate, "b", granted)  # b's prefix is never in the idle slot
    for _ in range(3):
        enter(gate, "a", granted)
    settle(granted, 1)
    for count in (2, 3, 4):
        gate.release("a")
        settle(granted, count)
    assert granted == ["a", "a", "a", "b"]  # b was passed twice (the bound: 2 x 1 slot), then went first
    gate.release("b")
    assert settle(granted, 5)[-1] == "a"


def test_a_waiting_request_that_is_cancelled_leaves_and_holds_no_slot():
    gate, granted, cancelled = SlotGate(1), [], threading.Event()
    enter(gate, "a", granted)
    waiting = enter(gate, "b", granted, stop=cancelled.is_set)
    cancelled.set()
    waiting.join(timeout=5)
    assert not waiting.is_alive() and gate.waiting == 0
    gate.release("a")
    enter(gate, "c", granted)
    assert settle(granted, 2) == ["a", "c"]


def test_at_least_one_slot():
    with pytest.raises(ValueError):
        SlotGate(0)


def test_a_freed_slot_goes_to_the_owner_with_fewest_running_then_the_one_let_through_least_recently():
    """One owner's queued requests all went before another's one (first come, first served): now the other owner's
    goes next, then they alternate."""
    gate, granted = SlotGate(1, settle=0), []
    enter(gate, "a0", granted, owner="A")
    for key in ("a1", "a2", "a3"):
        enter(gate, key, granted, owner="A")
    enter(gate, "b1", granted, owner="B")
    enter(gate, "b2", granted, owner="B")
    settle(granted, 1)
    for running, owner in (("a0", "A"), ("b1", "B"), ("a1", "A"), ("b2", "B")):
        gate.release(running, owner=owner)
        settle(granted, len(granted) + 1)
    assert granted == ["a0", "b1", "a1", "b2", "a2"]


def test_an_owner_whose_requests_are_all_held_does_not_keep_a_free_slot_from_another_owner():
    clock = Clock()
    gate, granted = SlotGate(2, settle=0, clock=clock), []
    enter(gate, "x", granted, owner="A")
    enter(gate, "x", granted, owner="B")  # B's turn (nothing running), but its prefix is being evaluated: held
    enter(gate, "y", granted, owner="A")  # A's may go now
    assert settle(granted, 2) == ["x", "y"]
