"""logit_bias: llama.cpp's logit-bias sampler in each sequence's chain; refused where a backend cannot apply it."""

import pytest

from chat.engine import InvalidRequest, SamplingParams, UnsupportedFeature

GREEDY = dict(max_tokens=8, temperature=0, repetition_penalty=1.0)


@pytest.mark.smollm2
def test_a_banned_token_is_never_sampled(smollm2):
    prompt = "The capital of France is"
    plain = smollm2.generate(prompt, SamplingParams(**GREEDY, logprobs=0))
    first = smollm2.tokenize(plain.logprobs[0].token, special=False)
    assert len(first) == 1, plain.logprobs[0]  # the greedy reply's first token, as an id
    banned = smollm2.generate(prompt, SamplingParams(**GREEDY, logprobs=0, logit_bias=((first[0], -100),)))
    assert banned.completion_tokens > 0
    assert plain.logprobs[0].token not in [record.token for record in banned.logprobs]
    assert banned.text != plain.text


@pytest.mark.smollm2
def test_a_strong_positive_bias_forces_a_token(smollm2):
    forced = smollm2.tokenize(" zebra", special=False)
    assert len(forced) == 1
    reply = smollm2.generate("The capital of France is", SamplingParams(**GREEDY, logit_bias=((forced[0], 100),)))
    assert reply.text.startswith(" zebra")


def test_token_ids_outside_the_vocabulary_are_invalid(registry):
    engine = registry.get("tiny-llama")
    with pytest.raises(InvalidRequest):
        engine.submit("Hi", SamplingParams(**GREEDY, logit_bias=((10**7, -100),)))
    with pytest.raises(InvalidRequest):
        SamplingParams(**GREEDY, logit_bias=((1, -101),))
    with pytest.raises(InvalidRequest):  # llama.cpp would abort the process on an unknown id
        engine.detokenize([10**7])


def test_ctransformers_refuses_logit_bias(registry):
    engine = registry.get("tiny-ct")
    with pytest.raises(UnsupportedFeature):
        engine.submit("Hi", SamplingParams(**GREEDY, logit_bias=((1, 5),)))
    with pytest.raises(InvalidRequest):
        engine.detokenize([10**7])
