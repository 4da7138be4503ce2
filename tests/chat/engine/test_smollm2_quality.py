"""The real SmolLM2-135M-Instruct model answers a simple question sensibly through the engine."""

import pytest

from chat.engine import SamplingParams


@pytest.mark.smollm2
def test_capital_of_france_is_paris(smollm2):
    prompt = smollm2.render_chat([{"role": "user", "content": "What is the capital of France?"}])
    completion = smollm2.generate(prompt, SamplingParams(max_tokens=48, temperature=0))
    assert "paris" in completion.text.lower()
    assert completion.prompt_tokens == len(smollm2.prompt_tokens(prompt))


@pytest.mark.smollm2
def test_smollm2_stops_at_its_end_of_turn_token(smollm2):
    prompt = smollm2.render_chat([{"role": "user", "content": "Say hello."}])
    completion = smollm2.generate(prompt, SamplingParams(max_tokens=200, temperature=0))
    assert completion.finish_reason == "stop"  # <|im_end|> ends the turn and is not in the text
    assert "<|im_end|>" not in completion.text
