"""Preemption: an owner holding every slot with long generations gives one back to another owner's waiting request.

The model never ends a reply by itself (replies run to max_tokens) and every scheduler step is slowed down, so the
generations outlast the (shortened) preemption delay.
"""

from __future__ import annotations

import time

import pytest

from chat.engine import ModelRegistry, ModelSpec, SamplingParams
from chat.engine import scheduler as scheduler_module
from chat.engine.faults import Faults

from .conftest import TINY_CONTEXT

LONG = SamplingParams(max_tokens=150, temperature=0)
SHORT = SamplingParams(max_tokens=12, temperature=0)
PROMPTS = {"a1": "hello world what", "a2": "the capital of france is", "b": "yes no stop"}
STEP_SECONDS = 0.01
PREEMPT_AFTER = 0.2


@pytest.fixture(scope="module")
def endless_gguf(tmp_path_factory, write_tiny_gguf):
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-endless.gguf", seed=0, never_ends=True)


@pytest.fixture
def make_engine(endless_gguf, monkeypatch):
    """A fresh engine of 2 slots per call, its steps slowed down; closed afterwards."""
    monkeypatch.setattr(scheduler_module, "PREEMPT_AFTER_SECONDS", PREEMPT_AFTER, raising=False)
    registries = []

    def make(**options):
        options = {"context_length": TINY_CONTEXT, "parallel": 2, **options}
        registry = ModelRegistry([ModelSpec("tiny-preempt", str(endless_gguf), **options)])
        registries.append(registry)
        engine = registry.get()
        engine.steps = []  # the step numbers, as the scheduler makes them
        engine.faults = Faults(step=lambda number: (engine.steps.append(number), time.sleep(STEP_SECONDS)))
        return engine

    yield make
    for registry in registries:
        registry.close()


def alone(endless_gguf, prompt: str, params: SamplingParams):
    """The completion of `prompt` on a fresh engine with nothing else running."""
    registry = ModelRegistry([ModelSpec("tiny-alone", str(endless_gguf), context_length=TINY_CONTEXT, parallel=2)])
    try:
        return registry.get().generate(prompt, params)
    finally:
        registry.close()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def result(generation):
    for _ in generation:
        pass
    return generation.result


def owner_a_holds_both_slots(engine):
    """Owner A's two long generations, admitted together (a2 is the most recently started), decoding."""
    with engine.admission_held():
        a1 = engine.submit(PROMPTS["a1"], LONG, owner="A")
        a2 = engine.submit(PROMPTS["a2"], LONG, owner="A")
    wait_for(lambda: engine.stats()["tokens_generated"] >= 4)
    return a1, a2


def test_another_owner_gets_a_slot_soon_and_the_suspended_sequence_goes_on_unchanged(make_engine, endless_gguf):
    engine = make_engine(queue_timeout=60)
    a1, a2 = owner_a_holds_both_slots(engine)
    admitted_at = []
    b = engine.submit(PROMPTS["b"], SHORT, owner="B")
    submitted_at = engine.steps[-1]
    mark = b._mark_admitted  # both slots are busy: B cannot be admitted before this is in place
    b._mark_admitted = lambda: (admitted_at.append(engine.steps[-1]), mark())
    b_done = result(b)
    # B got a slot after about PREEMPT_AFTER of steps (~20), long before A's 150-token replies ended.
    assert admitted_at and admitted_at[0] - submitted_at < 100
    assert b_done.finish_reason == "length" and b_done.completion_tokens == SHORT.max_tokens
    assert not a2.done
    a1_done, a2_done = result(a1), result(a2)
    stats = engine.stats()
    assert stats["preemptions"] == 1 and stats["resumptions"] == 1
    assert stats["resumes_restored"] == 1  # its saved state, not a new evaluation
    assert stats["suspended"] == 0 and stats["suspended_sequences"] == 0 and stats["active"] == 0
    for done, name in ((a1_done, "a1"), (a2_done, "a2")):
        reference = alone(endless_gguf, PROMPTS[name], LONG)
        assert done.finish_reason == "length" and done.completion_tokens == LONG.max_tokens
        assert done.text == reference.text  # the pause left no trace in the reply


