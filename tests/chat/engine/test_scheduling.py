"""Scheduling (llama_cpp): slot order, shared prefixes, the prefill budget, back-pressure, failures, empty prompts."""

import threading

import pytest

from chat.engine import EngineOverloaded, GenerationFailed, InvalidRequest, ModelRegistry, ModelSpec, SamplingParams
from chat.engine.backends.llama_cpp import LlamaCppBackend, last_chunk_start, reusable
from chat.engine.errors import SequencesFailed
from chat.engine.generation import Generation
from chat.engine.prefix_cache import common_prefix_length
from chat.engine.sequence import Sequence
from chat.engine.text import TextAssembler
from tests.factories import chat_prompt, write_tiny_gguf

from .conftest import TINY_CONTEXT

GREEDY = SamplingParams(max_tokens=16, temperature=0)
CHARACTER = "you are a pirate who loves the sea and tells long stories about ships and water. " * 3
QUESTIONS = ["who are you", "where is paris", "what is water", "tell me a story"]


@pytest.fixture(scope="module")
def engines(tiny_gguf):
    """Engines of their own, so that counters and slot contents belong to one test at a time."""
    tiny = str(tiny_gguf)
    registry = ModelRegistry([
        ModelSpec("share", tiny, context_length=TINY_CONTEXT, parallel=4, prefix_cache_mb=0),
        ModelSpec("slots", tiny, context_length=TINY_CONTEXT, parallel=4, prefix_cache_mb=0),
        ModelSpec("queue", tiny, context_length=TINY_CONTEXT, parallel=1, max_queue=1),
        ModelSpec("shared-queue", tiny, context_length=TINY_CONTEXT, parallel=1, max_queue=4),
        ModelSpec("burst", tiny, context_length=TINY_CONTEXT, parallel=4, max_queue=2),
        ModelSpec("crash", tiny, context_length=TINY_CONTEXT, parallel=2),
    ])
    yield registry
    registry.close()


def cold_output(path: str, prompt: str, params: SamplingParams = GREEDY) -> str:
    """The reply of a fresh one-slot engine: nothing cached, nothing shared."""
    registry = ModelRegistry([ModelSpec("cold", path, context_length=TINY_CONTEXT, parallel=1, prefix_cache_mb=0)])
    try:
        completion = registry.get().generate(prompt, params)
        assert completion.cached_prompt_tokens == 0
        return completion.text
    finally:
        registry.close()


def finish(generations) -> list:
    return [("".join(g), g.result)[1] for g in generations]


# -- batch order ---------------------------------------------------------------------------------


