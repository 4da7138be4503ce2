"""Generation on both backends with the tiny model: limits, stop strings, seeds, cancellation, async, errors."""

import asyncio

import pytest

from chat.engine import ContextOverflow, InvalidRequest, SamplingParams, UnsupportedFeature

from .conftest import TINY_CONTEXT

GREEDY = SamplingParams(max_tokens=24, temperature=0)
PROMPT = "hello world, the capital of france is"


def test_generate_returns_a_completion(tiny_engine):
    completion = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=12, temperature=0.8, seed=1))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 12
    assert completion.prompt_tokens == len(tiny_engine.tokenize(PROMPT)) + 1  # + BOS, which this model wants
    assert completion.text


def test_streamed_deltas_add_up_to_the_completion_text(tiny_engine):
    generation = tiny_engine.submit(PROMPT, SamplingParams(max_tokens=16, seed=7))
    deltas = list(generation)
    assert "".join(deltas) == generation.result.text
    assert generation.done and generation.id


def test_bos_is_not_doubled_when_the_prompt_already_starts_with_it(tiny_engine):
    tokens = tiny_engine.prompt_tokens("<s>" + PROMPT)
    assert tokens == tiny_engine.prompt_tokens(PROMPT)
    assert tokens.count(tokens[0]) == 1


def test_stop_string_ends_generation_and_is_not_returned(tiny_engine):
    full = tiny_engine.generate(PROMPT, GREEDY).text
    # Pick a stop string from the middle of the greedy reply; greedy decoding repeats it exactly.
    start = next(i for i in range(len(full) // 3, len(full) - 3) if full.find(full[i : i + 3]) == i)
    stop = full[start : start + 3]
    completion = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, stop=(stop, "\x00never")))
    assert completion.finish_reason == "stop"
    assert completion.text == full[:start]
    assert stop not in completion.text


def test_same_seed_same_text_at_positive_temperature(tiny_engine):
    params = SamplingParams(max_tokens=20, temperature=1.0, seed=1234)
    first = tiny_engine.generate(PROMPT, params).text
    assert tiny_engine.generate(PROMPT, params).text == first
    others = {tiny_engine.generate(PROMPT, SamplingParams(max_tokens=20, temperature=1.0, seed=s)).text for s in (1, 2, 3)}
    assert others - {first}, "different seeds should give different samples"


def test_every_delta_is_valid_utf8(tiny_engine):
    # The tiny vocabulary has raw byte tokens, so random sampling produces partial and invalid sequences.
    generation = tiny_engine.submit(PROMPT, SamplingParams(max_tokens=120, temperature=1.5, top_k=0, top_p=1.0, seed=5))
    deltas = list(generation)
    for delta in deltas:
        assert isinstance(delta, str)
        delta.encode("utf-8")  # raises on lone surrogates
    assert "".join(deltas) == generation.result.text


def test_cancel_frees_the_sequence(tiny_engine):
    generation = tiny_engine.submit(PROMPT, SamplingParams(max_tokens=TINY_CONTEXT, temperature=1.0, seed=3))
    stream = iter(generation)
    first = next(stream)
    generation.cancel()
    generation.cancel()  # idempotent
    rest = list(stream)
    assert generation.result.finish_reason == "cancelled"
    assert generation.result.completion_tokens < TINY_CONTEXT - 20
    # The reply so far is what was streamed before the cancel took effect, nothing lost or added.
    assert generation.result.text == first + "".join(rest)
    assert tiny_engine.stats()["active"] == 0
    # The freed slot serves the next request.
    assert tiny_engine.generate(PROMPT, SamplingParams(max_tokens=4, temperature=0)).finish_reason == "length"


def test_leaving_the_loop_early_cancels(tiny_engine):
    generation = tiny_engine.submit(PROMPT, SamplingParams(max_tokens=TINY_CONTEXT, temperature=1.0, seed=3))
    for _ in generation:
        break
    for _ in generation:  # iterating again waits for the end
        pass
    assert generation.result.finish_reason == "cancelled"
    assert tiny_engine.stats()["active"] == 0


def test_cancelling_a_queued_request_never_starts_it(registry):
    engine = registry.get("tiny-ct")  # one sequence at a time: the second request waits in the queue
    running = engine.submit(PROMPT, SamplingParams(max_tokens=60, temperature=0))
    queued = engine.submit(PROMPT, SamplingParams(max_tokens=60, temperature=0))
    queued.cancel()
    assert list(queued) == [] or queued.result.finish_reason == "cancelled"
    assert queued.result.finish_reason == "cancelled"
    list(running)
    assert running.result.finish_reason == "length"


