"""No request, fault or unlucky moment crashes or hangs the engine (issue 21), and admission is fair between owners.

Tests whose failure on the old code was a crash or a hang run their scenario in a child process, so
that the suite survives to report it.
"""

from __future__ import annotations

import ctypes
import textwrap
import threading

import pytest

from chat.engine import EngineClosed, GenerationFailed, ModelRegistry, ModelSpec, SamplingParams
from chat.engine.backends import llama_cpp as llama_cpp_backend
from chat.engine.backends.llama_cpp import LlamaCppBackend
from chat.engine.faults import Faults
from chat.engine.generation import Generation
from chat.engine.sequence import Sequence
from chat.engine.text import TextAssembler
from tests.subprocess_helpers import run_python

from .conftest import TINY_CONTEXT

GREEDY = SamplingParams(max_tokens=8, temperature=0)
LONG = SamplingParams(max_tokens=200, temperature=0)


@pytest.fixture(scope="module")
def endless_gguf(tmp_path_factory, write_tiny_gguf):
    """A tiny model that never picks an end token: replies run to max_tokens."""
    return write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-endless.gguf", seed=0, never_ends=True)


@pytest.fixture
def own_engine(tiny_gguf):
    """A fresh engine per test (some tests stall or close it); closed afterwards."""
    registries = []

    def make(**options):
        options = {"context_length": TINY_CONTEXT, "parallel": 2, **options}
        registry = ModelRegistry([ModelSpec("tiny-own", str(options.pop("path", tiny_gguf)), **options)])
        registries.append(registry)
        return registry.get()

    yield make
    for registry in registries:
        registry.close()


def run_scenario(code: str, tiny_gguf, timeout: float = 120):
    """Run `code` (with `engine`, a tiny engine of 2 slots) in a child process; returns the CompletedProcess."""
    script = textwrap.dedent("""
        import sys, threading
        from chat.engine import ModelRegistry, ModelSpec, SamplingParams, EngineClosed
        registry = ModelRegistry([ModelSpec("tiny", sys.argv[1], context_length=256, parallel=2)])
        engine = registry.get()
    """) + textwrap.dedent(code)
    return run_python(["-c", script, str(tiny_gguf)], timeout=timeout)


# -- 1. use after free -----------------------------------------------------------------------------


def test_closing_an_engine_under_a_tokenizing_thread_never_touches_freed_memory(tiny_gguf):
    result = run_scenario("""
        outcomes = {"ok": 0, "closed": 0}
        started = threading.Event()

        def tokenize_forever():
            text = "hello world " * 200
            while True:
                try:
                    engine.tokenize(text)
                    engine.count_tokens(text)
                    engine.prompt_tokens(text)
                    engine.detokenize([5, 6, 7])
                    outcomes["ok"] += 1
                    started.set()
                except EngineClosed:
                    outcomes["closed"] += 1
                    return

        worker = threading.Thread(target=tokenize_forever)
        worker.start()
        started.wait()
        engine.close()
        worker.join()
        late = []
        for call in (lambda: engine.tokenize("x"), lambda: engine.count_tokens("x"),
                     lambda: engine.prompt_tokens("x"), lambda: engine.detokenize([5]),
                     lambda: engine.submit("x", SamplingParams(max_tokens=2))):
            try:
                call()
                late.append("answered")
            except EngineClosed:
                late.append("EngineClosed")
        print(outcomes["closed"], late, engine.alive)
    """, tiny_gguf)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[0] == "1"  # the tokenizing thread was told, once, that the engine closed
    assert result.stdout.strip().endswith("['EngineClosed', 'EngineClosed', 'EngineClosed', 'EngineClosed', "
                                          "'EngineClosed'] False")


# -- 2. cancellation from inside a push; a stalled scheduler --------------------------------------


CANCELLING_CONDITION = """
class CancellingCondition:
    # Stands in for a generation's condition: its notify (called by a push, under the generation's lock)
    # cancels the generation, as a garbage-collector finalizer firing in the scheduler thread would.
    def __init__(self, generation):
        self._generation = generation
        self._condition = threading.Condition(generation._lock)

    def __enter__(self):
        return self._condition.__enter__()

    def __exit__(self, *exc):
        return self._condition.__exit__(*exc)

    def wait(self, timeout=None):
        return self._condition.wait(timeout)

    def notify_all(self):
        self._generation.cancel()
        self._condition.notify_all()
"""