def test_sequences_on_scattered_slots_give_the_same_tokens_as_alone(engines, tiny_gguf):
    engine = engines.get("slots")
    characters = [f"you are {name}, who speaks of {topic}. " * 8 for name, topic in
                  [("anna", "rivers"), ("boris", "trains"), ("chen", "stars"), ("dora", "bread")]]
    for character in characters:  # one per slot, in slot order: 0, 1, 2, 3
        engine.generate(chat_prompt(engine, character, "hello"), GREEDY)
    # Follow-ups continue from their own slot's cells, admitted out of slot order: 3, 1, 0, 2.
    prompts = [chat_prompt(engine, characters[i], "what do you like") for i in (3, 1, 0, 2)]
    # Admitted in one step: admitted one by one, a lone early one would be packed onto a slot another still needs.
    with engine.admission_held():
        generations = [engine.submit(prompt, GREEDY) for prompt in prompts]
    together = finish(generations)
    assert all(c.cached_prompt_tokens > len(engine.tokenize(characters[0])) // 2 for c in together)
    assert [c.text for c in together] == [cold_output(str(tiny_gguf), prompt) for prompt in prompts]



def test_sequences_are_packed_onto_consecutive_slots_without_changing_their_tokens(tiny_gguf):
    spec = ModelSpec("pack", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=4, prefix_cache_mb=0)
    backend = LlamaCppBackend.load(spec)
    try:
        prompts = [backend.tokenize(text) for text in ("hello world what", "yes no stop", "the capital of france is")]
        seqs = [new_sequence(prompt) for prompt in prompts]
        for seq in seqs:  # fresh slots are taken in order: 0, 1, 2
            backend.start(seq)
        tokens = {seq: [] for seq in seqs}

        def run(active, steps):
            for _ in range(steps):
                for seq, token in backend.step(active):
                    tokens[seq].append(token)

        run(seqs, 3)
        backend.release(seqs[1])  # slots 0 and 2 stay busy: not consecutive
        survivors = [seqs[0], seqs[2]]
        run(survivors, 5)
        assert sorted(seq.backend_state.slot.seq_id for seq in survivors) == [0, 1]
        assert backend.stats()["slot_moves"] == 1
        for seq in survivors:
            backend.release(seq)
        for seq, prompt in zip(survivors, (prompts[0], prompts[2])):  # each alone, never moved
            alone = new_sequence(prompt)
            backend.start(alone)
            tokens[alone] = []
            run([alone], 8)
            backend.release(alone)
            assert tokens[seq] == tokens[alone]
    finally:
        backend.close()


# -- shared prefixes -----------------------------------------------------------------------------


def test_a_burst_with_one_prefix_evaluates_it_once_and_matches_cold_output(engines, tiny_gguf):
    engine = engines.get("share")
    prompts = [chat_prompt(engine, CHARACTER, question) for question in QUESTIONS]
    tokens = [engine.prompt_tokens(prompt) for prompt in prompts]
    before = engine.stats()
    burst = finish([engine.submit(prompt, GREEDY) for prompt in prompts])  # queued before the next step
    after = engine.stats()

    shared = min(common_prefix_length(tokens[0], t) for t in tokens[1:])
    assert shared > len(engine.tokenize(CHARACTER))
    evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    # The first prompt in full, then only what each other prompt does not share with it (in whole chunks).
    assert evaluated <= len(tokens[0]) + sum(len(t) - min(reusable(common_prefix_length(tokens[0], t)),
                                                          last_chunk_start(len(t))) for t in tokens[1:])
    assert after["shared_prefixes"] - before["shared_prefixes"] == len(prompts) - 1
    expected = [min(reusable(shared), last_chunk_start(len(t))) for t in tokens[1:]]
    assert min(expected) >= 64
    assert [c.cached_prompt_tokens >= e for c, e in zip(burst[1:], expected)] == [True] * (len(prompts) - 1)
    assert [c.text for c in burst] == [cold_output(str(tiny_gguf), prompt) for prompt in prompts]


def test_n_copies_of_one_prompt_evaluate_it_once_and_each_matches_its_cold_output(engines, tiny_gguf):
    """What `n` choices submit: the same prompt n times with their own seeds. The first evaluates it; the
    others fork from it (whole sequence copied, first token sampled from the same logits row)."""
    engine = engines.get("share")
    prompt = chat_prompt(engine, "you are a gardener who grows roses. " * 2, "what grows in june")
    tokens = engine.prompt_tokens(prompt)
    choices = [SamplingParams(max_tokens=12, temperature=1.0, seed=seed) for seed in (1, 2, 3, 4)]
    before = engine.stats()
    with engine.admission_held():  # admitted in one step, however busy the machine
        generations = [engine.submit(prompt, params) for params in choices]
    completions = finish(generations)
    after = engine.stats()
    assert after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"] == len(tokens)
    assert after["forked_sequences"] - before["forked_sequences"] == 3
    assert [c.text for c in completions] == [cold_output(str(tiny_gguf), prompt, params) for params in choices]
    assert len({c.text for c in completions}) > 1  # different seeds: the choices are not one reply four times


def test_a_prefix_is_shared_from_a_sequence_that_is_decoding(engines, tiny_gguf):
    engine = engines.get("share")
    character = CHARACTER.replace("pirate", "sailor")
    first = engine.submit(chat_prompt(engine, character, QUESTIONS[0]), SamplingParams(max_tokens=60, temperature=0))
    stream = iter(first)
    next(stream)  # decoding now: its slot holds the whole prefix
    before = engine.stats()["shared_prefixes"]
    follower_prompt = chat_prompt(engine, character, QUESTIONS[1])
    follower = engine.generate(follower_prompt, GREEDY)
    list(stream)
    assert engine.stats()["shared_prefixes"] == before + 1
    assert follower.text == cold_output(str(tiny_gguf), follower_prompt)


@pytest.mark.smollm2
def test_smollm2_burst_with_one_persona_matches_cold_output(smollm2_gguf):
    system = "You are Captain Mara, a retired sailor who answers kindly and briefly. " * 12
    questions = ["What do you like most about the sea?", "Name a ship.", "Where did you sail?"]
    registry = ModelRegistry([ModelSpec("burst", str(smollm2_gguf), context_length=512, parallel=3, prefix_cache_mb=0)])
    try:
        engine = registry.get()
        prompts = [chat_prompt(engine, system, question) for question in questions]
        burst = finish([engine.submit(prompt, GREEDY) for prompt in prompts])
        assert engine.stats()["shared_prefixes"] == len(prompts) - 1
        cold = []
        for prompt in prompts:
            alone = ModelRegistry([ModelSpec("alone", str(smollm2_gguf), context_length=512, parallel=1, prefix_cache_mb=0)])
            try:
                cold.append(alone.get().generate(prompt, GREEDY).text)
            finally:
                alone.close()
        assert [c.text for c in burst] == cold
    finally:
        registry.close()


# -- prefill budget (the backend driven step by step, no scheduler thread) ------------------------


def new_sequence(tokens: list[int], max_tokens: int = 200) -> Sequence:
    params = SamplingParams(max_tokens=max_tokens, temperature=0)
    return Sequence(generation=Generation("test"), prompt_tokens=tokens, params=params, max_new_tokens=max_tokens,
                    assembler=TextAssembler(()))


@pytest.fixture
def budget_backend(tiny_gguf):
    # A 1 ms target is below any real step: prompts next to a stream advance by the minimum chunk only.
    spec = ModelSpec("budget", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=2, prefix_cache_mb=0,
                     prefill_step_ms=1, prefill_min_tokens=8)
    backend = LlamaCppBackend.load(spec)
    yield backend
    backend.close()


def test_a_long_prompt_is_split_over_steps_while_a_stream_gets_a_token_every_step(budget_backend):
    backend = budget_backend
    stream = new_sequence(backend.tokenize("hello world what"))
    backend.start(stream)
    assert [seq for seq, _ in backend.step([stream])] == [stream]  # nothing decoding: the whole prompt at once

    long_prompt = backend.tokenize("water sound people day number first who may down side been now find " * 16)
    assert 3 * 64 < len(long_prompt) < TINY_CONTEXT - 20
    newcomer = new_sequence(long_prompt)
    backend.start(newcomer)
    steps = 0
    while True:
        steps += 1
        sampled = [seq for seq, _ in backend.step([stream, newcomer])]
        assert stream in sampled  # the stream never waits for the prompt
        if newcomer in sampled:
            break
    assert steps >= len(long_prompt) // 64  # the prompt went in whole chunks of 64, one per step
    for seq in (stream, newcomer):
        backend.release(seq)


def first_tokens(backend, seq: Sequence, beside: list[Sequence], count: int) -> tuple[list[int], list[int]]:
    """The first `count` tokens `seq` samples, stepping it beside `beside`, and how many prompt tokens each step
    before its first token evaluated of it."""
    tokens, advanced = [], []
    while len(tokens) < count:
        pending = len(seq.backend_state.pending)
        sampled = dict(backend.step([*beside, seq]))
        if not tokens:
            advanced.append(pending - len(seq.backend_state.pending) if seq not in sampled else pending)
        if seq in sampled:
            tokens.append(sampled[seq])
    return tokens, advanced


def test_where_every_row_is_exact_a_prompt_beside_a_stream_advances_by_the_minimum_not_a_whole_chunk(tmp_path):
    """Q8_0 weights compute a row the same in any call (row_probe.py), so a prompt need not go in whole 64-token
    chunks: beside a decoding stream, past a 1 ms budget, it advances prefill_min_tokens (16) a step instead of 64,
    and samples what it samples evaluated whole on an idle engine (each on an engine of its own: nothing reused)."""
    model = write_tiny_gguf(tmp_path / "q8_0.gguf", weights="q8_0")
    spec = ModelSpec("exact-pieces", str(model), context_length=TINY_CONTEXT, parallel=2, prefix_cache_mb=0,
                     threads=2, flash_attention=True, prefill_step_ms=1, prefill_min_tokens=16)
    text = "water sound people day number first who may down side been now find " * 16
    replies = []
    for with_stream in (False, True):
        backend = LlamaCppBackend.load(spec)
        try:
            assert backend._rows_exact
            # Below any step (1 ms, the least a spec can say, let a fast CPU afford 32 of the tiny model's tokens)
            backend._budget.target_seconds = 1e-6
            long_prompt = backend.tokenize(text)
            assert 3 * 64 < len(long_prompt) < TINY_CONTEXT - 20
            beside = []
            if with_stream:
                beside = [new_sequence(backend.tokenize("hello world what"))]
                backend.start(beside[0])
                backend.step(beside)  # decoding from now on
            seq = new_sequence(long_prompt)
            backend.start(seq)
            reply, advanced = first_tokens(backend, seq, beside, 6)
            replies.append(reply)
            if with_stream:
                # 16 a step (the tiny model's budget may take the last few whole), not 64
                assert advanced[:-1] == [16] * (len(advanced) - 1) and sum(advanced) == len(long_prompt)
                assert len(advanced) >= len(long_prompt) // 16
            else:
                assert advanced == [len(long_prompt)]  # nothing decoding: the whole prompt in one step
        finally:
            backend.close()
    assert replies[0] == replies[1]



def test_where_every_row_is_exact_a_zero_minimum_still_advances_a_prompt_a_whole_piece_a_step(tmp_path):
    """prefill_min_tokens: 0 (no minimum asked) past the budget: the oldest prompt still advances 16 tokens a step
    beside a stream, as whole chunks guaranteed it one chunk, not one token a step."""
    model = write_tiny_gguf(tmp_path / "q8_0.gguf", weights="q8_0")
    spec = ModelSpec("zero-minimum", str(model), context_length=TINY_CONTEXT, parallel=2, prefix_cache_mb=0,
                     threads=2, flash_attention=True, prefill_step_ms=1, prefill_min_tokens=0)
    backend = LlamaCppBackend.load(spec)
    try:
        assert backend._rows_exact
        backend._budget.target_seconds = 1e-6  # below any step: nothing fits the budget
        stream = new_sequence(backend.tokenize("hello world what"))
        backend.start(stream)
        backend.step([stream])  # decoding from now on
        seq = new_sequence(backend.tokenize("water sound people day number first who may down side been now " * 8))
        backend.start(seq)
        _, advanced = first_tokens(backend, seq, [stream], 1)
        assert advanced[0] == 16
    finally:
        backend.close()

@pytest.mark.parametrize("others", [True, False])
def test_the_minimum_prompt_chunk_beside_streams_is_per_owner_not_per_prompt(tiny_gguf, others):
    """Beyond the budget each owner's oldest prompt advances one chunk a step: an owner sending many long prompts
    must not put a chunk of each into every step of everyone else's. With no other owner in the step, every
    prompt of it does (the first turns of a burst for one persona)."""
    spec = ModelSpec("budget-owners", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=4, prefix_cache_mb=0,
                     prefill_step_ms=1, prefill_min_tokens=8)
    backend = LlamaCppBackend.load(spec)
    try:
        stream = new_sequence(backend.tokenize("hello world what"))
        stream.owner = "flood"
        backend.start(stream)
        backend.step([stream])  # decoding from now on
        text = "water sound people day number first who may down side been now find " * 8
        # Different from their first token: no prompt waits to share another's prefix.
        first, second, other = (new_sequence(backend.tokenize(head + text)) for head in ("one ", "two ", "three "))
        first.owner = second.owner = "flood"
        other.owner = "someone" if others else "flood"
        for seq in (first, second, other):
            backend.start(seq)
        pending = {seq: len(seq.backend_state.pending) for seq in (first, second, other)}
        backend.step([stream, first, second, other])
        advanced = {seq: pending[seq] - len(seq.backend_state.pending) for seq in pending}
        assert advanced[first] == advanced[other] == 64
        assert advanced[second] == (0 if others else 64)  # with another owner there, flood's next prompt waits
        for seq in (stream, first, second, other):
            backend.release(seq)
    finally:
        backend.close()


def test_prompts_go_at_full_batch_size_when_nothing_decodes(budget_backend):
    backend = budget_backend
    tokens = backend.tokenize("water sound people day number first who may down side been now find " * 4)
    seq = new_sequence(tokens)
    backend.start(seq)
    before = backend.stats()["prompt_tokens_evaluated"]
    assert [s for s, _ in backend.step([seq])] == [seq]
    assert backend.stats()["prompt_tokens_evaluated"] - before == len(tokens)
    backend.release(seq)


def test_an_empty_prompt_is_refused_by_the_backend(budget_backend):
    with pytest.raises(InvalidRequest, match="empty"):
        budget_backend.start(new_sequence([]))


@pytest.mark.smollm2
def test_an_empty_prompt_is_refused_by_the_engine(smollm2):
    assert not smollm2.prompt_tokens("")  # SmolLM2 adds no BOS: nothing would be decoded
    with pytest.raises(InvalidRequest, match="empty"):
        smollm2.submit("", GREEDY)


# -- back-pressure and failures ------------------------------------------------------------------


def test_a_full_queue_refuses_with_a_retry_hint(engines):
    engine = engines.get("queue")  # one slot, one queue place
    running = engine.submit("hello world what", SamplingParams(max_tokens=200, temperature=0))
    stream = iter(running)
    next(stream)  # it holds the only slot
    waiting = engine.submit("yes no stop", GREEDY)
    with pytest.raises(EngineOverloaded) as refused:
        engine.submit("the capital of france is", GREEDY)
    assert refused.value.retry_after >= 1
    assert engine.stats()["rejected_queue_full"] == 1
    running.cancel()
    list(stream)
    assert "".join(waiting) == waiting.result.text and waiting.result.completion_tokens  # the queued one still runs


def test_one_owner_holds_at_most_half_of_the_queue_and_two_floods_leave_room_for_a_third(engines):
    engine = engines.get("shared-queue")  # one slot, four queue places: two per owner at most, the last for newcomers
    running = engine.submit("hello world what", SamplingParams(max_tokens=200, temperature=0), owner="a")
    stream = iter(running)
    next(stream)  # it holds the only slot
    flood = [engine.submit("yes no stop", GREEDY, owner="a") for _ in range(2)]
    with pytest.raises(EngineOverloaded) as refused:
        engine.submit("yes no stop", GREEDY, owner="a")  # a third waiting place of a's: refused
    assert refused.value.retry_after >= 1
    others = [engine.submit("the capital of france is", GREEDY, owner="b")]
    with pytest.raises(EngineOverloaded):  # b waits already: the last place is kept for an owner with none
        engine.submit("the capital of france is", GREEDY, owner="b")
    others.append(engine.submit("the capital of france is", GREEDY, owner="c"))
    with pytest.raises(EngineOverloaded):  # the queue is full: its bound still holds for everyone
        engine.submit("the capital of france is", GREEDY, owner="d")
    assert engine.stats()["rejected_queue_full"] == 3
    running.cancel()
    list(stream)
    assert all(finish(flood + others))  # everything that found a place runs


def test_a_burst_that_free_slots_will_take_is_not_counted_as_waiting(engines):
    """Four free slots, two queue places (one per owner): a burst from one owner that arrives before the
    scheduler's thread admits any of it (admission held) fills the slots, then its one place of the queue; only
    the request after that is refused, as it would be had each request been admitted on arrival."""
    engine = engines.get("burst")
    with engine.admission_held():
        burst = [engine.submit("yes no stop", GREEDY, owner="a") for _ in range(5)]
        with pytest.raises(EngineOverloaded):
            engine.submit("yes no stop", GREEDY, owner="a")
    assert engine.stats()["rejected_queue_full"] == 1
    assert all(finish(burst))


@pytest.mark.smollm2
def test_a_request_that_waits_too_long_in_the_queue_is_refused(smollm2_gguf):
    # SmolLM2, not the tiny model: its reply must hold the only slot longer than the queue timeout.
    registry = ModelRegistry([ModelSpec("waits", str(smollm2_gguf), context_length=1024, parallel=1, queue_timeout=0.5)])
    try:
        engine = registry.get()
        prompt = engine.render_chat([{"role": "user", "content": "Count from 1 to 500, separated by commas."}])
        # SmolLM2's end tokens banned: the reply holds the slot for all of its 400 tokens, whatever it says.
        no_end = ((0, -100.0), (1, -100.0), (2, -100.0))
        running = engine.submit(prompt, SamplingParams(max_tokens=400, temperature=0, logit_bias=no_end))
        stream = iter(running)
        next(stream)
        late = engine.submit("yes no stop", GREEDY)
        with pytest.raises(EngineOverloaded, match="waited too long"):
            list(late)
        running.cancel()
        list(stream)
        assert engine.stats()["rejected_queue_timeout"] == 1
    finally:
        registry.close()


def test_a_dead_scheduler_is_replaced_on_the_next_request(engines, monkeypatch):
    engine = engines.get("crash")
    assert engine.alive
    crashed = threading.Event()

    def crash(newcomers):
        crashed.set()
        raise RuntimeError("a bug in the scheduler loop")

    monkeypatch.setattr(engine._scheduler, "_advance", crash)
    with pytest.raises(GenerationFailed):
        engine.generate("hello world what", GREEDY)
    assert crashed.is_set() and not engine.alive
    assert engines.loaded("crash") is engine  # still there, dead, until someone asks for it
    fresh = engines.get("crash")
    assert fresh is not engine and fresh.alive
    assert fresh.generate("hello world what", GREEDY).completion_tokens > 0


def test_a_failed_decode_fails_only_the_sequence_concerned(budget_backend):
    backend = budget_backend
    good, bad = new_sequence(backend.tokenize("hello world what")), new_sequence(backend.tokenize("yes no stop"))
    for seq in (good, bad):
        backend.start(seq)
    assert len(backend.step([good, bad])) == 2  # both prompts evaluated, both decoding now
    bad.backend_state.slot.kv_tokens.append(0)  # a position gap: llama_decode refuses this sequence's tokens
    with pytest.raises(SequencesFailed) as partial:
        backend.step([good, bad])
    assert partial.value.failed == [bad]
    assert [seq for seq, _ in partial.value.sampled] == [good]
    backend.release(good)
    backend.release(bad)


def test_a_twin_forks_from_its_prompts_logits_when_a_failed_prompt_call_is_retried(tiny_gguf, monkeypatch):
    """A prompt call that fails is retried sequence by sequence, each decode replacing the logits of the one before:
    a twin (`n` choices) forks right after its source's own retry. Forked after the last retry, it sampled another
    prompt's row (the same index here), or a row that is gone (NULL: llama.cpp's sampler crashes the process)."""
    spec = ModelSpec("retry-fork", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=3, prefix_cache_mb=0)
    backend = LlamaCppBackend.load(spec)
    try:
        prompt = backend.tokenize("hello world what is it")
        other_prompt = backend.tokenize("yes no stop the sea ships sailors")[: len(prompt)]
        assert len(other_prompt) == len(prompt)  # the same logits index in their calls
        source, twin, other = new_sequence(prompt), new_sequence(prompt), new_sequence(other_prompt)
        for seq in (source, twin, other):
            backend.start(seq)
        assert twin.backend_state.twin is not None  # it waits to fork from the source
        assert source.backend_state.slot.seq_id < other.backend_state.slot.seq_id  # retried first
        decode, failures = backend._decode_batch, []

        def failing_once(planned):
            if len(planned) > 1 and not failures:  # the prompt call of both prompts fails; each alone succeeds
                failures.append(planned)
                return -1
            return decode(planned)

        monkeypatch.setattr(backend, "_decode_batch", failing_once)
        first = dict(backend.step([source, twin, other]))
        assert failures and set(first) == {source, twin, other}
        assert first[source] != first[other]  # else the test could not tell the rows apart
        assert first[twin] == first[source]  # greedy: the source's row gives the source's token
        for seq in (source, twin, other):
            backend.release(seq)
    finally:
        backend.close()


def test_a_twin_of_a_sequence_evaluated_again_after_a_pause_forks_where_it_paused(tiny_gguf):
    """A suspended sequence whose cells are gone is evaluated again (its prompt, then its decoded tokens) and samples
    nothing at the end: it decodes on with the token it sampled before the pause. A twin of exactly those tokens
    forks from that row (the source's next token is its first); it waited for the source's whole reply."""
    spec = ModelSpec("resume-twin", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=2, prefix_cache_mb=0)
    backend = LlamaCppBackend.load(spec)
    try:
        source = new_sequence(backend.tokenize("hello world what is it"))
        backend.start(source)
        for _ in range(4):  # the prompt, then three decoded tokens
            backend.step([source])
        paused_on = source.backend_state.pending[0]  # sampled, not decoded yet
        backend.suspend(source)
        tokens = list(source.backend_state.resume_tokens)
        others = [new_sequence(backend.tokenize(text)) for text in ("yes no stop", "the sea is blue")]
        for seq in others:  # both slots taken: its cells are gone, and nothing was saved (no prefix cache)
            backend.start(seq)
        backend.step(others)
        for seq in others:
            backend.release(seq)
        backend.start(source)
        assert source.backend_state.prompt_end is not None  # evaluated again
        twin = new_sequence(tokens)
        backend.start(twin)
        assert twin.backend_state.twin is not None
        first = {}
        for _ in range(6):
            for seq, token in backend.step([source, twin]):
                first.setdefault(seq, token)
        assert first.get(twin) == paused_on
        for seq in (source, twin):
            backend.release(seq)
    finally:
        backend.close()


# -- configuration -------------------------------------------------------------------------------


def test_scheduler_settings_come_from_config_yaml(tmp_path):
    from llmsite.config import ConfigError, load_config

    path = tmp_path / "config.yaml"
    path.write_text("model_path: m.gguf\nsystem_prompt: hi\nprefill_step_ms: 150\nprefill_min_tokens: 8\n"
                    "max_queue: 5\nqueue_timeout: 9\n")
    model = load_config(path, base_dir=tmp_path).models[0]
    spec = ModelSpec(**vars(model))
    assert (spec.prefill_step_ms, spec.prefill_min_tokens, spec.max_queue, spec.queue_timeout) == (150, 8, 5, 9)
    path.write_text("model_path: m.gguf\nsystem_prompt: hi\nmax_queue: -1\n")
    with pytest.raises(ConfigError, match="max_queue must be a non-negative integer"):
        load_config(path, base_dir=tmp_path)


def test_flash_attention_is_a_llama_cpp_option_of_config_yaml(tmp_path):
    from llmsite.config import ConfigError, load_config

    path = tmp_path / "config.yaml"
    path.write_text("model_path: m.gguf\nsystem_prompt: hi\n")
    assert load_config(path, base_dir=tmp_path).models[0].flash_attention is True  # on by default
    path.write_text("model_path: m.gguf\nsystem_prompt: hi\nflash_attention: false\n")
    assert load_config(path, base_dir=tmp_path).models[0].flash_attention is False
    for text, message in (("flash_attention: yes please\n", "flash_attention must be true or false"),
                          ("backend: ctransformers\nflash_attention: true\n", "flash_attention is a llama_cpp option")):
        path.write_text("model_path: m.gguf\nsystem_prompt: hi\n" + text)
        with pytest.raises(ConfigError, match=message):
            load_config(path, base_dir=tmp_path)


def test_an_engine_with_flash_attention_generates(tiny_gguf):
    registry = ModelRegistry([ModelSpec("tiny-fa", str(tiny_gguf), context_length=TINY_CONTEXT, parallel=2,
                                        flash_attention=True)])
    try:
        completion = registry.get().generate("hello world", SamplingParams(max_tokens=8, temperature=0))
        assert completion.completion_tokens > 0 and completion.finish_reason in ("stop", "length")
    finally:
        registry.close()


def test_a_twin_whose_source_is_cancelled_evaluates_the_prompt_itself(budget_backend):
    backend = budget_backend
    prompt = backend.tokenize("hello world what is the capital of france")
    source, twin = new_sequence(prompt, max_tokens=4), new_sequence(prompt, max_tokens=4)
    backend.start(source)
    backend.start(twin)
    assert twin.backend_state.twin is not None
    backend.release(source)  # cancelled before its prompt was evaluated
    tokens = []
    for _ in range(4):
        tokens += [token for seq, token in backend.step([twin]) if seq is twin]
    backend.release(twin)
    alone = new_sequence(prompt, max_tokens=4)
    backend.start(alone)
    expected = []
    for _ in range(4):
        expected += [token for seq, token in backend.step([alone]) if seq is alone]
    backend.release(alone)
    assert tokens == expected and len(tokens) == 4


@pytest.mark.smollm2
def test_smollm2_sequences_decoding_around_a_prefilling_slot_match_decoding_alone(smollm2_gguf):
    """Slots 0 and 2 decode while slot 1 evaluates a long prompt (llama.cpp passes only consecutive slots in one
    ubatch, so each is a lone row): their logprobs are those of each decoding alone, and of the two side by side.
    With upstream's kernel the decode call has a throwaway token for slot 1 (test_batching.py covers both)."""
    spec = ModelSpec("around", str(smollm2_gguf), context_length=1024, parallel=3, prefix_cache_mb=0)

    def prompt_of(backend, topic: str, times: int) -> list[int]:
        return backend.tokenize(f"Tell me everything about {topic}, at length and with care. " * times)

    def decode(backend, seqs: list[Sequence], found: dict, until) -> None:
        while not until():
            for seq, _token in backend.step(seqs):
                if seq in found:
                    found[seq].append((seq.token_logprob.logprob, [t.logprob for t in seq.token_logprob.top]))

    def sequence(tokens):
        params = SamplingParams(max_tokens=64, temperature=0, logprobs=3)
        return Sequence(generation=Generation("t"), prompt_tokens=tokens, params=params, max_new_tokens=64,
                        assembler=TextAssembler(()))

    backend = LlamaCppBackend.load(spec)
    try:
        first, second = prompt_of(backend, "ships", 22), prompt_of(backend, "rivers", 22)
        long = prompt_of(backend, "mountains", 60)
        assert min(len(first), len(second)) > 256 and len(long) < 1000
        a, b, c = sequence(first), sequence(long), sequence(second)
        for seq in (a, b, c):
            backend.start(seq)
        assert [s.backend_state.slot.seq_id for s in (a, b, c)] == [0, 1, 2]
        together = {a: [], c: []}
        decode(backend, [a, c], together, lambda: not (a.backend_state.prefilling or c.backend_state.prefilling))
        decode(backend, [a, b, c], together, lambda: min(len(v) for v in together.values()) >= 8)
        assert b.backend_state.prefilling  # it was evaluating its prompt all along
        for seq in (a, b, c):
            backend.release(seq)
    finally:
        backend.close()
    alone = []
    for tokens in (first, second):
        backend = LlamaCppBackend.load(spec)
        try:
            seq = sequence(tokens)
            backend.start(seq)
            found = {seq: []}
            decode(backend, [seq], found, lambda: len(found[seq]) >= 8)
            alone.append(found[seq])
            backend.release(seq)
        finally:
            backend.close()
    backend = LlamaCppBackend.load(spec)  # the two side by side on slots 0 and 1, nothing between them
    try:
        a2, c2 = sequence(first), sequence(second)
        for seq in (a2, c2):
            backend.start(seq)
        side_by_side = {a2: [], c2: []}
        decode(backend, [a2, c2], side_by_side, lambda: min(len(v) for v in side_by_side.values()) >= 8)
    finally:
        backend.close()
    assert together[a][:8] == alone[0][:8] == side_by_side[a2][:8]
    assert together[c][:8] == alone[1][:8] == side_by_side[c2][:8]