def test_a_resumed_sequences_saved_state_is_the_first_to_leave_the_prefix_cache(make_engine):
    """Kept for one sequence's resumption, the state must not push out prompt prefixes once it has served."""
    engine = make_engine(queue_timeout=60)
    cache = engine._backend._cache
    a1, a2 = owner_a_holds_both_slots(engine)
    cache.put((999,), "an older prompt's state", 1)
    b = engine.submit(PROMPTS["b"], SHORT, owner="B")
    result(b), result(a2), result(a1)
    assert engine.stats()["resumes_restored"] == 1
    saved = [entry for entry in cache._entries.values() if entry.reusable < len(entry.tokens)]
    assert len(saved) == 1  # a2's prompt and decoded tokens, saved when it was suspended
    assert next(iter(cache._entries.values())) is saved[0]  # first in LRU order, before the older prompt


def test_a_suspended_sequence_evaluated_again_goes_on_unchanged(make_engine, endless_gguf):
    engine = make_engine(prefix_cache_mb=0)  # nowhere to save its state: its tokens are evaluated again
    a1, a2 = owner_a_holds_both_slots(engine)
    b = engine.submit(PROMPTS["b"], SHORT, owner="B")
    assert result(b).finish_reason == "length"
    a2_done = result(a2)
    result(a1)
    assert engine.stats()["resumes_evaluated"] == 1
    assert a2_done.completion_tokens == LONG.max_tokens
    assert a2_done.text == alone(endless_gguf, PROMPTS["a2"], LONG).text


def test_a_reply_evaluated_again_never_becomes_reusable_by_another_owners_prompt(make_engine):
    """Evaluated again as a prompt, a resumed sequence's decoded tokens filled whole chunks: another owner could
    reuse them (and confirm a guess of the reply by cached_tokens), and they were written to state_dir."""
    engine = make_engine(prefix_cache_mb=0)
    with engine.admission_held():
        a1 = engine.submit(PROMPTS["a1"], LONG, owner="A")
        a2 = engine.submit(PROMPTS["a2"], LONG, owner="A")
    wait_for(lambda: engine.stats()["tokens_generated"] >= 2 * 80)  # more than a whole chunk of reply each
    result(engine.submit(PROMPTS["b"], SHORT, owner="B"))
    result(a2), result(a1)
    assert engine.stats()["resumes_evaluated"] == 1
    # Every prompt here is shorter than a chunk: nothing any slot holds may be reused by another prompt.
    assert [slot.exact for slot in engine._backend._slots] == [0, 0]


def test_one_owner_alone_is_never_preempted(make_engine):
    engine = make_engine()
    generations = [engine.submit(PROMPTS["a1"], SamplingParams(max_tokens=60, temperature=0), owner="A")
                   for _ in range(4)]  # twice the slots: two wait well past the preemption delay
    results = [result(generation) for generation in generations]
    assert all(done.completion_tokens == 60 for done in results)
    assert engine.stats()["preemptions"] == 0


def test_an_owner_within_its_fair_share_is_not_preempted(make_engine):
    engine = make_engine()
    a = engine.submit(PROMPTS["a1"], SamplingParams(max_tokens=80, temperature=0), owner="A")
    b = engine.submit(PROMPTS["b"], SamplingParams(max_tokens=80, temperature=0), owner="B")
    wait_for(lambda: engine.stats()["active"] == 2)
    c = engine.submit(PROMPTS["a2"], SHORT, owner="C")  # 2 slots, 3 owners: a share of 1, which A and B hold
    for generation in (a, b, c):
        result(generation)
    assert engine.stats()["preemptions"] == 0


def test_with_more_owners_than_slots_a_waiting_owner_gets_a_turn_before_its_queue_timeout(make_engine, endless_gguf):
    """Each of A and B holds its share (one of two slots): C's request used to wait out queue_timeout into a 503.
    After half of it, the sequence running longest is suspended for C (time slicing) and goes on afterwards."""
    engine = make_engine(queue_timeout=1.0)  # the replies below take about 1.5 s
    a = engine.submit(PROMPTS["a1"], LONG, owner="A")
    wait_for(lambda: engine.stats()["active"] == 1)
    b = engine.submit(PROMPTS["a2"], LONG, owner="B")
    wait_for(lambda: engine.stats()["active"] == 2)
    c = engine.submit(PROMPTS["b"], SHORT, owner="C")
    assert result(c).completion_tokens == SHORT.max_tokens  # not EngineOverloaded
    a_done, b_done = result(a), result(b)
    assert engine.stats()["preemptions"] == 1
    assert a_done.completion_tokens == b_done.completion_tokens == LONG.max_tokens
    assert a_done.text == alone(endless_gguf, PROMPTS["a1"], LONG).text  # A ran longest: it gave its turn


