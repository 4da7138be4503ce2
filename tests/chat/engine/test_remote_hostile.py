"""RemoteEngine against upstreams that answer badly or with hostile intent (tests/fake_upstream.py scripts): what
they send is bounded here, an answer that is not a reply is an upstream failure, their usage is believed only
within what they can have done, malformed chunks are skipped, and pings do not keep a reply alive."""

from __future__ import annotations

import functools
import json
import logging
import time

import pytest

from chat.engine import SamplingParams
from chat.engine import remote
from chat.engine.errors import ModelUnavailable
from chat.engine.remote import RemoteEngine

MAX_TOKENS = 16


@pytest.fixture
def engines(engines):
    """conftest's, in turn between upstreams (a failed one is skipped, the next tried)."""
    return functools.partial(engines, routing="round_robin")

def reply(engine: RemoteEngine, max_tokens: int = MAX_TOKENS):
    """(text, Completion) of one chat request, read to its end."""
    generation = engine.submit(engine.render_chat([{"role": "user", "content": "Hello"}]),
                               SamplingParams(max_tokens=max_tokens))
    text = "".join(generation)
    return text, generation.result


def a_long_stream(answer):
    answer.head()
    for _ in range(2000):  # far past max_tokens (the reviewer's endless stream: 3.4M tokens against 16)
        answer.delta("xy")
    answer.finish(usage={"prompt_tokens": 5, "completion_tokens": 2000})


def one_huge_line(answer):
    answer.head()
    answer.raw(b"data: " + b"a" * (1 << 20) + b"\n\n")  # one SSE line of 1 MiB, the bound here 64 KiB
    answer.finish()


def a_huge_json_body(answer):
    answer.head("application/json")
    body = {"choices": [{"index": 0, "message": {"content": "a" * (1 << 20)}, "finish_reason": "stop"}]}
    answer.raw(json.dumps(body).encode())


def a_login_page(answer):
    answer.head("text/html")
    answer.raw(b"<html><body>Please sign in</body></html>")


def another_choice_only(answer):
    answer.head()
    answer.event({"choices": [{"index": 1, "delta": {"content": "not ours"}, "finish_reason": "stop"}]})
    answer.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    answer.raw(b"data: [DONE]\n\n")


def unreadable_choices_only(answer):
    answer.head()
    answer.event({"choices": ["bad"]})
    answer.finish()


def done_only(answer):
    answer.head()
    answer.raw(b"data: [DONE]\n\n")