def test_ctransformers_serves_requests_one_at_a_time_in_order(registry):
    engine = registry.get("tiny-ct")
    # Each request is shorter than the one before: an engine that ran them side by side would
    # finish a later one first; one at a time in order, each finishes after its predecessor.
    generations = [engine.submit(PROMPT, SamplingParams(max_tokens=tokens, temperature=0)) for tokens in (40, 8, 2)]
    list(generations[1])
    assert generations[0].done
    list(generations[2])
    assert generations[1].done
    assert [g.result.finish_reason for g in generations] == ["length"] * 3


def test_context_overflow_is_raised_at_submit(tiny_engine):
    words = "the " * (TINY_CONTEXT + 10)
    queued_before = tiny_engine.stats()["queued"]
    with pytest.raises(ContextOverflow) as raised:
        tiny_engine.submit(words, GREEDY)
    assert raised.value.context_length == TINY_CONTEXT == tiny_engine.context_length
    assert raised.value.prompt_tokens == len(tiny_engine.prompt_tokens(words)) > TINY_CONTEXT
    assert tiny_engine.stats()["queued"] == queued_before


def test_prompt_that_leaves_no_room_for_one_token_overflows(tiny_engine):
    prompt = " ".join(["the"] * (TINY_CONTEXT - 1))  # BOS + TINY_CONTEXT - 1 tokens fill the context exactly
    assert len(tiny_engine.prompt_tokens(prompt)) == TINY_CONTEXT
    with pytest.raises(ContextOverflow):
        tiny_engine.submit(prompt, GREEDY)


def test_max_tokens_is_clipped_to_the_room_left(tiny_engine):
    prompt = " ".join(["the"] * (TINY_CONTEXT - 4))  # leaves 3 tokens
    completion = tiny_engine.generate(prompt, SamplingParams(max_tokens=100, temperature=0, repetition_penalty=1.0))
    assert completion.finish_reason == "length"
    assert completion.completion_tokens == 3
    assert completion.prompt_tokens + completion.completion_tokens == TINY_CONTEXT


async def test_async_iteration_does_not_block_the_event_loop(tiny_engine):
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    ticking = asyncio.create_task(ticker())
    generation = tiny_engine.submit(PROMPT, SamplingParams(max_tokens=40, seed=11))
    deltas = [delta async for delta in generation]
    ticking.cancel()
    assert "".join(deltas) == generation.result.text
    assert generation.result.completion_tokens <= 40
    assert ticks > len(deltas)  # the loop kept running while we waited for tokens
    expected = tiny_engine.generate(PROMPT, SamplingParams(max_tokens=40, seed=11)).text
    assert generation.result.text == expected


async def test_async_task_cancellation_cancels_the_generation(tiny_engine):
    generation = tiny_engine.submit(PROMPT, SamplingParams(max_tokens=TINY_CONTEXT, temperature=1.0, seed=2))
    started = asyncio.Event()

    async def consume():
        async for _ in generation:
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()  # what a client disconnect does to a streaming response
    with pytest.raises(asyncio.CancelledError):
        await task
    async for _ in generation:
        pass
    assert generation.result.finish_reason == "cancelled"


def test_grammar_constrains_llama_cpp_output(registry):
    engine = registry.get("tiny-llama")
    grammar = 'root ::= ("yes" | "no") "."'
    for seed in (1, 2, 3):
        completion = engine.generate(PROMPT, SamplingParams(max_tokens=10, seed=seed, grammar=grammar))
        assert completion.text in ("yes.", "no.")
        assert completion.finish_reason == "stop"  # after the grammar completes only end-of-generation is allowed


def test_a_vanishing_temperature_samples_the_likeliest_token_as_zero_does(registry):
    """Logits divided by 1e-40 overflow llama.cpp's 32-bit floats: it then sampled the same nonsense for every seed."""
    engine = registry.get("tiny-llama")
    greedy = engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0)).text
    assert all(engine.generate(PROMPT, SamplingParams(max_tokens=10, temperature=1e-40, seed=seed)).text == greedy
               for seed in (1, 2))
    assert SamplingParams(temperature=1e-7).greedy and not SamplingParams(temperature=0.01).greedy


def test_invalid_grammar_is_rejected_at_submit(registry):
    with pytest.raises(InvalidRequest):
        registry.get("tiny-llama").submit(PROMPT, SamplingParams(grammar="root ::= (unclosed"))