def test_a_suspended_sequences_usage_counts_its_prompt_once_and_every_token(make_engine, endless_gguf):
    params = SamplingParams(max_tokens=150, temperature=0, logprobs=2)
    engine = make_engine()
    with engine.admission_held():
        a1 = engine.submit(PROMPTS["a1"], params, owner="A")
        a2 = engine.submit(PROMPTS["a2"], params, owner="A")
    wait_for(lambda: engine.stats()["tokens_generated"] >= 4)
    b = engine.submit(PROMPTS["b"], SHORT, owner="B")
    result(b)
    a2_done, a1_done = result(a2), result(a1)
    reference = alone(endless_gguf, PROMPTS["a2"], params)
    assert engine.stats()["preemptions"] == 1
    assert (a2_done.prompt_tokens, a2_done.completion_tokens, a2_done.cached_prompt_tokens) == (
        reference.prompt_tokens, reference.completion_tokens, reference.cached_prompt_tokens)
    assert [record.token for record in a2_done.logprobs] == [record.token for record in reference.logprobs]
    stats = engine.stats()
    assert stats["prompt_tokens"] == a1_done.prompt_tokens + a2_done.prompt_tokens + b.result.prompt_tokens
    assert stats["tokens_generated"] == 2 * params.max_tokens + SHORT.max_tokens
    assert stats["prefix_hits"] + stats["prefix_misses"] == 3  # a resumption is no new admission


def test_a_sequence_cancelled_while_suspended_ends_and_frees_everything(make_engine):
    engine = make_engine()
    a1, a2 = owner_a_holds_both_slots(engine)
    b = engine.submit(PROMPTS["b"], SamplingParams(max_tokens=60, temperature=0), owner="B")
    wait_for(lambda: engine.stats()["suspended"] == 1)
    text_before = a2.result  # nothing yet: it is not over
    assert text_before is None
    a2.cancel()  # its client left while it waited for its slot
    wait_for(lambda: a2.done)
    assert a2.result.finish_reason == "cancelled"
    assert 0 < a2.result.completion_tokens < LONG.max_tokens
    stats = engine.stats()
    assert stats["suspended"] == 0 and stats["suspended_sequences"] == 0 and stats["queued"] == 0
    assert result(b).completion_tokens == 60 and result(a1).completion_tokens == LONG.max_tokens
    wait_for(lambda: engine.stats()["active"] == 0)
    assert engine.stats()["resumptions"] == 0
    # Both slots serve new requests.
    assert result(engine.submit(PROMPTS["a2"], SHORT, owner="A")).completion_tokens == SHORT.max_tokens


def test_n_choices_of_one_owner_holding_every_slot_let_another_owner_in(make_engine, endless_gguf):
    """What a chat completion with n=2 does on 2 slots: two sequences of one prompt, admitted together (forked)."""
    choices = [SamplingParams(max_tokens=150, temperature=0.8, seed=seed) for seed in (1, 2)]

    def run(engine, other: bool):
        with engine.admission_held():
            generations = [engine.submit(PROMPTS["a1"], params, owner="A") for params in choices]
        if other:
            wait_for(lambda: engine.stats()["tokens_generated"] >= 4)
            b = engine.submit(PROMPTS["b"], SHORT, owner="B")
            assert result(b).completion_tokens == SHORT.max_tokens
            assert not all(generation.done for generation in generations)  # B did not wait for the choices
        return [result(generation) for generation in generations]

    engine = make_engine()
    preempted = run(engine, other=True)
    assert engine.stats()["preemptions"] == 1 and engine.stats()["forked_sequences"] == 1
    reference = make_engine()
    assert [done.text for done in preempted] == [done.text for done in run(reference, other=False)]
    assert all(done.completion_tokens == 150 and done.finish_reason == "length" for done in preempted)


NUMBERS_BASE = "Here is a long list of facts about the sea, ships and sailors. " * 40  # ~620 tokens