def an_empty_reply(answer):  # the model's first token was its end: a reply, though an empty one
    answer.head()
    answer.event({"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
    answer.finish(usage={"prompt_tokens": 5, "completion_tokens": 1})


# -- what an upstream sends is bounded ------------------------------------------------------------------------


def test_a_stream_that_goes_on_past_max_tokens_is_cut_off_as_length(upstreams, engines):
    engine = engines(upstreams(a_long_stream))
    text, result = reply(engine)
    assert result.finish_reason == "length"
    assert text == "xy" * (MAX_TOKENS + remote.PIECE_SLACK)
    assert result.completion_tokens == MAX_TOKENS  # the usage it never sent cannot be charged beyond max_tokens
    assert engine.stats()["tokens_generated"] == MAX_TOKENS


@pytest.mark.parametrize("script", [one_huge_line, a_huge_json_body])
def test_an_answer_past_the_byte_bound_fails_over_to_the_next_upstream(upstreams, engines, monkeypatch, script):
    monkeypatch.setattr(remote, "REPLY_BYTES", 64 * 1024 - MAX_TOKENS * remote.BYTES_PER_TOKEN)
    engine = engines(upstreams(script), upstreams())
    text, result = reply(engine)
    assert (text, result.finish_reason) == ("Hello there.", "stop")
    assert engine.stats()["upstream_failures"] == 1


def test_an_answer_past_the_byte_bound_is_an_upstream_failure_when_no_other_is_left(upstreams, engines,
                                                                                    monkeypatch):
    monkeypatch.setattr(remote, "REPLY_BYTES", 64 * 1024 - MAX_TOKENS * remote.BYTES_PER_TOKEN)
    engine = engines(upstreams(one_huge_line))
    with pytest.raises(ModelUnavailable, match="more than 64 KiB"):
        reply(engine)


def test_an_endless_error_body_is_not_read_to_its_end(upstreams, engines):
    def endless_500(answer):
        answer.head("text/plain", status=500)
        answer.every(0.01, b"x" * 65536, for_seconds=20)

    engine = engines(upstreams(endless_500), upstreams())
    started = time.monotonic()
    text, _ = reply(engine)
    assert text == "Hello there." and time.monotonic() - started < 5


# -- an answer that is not a reply is an upstream failure -----------------------------------------------------


@pytest.mark.parametrize("script", [a_login_page, another_choice_only, unreadable_choices_only, done_only])
def test_an_answer_without_our_choice_is_an_upstream_failure_not_an_empty_reply(upstreams, engines, script):
    engine = engines(upstreams(script))
    with pytest.raises(ModelUnavailable, match="sent no reply"):
        reply(engine)


def a_call_of_an_unoffered_tool(answer):
    answer.head()
    call = {"index": 0, "id": "c1", "type": "function", "function": {"name": "delete_account", "arguments": "{}"}}
    answer.event({"choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]})
    answer.event({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    answer.finish()


def test_a_call_of_a_tool_the_request_did_not_offer_never_reaches_the_client(upstreams, engines):
    engine = engines(upstreams(a_call_of_an_unoffered_tool))
    tools = json.dumps({"tools": [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}],
                        "tool_choice": "auto"})
    generation = engine.submit(engine.render_chat([{"role": "user", "content": "Hello"}]),
                               SamplingParams(max_tokens=MAX_TOKENS, tools_json=tools))
    text = []
    with pytest.raises(ModelUnavailable, match="called a tool that was not offered"):
        for piece in generation:
            text.append(piece)
    assert "delete_account" not in "".join(text)


def test_an_answer_without_our_choice_fails_over_to_the_next_upstream(upstreams, engines):
    engine = engines(upstreams(a_login_page), upstreams())
    assert reply(engine)[0] == "Hello there."


def test_an_empty_reply_with_a_finish_is_still_a_reply(upstreams, engines):
    text, result = reply(engines(upstreams(an_empty_reply)))
    assert (text, result.finish_reason) == ("", "stop")


# -- the upstream's usage is believed within what it can have done ---------------------------------------------


@pytest.mark.parametrize("usage", [
    {"prompt_tokens": -1000000, "completion_tokens": -5000000},
    {"prompt_tokens": 10**30, "completion_tokens": 10**30},
    {"prompt_tokens": "abc", "completion_tokens": "3"},
    {"prompt_tokens": 7.5, "completion_tokens": 2.0},
    {"prompt_tokens": True, "completion_tokens": None},
    b'{"choices": [], "usage": {"prompt_tokens": 1e400, "completion_tokens": -1e400}}',
])
def test_unusable_usage_counts_fall_back_or_are_clamped(upstreams, engines, usage):
    def hi(answer):
        answer.head()
        answer.delta("Hi")
        answer.finish(usage=usage)

    engine = engines(upstreams(hi))
    text, result = reply(engine, max_tokens=200)
    assert text == "Hi" and result.finish_reason == "stop"
    assert type(result.prompt_tokens) is int and 0 < result.prompt_tokens <= engine.context_length
    assert type(result.completion_tokens) is int and 1 <= result.completion_tokens <= len("Hi") + remote.PIECE_SLACK
    stats = engine.stats()
    assert (stats["prompt_tokens"], stats["tokens_generated"]) == (result.prompt_tokens, result.completion_tokens)


def test_usable_usage_counts_are_the_upstreams(upstreams, engines):
    text, result = reply(engines(upstreams(words=("Hello", " there", "."))))
    assert (result.prompt_tokens, result.completion_tokens) == (5, 3)


# -- malformed chunks are skipped -----------------------------------------------------------------------------


def test_malformed_choices_are_skipped_with_one_warning_and_no_traceback(upstreams, engines, caplog):
    def malformed(answer):
        answer.head()
        answer.delta("A")
        answer.delta(5)
        answer.delta([{"type": "text", "text": "B"}, {"type": "image_url", "image_url": {"url": "x"}}])
        answer.event({"choices": ["bad"]})
        answer.event({"choices": [{"index": 0, "delta": "bad"}]})
        answer.event({"choices": "bad"})
        answer.event(b'{"choices": [{"index": 0, "delta": {"content": "C\\ud800D"}}]}')  # a lone surrogate
        answer.finish()

    with caplog.at_level(logging.WARNING, logger="chat.engine.remote"):
        text, result = reply(engines(upstreams(malformed)))
    assert text == "ABC\ufffdD" and result.finish_reason == "stop"
    text.encode("utf-8")  # storable and sendable
    warnings = [record for record in caplog.records if "not one" in record.getMessage()]
    assert len(warnings) == 1 and not any(record.exc_info for record in caplog.records)


# -- pings do not keep a reply alive; nor does anything past reply_timeout ------------------------------------


def test_pings_without_data_end_the_reply_after_timeout(upstreams, engines):
    def drip(answer):
        answer.head()
        answer.every(0.2, b": ping\n\n", for_seconds=8)  # bytes well within `timeout`, data never
        answer.delta("late")
        answer.finish()

    engine = engines(upstreams(drip), timeout=1)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="no data for 1 s"):
        reply(engine)
    assert time.monotonic() - started < 4


def test_a_reply_that_goes_on_past_reply_timeout_fails_without_failover(upstreams, engines):
    def empty_deltas(answer):
        answer.head()
        answer.every(0.1, b'data: {"choices": [{"index": 0, "delta": {}}]}\n\n', for_seconds=8)
        answer.finish()

    spare = upstreams()
    engine = engines(upstreams(empty_deltas), spare, timeout=1, reply_timeout=1)
    started = time.monotonic()
    with pytest.raises(ModelUnavailable, match="did not finish the reply within 1 s"):
        reply(engine)
    assert time.monotonic() - started < 4
    assert spare.requests == []


def test_a_huge_tokenize_answer_is_not_read_whole_and_the_count_is_estimated(upstreams, engines):
    upstream = upstreams()
    huge = b'{"tokens": [' + b"1," * (6 << 20) + b"1]}"  # 12 MB of token ids for a short text
    upstream.tokenize_body = lambda text: huge if text == "a short text" else None
    engine = engines(upstream)
    assert engine.tokenize("Hello") == list(range(2))  # the fair answer
    assert engine.tokenize("a short text") == [0] * -(-len("a short text") // remote.CHARS_PER_TOKEN)  # estimated
    # What arrives is what is counted: a compressed answer could expand a thousandfold past the bounds first.
    assert all(seen.get("Accept-Encoding") == "identity" for seen in upstream.headers_seen)