def test_ctransformers_refuses_what_it_cannot_do(registry):
    engine = registry.get("tiny-ct")
    with pytest.raises(UnsupportedFeature, match="llama_cpp"):
        engine.submit(PROMPT, SamplingParams(grammar='root ::= "yes"'))
    with pytest.raises(UnsupportedFeature):
        engine.submit(PROMPT, SamplingParams(presence_penalty=0.5))


def test_penalties_are_applied_by_llama_cpp(registry):
    engine = registry.get("tiny-llama")
    plain = engine.generate(PROMPT, SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.0))
    penalised = engine.generate(
        PROMPT,
        SamplingParams(max_tokens=30, temperature=0, repetition_penalty=1.0, presence_penalty=2.0, frequency_penalty=2.0),
    )
    assert plain.text != penalised.text


def test_invalid_sampling_params_are_client_errors():
    with pytest.raises(InvalidRequest):
        SamplingParams(max_tokens=0)
    with pytest.raises(InvalidRequest):
        SamplingParams(stop=("",))
    assert SamplingParams(stop="END").stop == ("END",)


def test_stats_report_the_counters(tiny_engine):
    tiny_engine.generate(PROMPT, SamplingParams(max_tokens=3, temperature=0))
    stats = tiny_engine.stats()
    for key in ("active", "queued", "prefix_hits", "prefix_misses", "tokens_generated", "prompt_tokens"):
        assert isinstance(stats[key], int)
    assert stats["tokens_generated"] >= 3 and stats["active"] == 0


def test_characters_built_from_byte_tokens_arrive_whole(registry):
    # "ö" is not in the tiny vocabulary: the grammar forces it out as two raw byte tokens.
    engine = registry.get("tiny-llama")
    generation = engine.submit(PROMPT, SamplingParams(max_tokens=10, seed=1, grammar='root ::= "ö日ö" "😀"'))
    deltas = list(generation)
    assert "".join(deltas) == generation.result.text == "ö日ö😀"
    assert generation.result.completion_tokens > 4  # more tokens than characters: some came in pieces
    assert not any("\ufffd" in delta for delta in deltas)


@pytest.mark.smollm2
def test_grammar_sampling_checks_the_free_choice_first_and_matches_full_filtering(smollm2, monkeypatch):
    """A grammar's token is sampled freely and checked alone; when rejected, the shortlist of the most likely
    tokens is filtered first. The greedy reply equals filtering every candidate of the vocabulary at every step."""
    from chat.engine.backends import constrained
    from chat.engine.backends.constrained import ConstrainedSampler
    from chat.engine.grammars import json_object_grammar

    prompt = smollm2.render_chat([{"role": "user", "content": "Describe a pirate ship as a JSON object."}])
    params = SamplingParams(max_tokens=48, temperature=0, grammar=json_object_grammar())
    verdicts, resamples = [], []
    allowed, sample_allowed = ConstrainedSampler._allowed, ConstrainedSampler._sample_allowed

    def recording(self, grammar, token):
        verdicts.append(allowed(self, grammar, token))
        return verdicts[-1]

    def counted(self, *args):
        resamples.append(1)
        return sample_allowed(self, *args)

    # Both compared runs reuse the prompt's cached prefix: a cold evaluation splits the prompt otherwise, and on some
    # CPUs (AVX-512 without AMX, measured) that moves near-tied logits enough to flip a greedy choice.
    smollm2.generate(prompt, params)
    monkeypatch.setattr(ConstrainedSampler, "_allowed", recording)
    monkeypatch.setattr(ConstrainedSampler, "_sample_allowed", counted)
    checked_first = smollm2.generate(prompt, params)
    assert checked_first.text.lstrip().startswith("{")
    sampled = checked_first.completion_tokens + (checked_first.finish_reason == "stop")  # the end token is checked too
    assert len(verdicts) == sampled + len(resamples)  # each token checked once, a resampled one once more
    assert len(resamples) == verdicts.count(False) and len(resamples) < sampled / 2  # mostly no filtering

    def always_filtered(self, *, context, index, chain, grammar):
        token = sample_allowed(self, context, index, chain, grammar)
        self._llama.llama_sampler_accept(grammar, token)
        self._llama.llama_sampler_accept(chain, token)
        return token

    monkeypatch.setattr(ConstrainedSampler, "sample", always_filtered)
    assert smollm2.generate(prompt, params).text == checked_first.text  # the shortlist at every step
    monkeypatch.setattr(constrained, "SHORTLIST", 10**9)
    assert smollm2.generate(prompt, params).text == checked_first.text  # the whole vocabulary at every step