@pytest.mark.smollm2
def test_smollm2_a_sequence_evaluated_again_on_resume_keeps_its_exact_logprobs(smollm2_gguf, monkeypatch):
    """Its saved state gone, a resumed sequence's prompt is evaluated again as a cold prompt is and its decoded
    tokens row by row, as they were decoded: every logprob after the pause equals a run never paused. (Evaluated
    as one prompt in tiled chunks, the logprobs after the pause differed at every token, by up to 0.04.)"""
    monkeypatch.setattr(scheduler_module, "PREEMPT_AFTER_SECONDS", PREEMPT_AFTER, raising=False)
    params = SamplingParams(max_tokens=160, temperature=0, logprobs=0)
    # Raw prompts the model continues by counting: replies that run to max_tokens, past several 64-token chunks.
    prompts = [NUMBERS_BASE + "Now the numbers: " + ", ".join(str(n) for n in range(start, start + 12)) + ","
               for start in (101, 310)]

    def fresh():
        return ModelRegistry([ModelSpec("smol-resume", str(smollm2_gguf), context_length=2048, parallel=2,
                                        prefix_cache_mb=0)])  # nowhere to save a state: evaluated again

    registry = fresh()
    try:
        reference = [registry.get().generate(prompt, params).logprobs for prompt in prompts]
    finally:
        registry.close()
    registry = fresh()
    try:
        engine = registry.get()
        with engine.admission_held():
            a1, a2 = (engine.submit(prompt, params, owner="A") for prompt in prompts)
        wait_for(lambda: engine.stats()["tokens_generated"] >= 100)
        assert result(engine.submit(PROMPTS["b"], SHORT, owner="B")).finish_reason == "length"
        paused = [result(a1).logprobs, result(a2).logprobs]
        stats = engine.stats()
        assert stats["preemptions"] == 1 and stats["resumes_evaluated"] == 1
    finally:
        registry.close()
    for done, cold in zip(paused, reference):
        assert len(done) == len(cold) == params.max_tokens
        assert [(t.token, t.logprob) for t in done] == [(t.token, t.logprob) for t in cold]


@pytest.mark.parametrize("saved", [True, False], ids=["chunks-saved", "evaluated-again"])
def test_a_prompt_still_being_evaluated_gives_its_slot_to_another_owner(make_engine, endless_gguf, caplog, saved):
    """An owner's long prompts held every slot until they were all evaluated (only decoding sequences could be
    suspended): another owner waited out their whole prefill. Paused between whole chunks, a prompt goes on
    later from its saved chunks (or, with no cache, from the start), and its reply is the same."""
    long_prompt = "hello world what " * 78  # ~236 tokens: a 64-token chunk a step beside a decoding stream
    long_params = SamplingParams(max_tokens=10, temperature=0)
    engine = make_engine(queue_timeout=60, prefill_step_ms=1, prefill_min_tokens=64,
                         **({} if saved else {"prefix_cache_mb": 0}))
    engine.faults = Faults(step=lambda number: time.sleep(0.12))  # the prompt's chunks outlast PREEMPT_AFTER
    a1_params = SamplingParams(max_tokens=40, temperature=0)
    a1 = engine.submit(PROMPTS["a1"], a1_params, owner="A")
    wait_for(lambda: engine.stats()["tokens_generated"] >= 2)
    a2 = engine.submit(long_prompt, long_params, owner="A")
    wait_for(lambda: engine.stats()["active"] == 2)
    with caplog.at_level("INFO", logger="chat.engine.scheduler"):
        b = engine.submit(PROMPTS["b"], SHORT, owner="B")
        assert result(b).completion_tokens == SHORT.max_tokens
    suspended = [record.getMessage() for record in caplog.records if "suspended a sequence" in record.getMessage()]
    assert len(suspended) == 1 and "0 tokens generated" in suspended[0]  # a2, mid-prompt; a1 decodes on
    a2_done, a1_done = result(a2), result(a1)
    assert a2_done.text == alone(endless_gguf, long_prompt, long_params).text
    assert a1_done.completion_tokens == a1_params.max_tokens
    stats = engine.stats()
    assert stats["resumptions"] == 1 and stats["resumes_restored" if saved else "resumes_evaluated"] == 1
