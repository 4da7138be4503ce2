"""Logprobs in the engine with the tiny model: the model's own distribution, only for the sequences that ask."""

import math

import pytest

from chat.engine import InvalidRequest, SamplingParams, UnsupportedFeature

from .conftest import TINY_CONTEXT

PROMPT = "hello world, the capital of france is"
# Greedy and unpenalised: every sampled token is the most likely one of the raw distribution.
GREEDY = dict(max_tokens=16, temperature=0, repetition_penalty=1.0)


def log_softmax(row) -> list[float]:
    peak = max(row)
    normaliser = peak + math.log(sum(math.exp(value - peak) for value in row))
    return [value - normaliser for value in row]


def test_logprobs_are_the_log_softmax_of_each_steps_logits(registry, tiny_gguf):
    from llama_cpp import Llama  # an independent reference: the high-level API, all logits kept

    engine = registry.get("tiny-llama")
    completion = engine.generate(PROMPT, SamplingParams(logprobs=4, **GREEDY))
    assert completion.logprobs and len(completion.logprobs) == completion.completion_tokens
    reference = Llama(model_path=str(tiny_gguf), n_ctx=TINY_CONTEXT, logits_all=True, n_threads=1, verbose=False,
                      flash_attn=True)  # as the engine runs it
    try:
        reference.eval(engine.prompt_tokens(PROMPT))
        for record in completion.logprobs:
            expected = log_softmax(reference.scores[reference.n_tokens - 1].tolist())
            best = sorted(range(len(expected)), key=lambda token: -expected[token])[:4]
            assert record.logprob == pytest.approx(expected[best[0]], abs=1e-3)
            assert [top.logprob for top in record.top] == pytest.approx([expected[t] for t in best], abs=1e-3)
            reference.eval([best[0]])  # greedy: the engine sampled this token too
    finally:
        reference.close()


def test_only_the_sequences_that_ask_get_logprobs_and_they_cover_the_text(registry):
    engine = registry.get("tiny-llama")
    asking = engine.submit(PROMPT, SamplingParams(logprobs=0, **GREEDY))
    plain = engine.submit(PROMPT, SamplingParams(**GREEDY))  # decoded in the same steps
    deltas = list(asking)
    list(plain)
    records = asking.take_logprobs()
    assert plain.result.logprobs is None and plain.take_logprobs() == []
    assert asking.result.text == plain.result.text  # asking changes nothing about the sampling
    assert records == list(asking.result.logprobs) and all(record.top == () for record in records)
    # The tiny vocabulary has raw byte tokens: the bytes are exact, the text shows U+FFFD where they are not UTF-8.
    assert b"".join(record.bytes for record in records).decode("utf-8", errors="replace") == "".join(deltas)
    assert all(record.logprob <= 0 for record in records)


def test_top_logprobs_out_of_range_and_ctransformers_are_refused(registry):
    with pytest.raises(InvalidRequest):
        SamplingParams(logprobs=21)
    with pytest.raises(UnsupportedFeature, match="llama_cpp"):
        registry.get("tiny-ct").submit(PROMPT, SamplingParams(logprobs=0))