async def test_a_quiet_generation_yields_keep_alives_from_one_timer_and_no_task_per_delta():
    """keep_alive_every: None after each quiet interval, the text deltas as they come; no task is created per
    delta (the old path made one per token, plus an asyncio.wait timer)."""
    from chat.engine.generation import Generation

    generation = Generation("quiet")
    generation.keep_alive_every(0.05)
    loop = asyncio.get_running_loop()
    tasks_before = len(asyncio.all_tasks(loop))

    async def push_later():
        await asyncio.sleep(0.18)
        for text in ("a", "b", "c"):
            generation._push_text(text)
            await asyncio.sleep(0)
        generation._push_done(None)

    pusher = asyncio.ensure_future(push_later())
    seen, tasks_during = [], 0
    async for delta in generation:
        seen.append(delta)
        tasks_during = max(tasks_during, len(asyncio.all_tasks(loop)))
    await pusher
    keepalives = [d for d in seen if d is None]
    assert 2 <= len(keepalives) <= 4 and "".join(d for d in seen if d) == "abc"
    assert tasks_during <= tasks_before + 1  # the pusher only


async def test_a_step_wakes_each_event_loop_once_for_all_its_streams():
    from chat.engine.generation import Generation, wakes_batched

    loop = asyncio.get_running_loop()
    generations = [Generation(f"g{i}") for i in range(4)]
    readers = [asyncio.ensure_future(g.__aiter__().__anext__()) for g in generations]
    await asyncio.sleep(0.01)  # every reader waits for its first delta
    calls = []
    original = loop.call_soon_threadsafe
    loop.call_soon_threadsafe = lambda *args: (calls.append(args), original(*args))[1]
    try:
        with wakes_batched():
            for generation in generations:
                generation._push_text("x")
        assert [d for d in await asyncio.gather(*readers)] == ["x"] * 4
    finally:
        del loop.call_soon_threadsafe
    assert len(calls) == 1


async def test_deliver_every_hands_over_text_at_most_once_an_interval_the_first_at_once():
    """deliver_every: tokens pushed every 5 ms from the scheduler's thread reach the reader in a few deltas, at most
    one per interval, all their text in order; the first comes at once. Without it every token is its own delta."""
    import threading
    import time

    from chat.engine.generation import Generation

    async def read(interval: float) -> tuple[list[str], float]:
        generation = Generation("paced")
        generation.deliver_every(interval)
        pushed = []

        def scheduler():
            started = time.perf_counter()
            for number in range(60):
                generation._push_text(f"{number},")
                time.sleep(0.005)
            pushed.append(time.perf_counter() - started)
            generation._push_done(None)

        thread = threading.Thread(target=scheduler)
        thread.start()
        seen = [delta async for delta in generation if delta]
        thread.join()
        return seen, pushed[0]

    seen, duration = await read(0.1)
    assert "".join(seen) == "".join(f"{n}," for n in range(60))
    assert seen[0].count(",") <= 3  # the first token at once, not after an interval
    assert 2 <= len(seen) <= 2 + duration / 0.1  # one delta per interval at most (plus the first and the end)

    unpaced, _ = await read(0)
    assert len(unpaced) >= 30  # every token its own delta (a few may pile up while the loop is busy)


async def test_deliver_every_does_not_hold_back_the_end():
    """A reader holding back text for an interval gets it, and the end, as soon as the generation ends."""
    from chat.engine.generation import Generation

    generation = Generation("ending")
    generation.deliver_every(30)
    reader = generation.__aiter__()
    generation._push_text("first")
    assert await reader.__anext__() == "first"
    later = asyncio.ensure_future(reader.__anext__())  # now holding for 30 s
    await asyncio.sleep(0.05)
    generation._push_text(" and last")
    generation._push_done(None)
    assert await asyncio.wait_for(later, 2) == " and last"
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(reader.__anext__(), 2)


async def test_a_reader_that_leaves_while_holding_back_text_cancels_the_generation():
    """A client gone while its stream waits out an interval (deliver_every) cancels the generation at once."""
    from chat.engine.generation import Generation

    generation = Generation("left")
    generation.deliver_every(30)

    async def read():
        async for _ in generation:
            pass

    generation._push_text("first")
    reader = asyncio.ensure_future(read())
    await asyncio.sleep(0.05)  # the first delta taken: holding for 30 s
    assert not generation.cancel_requested
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert generation.cancel_requested and not generation._end_waiters
