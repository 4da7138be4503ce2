"""`n` choices through the official OpenAI client against the live server: whole and streamed, each with its
index, the prompt counted once in usage."""

import pytest

pytestmark = pytest.mark.smollm2

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "Name a colour."}]


def test_n_choices_whole(live_api):
    reply = live_api.client().chat.completions.create(model=MODEL, messages=QUESTION, n=3, max_tokens=6,
                                                      temperature=1.0, seed=5)
    assert [choice.index for choice in reply.choices] == [0, 1, 2]
    assert all(choice.message.content for choice in reply.choices)
    single = live_api.client().chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=6, seed=5,
                                                       temperature=1.0, extra_headers={"Cache-Control": "no-cache"})
    assert reply.usage.prompt_tokens == single.usage.prompt_tokens  # counted once, not three times
    assert reply.choices[0].message.content == single.choices[0].message.content  # choice 0 has the seed itself


def test_n_choices_streamed(live_api):
    stream = live_api.client().chat.completions.create(model=MODEL, messages=QUESTION, n=2, max_tokens=6,
                                                       stream=True, stream_options={"include_usage": True})
    texts, finished, usage = {0: "", 1: ""}, set(), None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finished.add(choice.index)
    assert finished == {0, 1} and all(texts.values())
    assert usage.completion_tokens >= 2 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
