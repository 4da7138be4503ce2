"""An exact repeat of a tool call already made in the same reply ends the reply (chat/tooling/calls.py)."""

import asyncio

import pytest

from chat.engine import Completion
from chat.engine.generation import Generation
from chat.tooling import calls
from chat.tooling.calls import RepeatStoppingGeneration, RepeatWatch, ToolCallReader, tool_finish_reason, tool_reply

PARIS = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
OSLO = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
REPEATING = "\n".join([PARIS, OSLO, PARIS, PARIS, OSLO])


@pytest.mark.parametrize("step", [1, 3, 7, 50, len(REPEATING)])
def test_the_text_ends_before_the_first_repeat_however_it_is_cut(step):
    watch = RepeatWatch()
    released = "".join(watch.feed(REPEATING[start:start + step]) for start in range(0, len(REPEATING), step))
    released += watch.finish()
    assert watch.repeated and released == PARIS + "\n" + OSLO


def test_distinct_calls_and_plain_text_pass_untouched():
    watch = RepeatWatch()
    text = PARIS + "\n" + PARIS.replace("Paris", "Paris, TX")  # starts like a repeat, then differs
    assert watch.feed(text[:len(PARIS) + 30]) + watch.feed(text[len(PARIS) + 30:]) + watch.finish() == text
    assert not watch.repeated
    plain = RepeatWatch()
    assert plain.feed("It is sunny <tool_call> in ") + plain.feed("Paris.") + plain.finish() == \
        "It is sunny <tool_call> in Paris."


def test_a_long_call_is_searched_for_a_block_only_when_a_closing_tag_arrives(monkeypatch):
    """The watch runs once a token on the event loop: a search of the whole call on every token is quadratic in a
    long call (128 KB of arguments took 16 s)."""
    searched = []

    class CountingBlock:
        def search(self, text):
            searched.append(len(text))
            return BLOCK.search(text)

    BLOCK = calls.TOOL_CALL_BLOCK
    monkeypatch.setattr(calls, "TOOL_CALL_BLOCK", CountingBlock())
    long_call = PARIS.replace('"Paris"', '"' + "Paris " * 2000 + '"')
    text = PARIS + "\n" + long_call + "\n" + PARIS
    watch = RepeatWatch()
    released = "".join(watch.feed(text[start:start + 4]) for start in range(0, len(text), 4)) + watch.finish()
    assert watch.repeated and released == PARIS + "\n" + long_call
    assert len(searched) == 3  # one search per closing tag, not one per piece


@pytest.mark.parametrize("step", [1, 5, 4096])
def test_a_reply_of_many_calls_reads_the_same_whole_and_streamed(step):
    text = "\n".join(PARIS.replace("Paris", f"Paris {index}") for index in range(300)) + "\nDone."
    reader = ToolCallReader()
    for start in range(0, len(text), step):
        reader.feed(text[start:start + step])
    reader.finish()
    content, read = tool_reply(text)
    assert [call["function"] for call in read] == [call["function"] for call in reader.calls]
    assert len(read) == 300 and read[299]["function"] == {"name": "get_weather",
                                                          "arguments": '{"city": "Paris 299"}'}
    assert content == reader.content == "\nDone."


def generation_of(pieces: list[str]) -> Generation:
    generation = Generation("test")
    for piece in pieces:
        generation._push_text(piece)
    generation._push_done(Completion(text="".join(pieces), finish_reason="length", prompt_tokens=10,
                                     completion_tokens=90))
    return generation


def test_the_generation_ends_at_the_repeat_sync_and_async():
    pieces = [REPEATING[start:start + 5] for start in range(0, len(REPEATING), 5)]
    wrapped = RepeatStoppingGeneration(generation_of(pieces))
    assert "".join(wrapped) == PARIS + "\n" + OSLO
    assert wrapped.result.text == PARIS + "\n" + OSLO and wrapped.result.finish_reason == "stop"
    assert wrapped.result.completion_tokens == 90  # the tokens generated still count
    content, calls = tool_reply(wrapped.result.text)
    assert content is None and [call["function"]["arguments"] for call in calls] == [
        '{"city": "Paris"}', '{"city": "Oslo"}']
    assert tool_finish_reason(wrapped.result.finish_reason, bool(calls)) == "tool_calls"

    async def read():
        wrapped = RepeatStoppingGeneration(generation_of(pieces))
        return "".join([delta async for delta in wrapped]), wrapped.result

    text, result = asyncio.run(read())
    assert text == PARIS + "\n" + OSLO and result.finish_reason == "stop"


def test_a_reply_without_repeats_keeps_its_finish_reason():
    wrapped = RepeatStoppingGeneration(generation_of([PARIS, "\n", OSLO]))
    assert "".join(wrapped) == PARIS + "\n" + OSLO and wrapped.result.finish_reason == "length"