def test_cancel_called_inside_a_push_on_the_scheduler_thread_does_not_deadlock(endless_gguf):
    result = run_scenario(CANCELLING_CONDITION + textwrap.dedent("""
        generation = engine.submit("hello world", SamplingParams(max_tokens=200, temperature=0))
        generation._ready = CancellingCondition(generation)
        done = threading.Event()
        threading.Thread(target=lambda: (list(generation), done.set()), daemon=True).start()
        finished = done.wait(60)
        print(finished, generation.result.finish_reason if finished else None, engine.alive)
        if finished:
            registry.close()
        sys.stdout.flush()
        import os
        os._exit(0)  # a deadlocked scheduler thread must not keep the child alive
    """), endless_gguf)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["True", "cancelled", "True"]


def test_a_scheduler_stalled_in_a_step_is_not_alive_and_recovers(own_engine):
    engine = own_engine()
    release = threading.Event()
    stalling = threading.Event()

    def stall(step: int) -> None:
        stalling.set()
        release.wait()

    engine._scheduler.stall_seconds = 0.05
    engine.faults = Faults(step=stall)
    generation = engine.submit("hello", GREEDY)
    assert stalling.wait(60)
    try:
        for _ in range(500):  # until the 0.05 s bound has passed
            if engine._scheduler.stalled:
                break
            threading.Event().wait(0.01)
        assert not engine.alive
    finally:
        engine.faults = None
        release.set()
    generation_result = list(generation)
    assert generation.result.finish_reason in ("stop", "length") and generation_result is not None
    assert engine.alive  # steps again


def test_the_registry_replaces_a_stalled_engine_without_waiting_for_it(tiny_gguf):
    registry = ModelRegistry([ModelSpec("tiny-stall", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=2)])
    release = threading.Event()
    try:
        stalled = registry.get()
        stalled._scheduler.stall_seconds = 0.05
        stalled.faults = Faults(step=lambda step: release.wait())
        waiting = stalled.submit("hello", GREEDY)
        while not stalled._scheduler.stalled:
            threading.Event().wait(0.01)
        fresh = registry.get()  # closes the stalled engine: its request fails now, not when the step ends
        assert fresh is not stalled and fresh.alive
        with pytest.raises(EngineClosed):
            list(waiting)
        with pytest.raises(EngineClosed):
            stalled.tokenize("x")
        assert fresh.generate("hello", GREEDY).finish_reason in ("stop", "length")
    finally:
        release.set()  # the stuck thread gets out and frees the old model itself
        registry.close()


# -- 3. a token the grammar rejects is never accepted (that aborted the process) ------------------


@pytest.mark.parametrize("grammar", ['root ::= "\\x00"', 'root ::= "a" [\\x00] "b"'])
def test_a_grammar_no_token_can_follow_fails_its_request_not_the_process(tiny_gguf, grammar):
    result = run_scenario(f"""
        from chat.engine import InvalidRequest
        try:
            engine.generate("hello", SamplingParams(max_tokens=8, temperature=0, grammar={grammar!r}))
            print("answered")
        except InvalidRequest as error:
            print("refused:", error)
        print("next:", engine.generate("hello", SamplingParams(max_tokens=4, temperature=0)).finish_reason)
        registry.close()
    """, tiny_gguf)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("refused: The grammar allows no token")
    assert lines[1] in ("next: stop", "next: length")


def test_a_grammar_nested_too_deep_for_the_parser_is_refused_not_a_crash(tiny_gguf):
    # What a JSON Schema string with maxLength 100000 becomes: llama.cpp's recursive parser overflowed its stack.
    result = run_scenario("""
        from chat.engine import InvalidRequest
        depth = 50000
        grammar = 'root ::= ' + '("a" ' * depth + ')?' * depth
        try:
            engine.submit("hello", SamplingParams(max_tokens=4, grammar=grammar))
            print("accepted")
        except InvalidRequest as error:
            print("refused:", error)
        registry.close()
    """, tiny_gguf)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.startswith("refused: The grammar nests groups more than 2000 deep")


def test_text_with_a_lone_surrogate_is_tokenized_not_an_error(tiny_engine):
    # "\ud800" is valid JSON; Python cannot encode it as UTF-8, and the native tokenizer must never see invalid bytes.
    assert tiny_engine.tokenize("a\ud800b") == tiny_engine.tokenize("a?b")
    assert tiny_engine.count_tokens("\udfff") == tiny_engine.count_tokens("?")


