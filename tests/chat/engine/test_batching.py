"""Continuous batching (llama_cpp): sequences decoded together give exactly what they give alone."""

import pytest

from chat.engine import SamplingParams

GREEDY = SamplingParams(max_tokens=24, temperature=0)
TINY_PROMPTS = [
    "the capital of france is",
    "hello world what",
    "water sound people day number first who may down side been now find",
    "yes no stop",
]
SMOLLM2_QUESTIONS = [
    "Name three colours.",
    "What is 2 + 2?",
    "Write one sentence about the sea.",
    "Who wrote Hamlet?",
]


def alone_then_together(engine, prompts, params):
    alone = [engine.generate(prompt, params) for prompt in prompts]
    generations = [engine.submit(prompt, params) for prompt in prompts]  # all queued before the next step
    together = []
    for generation in generations:
        list(generation)
        together.append(generation.result)
    return alone, together


def test_batched_greedy_decoding_matches_decoding_alone(registry):
    engine = registry.get("tiny-batch")
    alone, together = alone_then_together(engine, TINY_PROMPTS, GREEDY)
    assert [c.text for c in together] == [c.text for c in alone]
    assert [c.completion_tokens for c in together] == [c.completion_tokens for c in alone]
    assert engine.stats()["peak_active"] >= 2  # they really shared decode steps


def test_sequences_joining_mid_generation_match_decoding_alone(registry):
    engine = registry.get("tiny-batch")
    long_params = SamplingParams(max_tokens=80, temperature=0)
    expected_long = engine.generate(TINY_PROMPTS[0], long_params).text
    expected_short = [engine.generate(p, GREEDY).text for p in TINY_PROMPTS[1:]]

    long_run = engine.submit(TINY_PROMPTS[0], long_params)
    stream = iter(long_run)
    next(stream)  # the long sequence is decoding; the others join between its steps
    joined = [engine.submit(p, GREEDY) for p in TINY_PROMPTS[1:]]
    assert [("".join(g), g.result.text)[1] for g in joined] == expected_short
    list(stream)
    assert long_run.result.text == expected_long


def test_more_requests_than_slots_all_complete(registry):
    engine = registry.get("tiny-batch")  # parallel=4
    prompts = [f"{word} world" for word in ("hello", "paris", "water", "people", "sound", "number", "city", "time")]
    expected = [engine.generate(p, GREEDY).text for p in prompts]
    generations = [engine.submit(p, GREEDY) for p in prompts]
    assert [("".join(g), g.result.text)[1] for g in generations] == expected
    assert engine.stats()["active"] == 0 and engine.stats()["queued"] == 0


def test_seeded_sampling_is_independent_of_batch_neighbours(registry):
    engine = registry.get("tiny-batch")
    params = [SamplingParams(max_tokens=20, temperature=1.0, seed=seed) for seed in (1, 2, 3)]
    alone = [engine.generate(TINY_PROMPTS[0], p).text for p in params]
    generations = [engine.submit(TINY_PROMPTS[0], p) for p in params]
    assert [("".join(g), g.result.text)[1] for g in generations] == alone


@pytest.mark.smollm2
def test_smollm2_batched_greedy_decoding_matches_decoding_alone(smollm2):
    prompts = [smollm2.render_chat([{"role": "user", "content": q}]) for q in SMOLLM2_QUESTIONS]
    alone, together = alone_then_together(smollm2, prompts, SamplingParams(max_tokens=16, temperature=0))
    assert [c.text for c in together] == [c.text for c in alone]


@pytest.mark.smollm2
@pytest.mark.parametrize("lone_rows_exact", [True, False], ids=["patched-kernel", "throwaway-rows"])
def test_smollm2_a_long_context_decoded_alone_has_the_logprobs_it_has_beside_others(smollm2, monkeypatch,
                                                                                    lone_rows_exact):
    """Past 512 cells upstream's kernel splits a lone decode row's cells over the threads (another sum order)
    while rows beside others are not split: there the engine decodes a throwaway token beside it. The project's
    build (scripts/llama_cpp_patches/) does not split it, and the engine adds none. Either way a sequence has the
    same logprobs alone as beside others."""
    assert smollm2._backend._lone_rows_exact  # the Makefile's build, 2 threads, 9 heads
    monkeypatch.setattr(smollm2._backend, "_lone_rows_exact", lone_rows_exact)
    system = "You are Captain Mara, a retired sailor who answers kindly and at length about ships. " * 18
    prompts = [smollm2.render_chat([{"role": "system", "content": system}, {"role": "user", "content": q}])
               for q in SMOLLM2_QUESTIONS]
    assert all(300 < len(smollm2.prompt_tokens(prompt)) < 1000 for prompt in prompts)
    params = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    alone, together = alone_then_together(smollm2, prompts, params)

    def logprobs(completion):
        return [(record.logprob, [top.logprob for top in record.top]) for record in completion.logprobs]

    assert [logprobs(c) for c in together] == [logprobs(c) for c in alone]