def test_ctransformers_tokenizes_text_spelled_byte_by_byte_without_overrunning_its_buffer(tiny_gguf):
    """ctransformers' own LLM.tokenize sized its buffer by characters: emoji (four byte tokens each) overran it and
    crashed the process. In a child process, so that a regression is a failed test, not a crashed run."""
    result = run_python(["-c", textwrap.dedent("""
        import sys
        from chat.engine import ModelRegistry, ModelSpec
        registry = ModelRegistry([ModelSpec("ct", sys.argv[1], backend="ctransformers", context_length=256,
                                            threads=1)])
        engine = registry.get()
        for text in ("\U0001F999" * 300, "\u00e9\u4e2d" * 500):
            tokens = engine.tokenize(text, special=False)
            assert len(tokens) > len(text), (len(tokens), len(text))  # spelled byte by byte: the case that overran
            assert engine.detokenize(tokens).strip() == text
        print("ok")
    """), str(tiny_gguf)], timeout=120)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), (result.returncode, result.stderr[-2000:])


# -- 4. KV copies that llama.cpp has recorded but not carried out yet -----------------------------


def new_sequence(tokens: list[int], max_tokens: int = 50) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Sequence(generation=Generation("test"), prompt_tokens=tokens, params=params, max_new_tokens=max_tokens,
                    assembler=TextAssembler(()))


def slot_state(backend: LlamaCppBackend, seq_id: int) -> bytes:
    llama, context = backend._llama, backend._context
    size = llama.llama_state_seq_get_size(context, seq_id)
    buffer = (ctypes.c_uint8 * size)()
    assert llama.llama_state_seq_get_data(context, buffer, size, seq_id) == size
    return bytes(buffer)


def test_a_slot_saved_before_its_copy_was_applied_saves_the_copied_prefix(tiny_gguf):
    spec = ModelSpec("tiny-copies", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=2, prefix_cache_mb=8)
    backend = LlamaCppBackend.load(spec)
    try:
        words = backend.tokenize("the cat sat on the mat and the dog sat on the log " * 20)
        prefix = words[:128]  # two whole chunks; each prompt's last chunk follows them
        writer = new_sequence(prefix + words[128:198])
        backend.start(writer)
        while writer.backend_state.prefilling:
            backend.step([writer])
        # A sequence sharing the prefix copies it from the writer's slot (recorded, applied at the next decode)...
        sharer = new_sequence(prefix + backend.tokenize(" q r s t u v w " * 12)[:70])
        backend.start(sharer)
        shared_slot = sharer.backend_state.slot
        assert sharer.cached_prompt_tokens == len(prefix) and shared_slot.kv_tokens == prefix
        backend.release(sharer)  # ...and is cancelled before any decode
        # A newcomer takes that slot: what it held is saved first.
        newcomer = new_sequence(backend.tokenize("completely different words here")[:20])
        backend.start(newcomer)
        assert newcomer.backend_state.slot is shared_slot
        entry, length = backend._cache.longest_match(prefix + [0])
        assert entry is not None and length == len(prefix)
        saved = bytes(entry.state)[: entry.size]
        backend.release(newcomer)
        # The same copy, applied by a decode before reading it: what the saved state must equal.
        llama, memory = backend._llama, backend._memory
        llama.llama_memory_seq_rm(memory, shared_slot.seq_id, -1, -1)
        llama.llama_memory_seq_cp(memory, writer.backend_state.slot.seq_id, shared_slot.seq_id, -1, -1)
        backend.step([writer])
        llama.llama_memory_seq_rm(memory, shared_slot.seq_id, len(prefix), -1)
        assert saved == slot_state(backend, shared_slot.seq_id)
        backend.release(writer)
    finally:
        backend.close()


# -- 5. one sequence's failure fails that sequence only; a failed start releases what it claimed --


def test_an_error_sampling_one_sequence_fails_only_that_sequence(own_engine, monkeypatch, endless_gguf):
    engine = own_engine(path=endless_gguf, parallel=3)
    backend = engine._backend
    original = backend._token_logprob

    def broken_logprobs(row, token, top):
        raise RuntimeError("a bug in the logprob code")

    monkeypatch.setattr(backend, "_token_logprob", broken_logprobs)
    plain = SamplingParams(max_tokens=30, temperature=0)
    expected = engine.generate("hello world", plain).text
    others = [engine.submit("hello world", plain) for _ in range(2)]
    victim = engine.submit("hello world", SamplingParams(max_tokens=30, temperature=0, logprobs=1))
    with pytest.raises(GenerationFailed):
        list(victim)
    for generation in others:
        list(generation)
        assert generation.result.finish_reason == "length" and generation.result.text == expected
    monkeypatch.setattr(backend, "_token_logprob", original)
    assert engine.stats()["active"] == 0


def test_a_start_that_fails_after_claiming_a_slot_releases_slot_and_sampler(own_engine, monkeypatch):
    engine = own_engine(parallel=1)
    backend = engine._backend
    freed = []
    free = backend._llama.llama_sampler_free

    def failing_state(**fields):  # the first thing start() does once the slot is claimed
        raise RuntimeError("a bug after the slot was claimed")

    monkeypatch.setattr(llama_cpp_backend, "_SequenceState", failing_state)
    monkeypatch.setattr(backend._llama, "llama_sampler_free", lambda sampler: (freed.append(sampler), free(sampler)))
    with pytest.raises(GenerationFailed):
        engine.generate("hello", GREEDY)
    monkeypatch.undo()
    assert len(freed) == 1  # the sampler chain
    assert not any(slot.busy for slot in backend._slots)
    assert engine.generate("hello", GREEDY).finish_reason in ("stop", "length")  # the only slot serves again


# -- fair admission between owners ----------------------------------------------------------------


def test_a_flood_by_one_owner_queues_behind_its_own_requests(own_engine, endless_gguf):
    engine = own_engine(path=endless_gguf, parallel=2, max_queue=0, queue_timeout=0)
    admitted, submitted = [], threading.Event()
    engine.faults = Faults(step=lambda step: submitted.wait())  # no slot frees while the requests arrive

    def submit(label: str, owner: str) -> Generation:
        generation = engine.submit("hello world", SamplingParams(max_tokens=6, temperature=0), owner=owner)
        mark = generation._mark_admitted
        generation._mark_admitted = lambda: (admitted.append(label), mark())
        return generation

    generations = [submit(f"A{i}", "A") for i in range(8)]  # 4 times the slots
    generations.append(submit("B", "B"))
    submitted.set()
    for generation in generations:
        list(generation)
    # A has the two slots when B arrives (or one, if the scheduler was quick to take the first request
    # alone); B is admitted next, before the rest of A's flood. First come, first served would make it last.
    assert admitted.index("B") <= 2
    assert sorted(admitted) == sorted(f"A{i}" for i in range(8)) + ["B"]
    assert [label for label in admitted if label != "B"] == [f"A{i}" for i in range(8)]  # FIFO within an owner


def test_stats_count_active_sequences_per_owner(own_engine, endless_gguf):
    engine = own_engine(path=endless_gguf, parallel=3)
    running = [engine.submit("hello", LONG, owner=owner) for owner in ("A", "A", "B")]
    for _ in range(1000):  # until the three are admitted (a reply of 200 tokens outlasts this)
        if engine.stats()["active"] == 3:
            break
        threading.Event().wait(0.01)
    try:
        assert engine.stats()["active_by_owner"] == {"A": 2, "B": 1}
    finally:
        for generation in running:
            generation.cancel()
        for generation in running:
            list(generation)


def test_more_short_prompts_at_once_than_one_call_holds_all_complete(tiny_gguf):
    """With parallel above 8, the short last chunks of prompts admitted together exceeded the batch's 512 rows:
    the decode wrote past its arrays and every running sequence failed."""
    result = run_scenario("""
        registry.close()
        registry = ModelRegistry([ModelSpec("wide", sys.argv[1], context_length=128 * 12, parallel=12)])
        engine = registry.get()
        prompts = []
        for i in range(12):  # 48-63 tokens each: 12 short last chunks are over 512 rows together
            prompt = f"q{i}"
            while len(engine.tokenize(prompt)) < 48:
                prompt += " w"
            prompts.append(prompt)
        assert all(48 <= len(engine.tokenize(p)) < 64 for p in prompts), [len(engine.tokenize(p)) for p in prompts]
        running = [engine.submit(p, SamplingParams(max_tokens=4, temperature=0)) for p in prompts]
        for generation in running:
            "".join(generation)  # iterating to the end raises the error a failed sequence got
        print("done:", sorted({generation.result.finish_reason for generation in running}))
        registry.close()
    """, tiny_gguf)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() in ("done: ['length']", "done: ['length', 'stop']", "done: ['stop']")


def test_a_parallel_above_llama_cpps_sequence_limit_is_a_config_error():
    with pytest.raises(ValueError, match="parallel must be from 1 to 256"):
        ModelSpec("wide", "model.gguf", parallel=257)


@pytest.mark.parametrize("field", ["temperature", "top_p", "repetition_penalty", "presence_penalty",
                                   "frequency_penalty"])
def test_a_sampling_value_that_is_not_a_number_is_refused(field):
    """A NaN temperature divided the grammar's -inf logits into NaN, the guard let a rejected token through,
    and llama.cpp's grammar threw through ctypes: the process aborted."""
    from chat.engine import InvalidRequest

    for value in (float("nan"), float("inf")):
        with pytest.raises(InvalidRequest) as raised:
            SamplingParams(max_tokens=4, **{field: value})
        assert raised.value.param == field
