"""RemoteEngine over scripted upstreams (tests/fake_upstream.py): failover under a grammar, health probes, fair
admission between owners. The upstream servers are outside the project; everything of ours runs for real."""

from __future__ import annotations

import time

import pytest

from chat.engine import SamplingParams
from chat.engine import remote
from chat.engine.errors import ModelUnavailable, UnsupportedFeature
from chat.engine.remote import RemoteEngine, RenderedChat
from tests.fake_upstream import FakeUpstream

GRAMMAR = 'root ::= "{" [a-z ]* "}"'  # what response_format becomes (a GBNF grammar sent upstream)


def chat(engine: RemoteEngine, text: str) -> RenderedChat:
    return engine.render_chat([{"role": "user", "content": text}])


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


def status_of(engine: RemoteEngine, upstream: FakeUpstream) -> dict:
    (row,) = [row for row in engine.stats()["upstreams"] if row["upstream"] == f"127.0.0.1:{upstream.port}"]
    return row


# -- failover under a grammar ----------------------------------------------------------------------------------


def test_a_reply_under_a_grammar_fails_instead_of_being_continued_on_another_upstream(upstreams, engines):
    dying, spare = upstreams(words=("{", "the", "}"), die_after=1), upstreams()
    engine = engines(dying, spare, routing="round_robin")  # the first request goes to the first upstream
    generation = engine.submit(chat(engine, "Describe a ship as JSON."), SamplingParams(max_tokens=16, grammar=GRAMMAR))
    with pytest.raises(ModelUnavailable):
        "".join(generation)
    assert dying.requests and dying.requests[0]["grammar"] == GRAMMAR
    assert spare.requests == []  # the grammar would start over after "{" there: never joined


def test_a_reply_without_a_grammar_is_continued_on_the_next_upstream(upstreams, engines):
    dying, spare = upstreams(words=("Once", " upon"), die_after=1), upstreams(words=(" a", " time."))
    engine = engines(dying, spare, routing="round_robin")
    text = "".join(engine.submit(chat(engine, "Tell a story."), SamplingParams(max_tokens=16)))
    assert text == "Once a time."  # the spare's own words after the partial text
    assert spare.requests[0]["messages"][-1] == {"role": "assistant", "content": "Once"}


# -- health checks --------------------------------------------------------------------------------------------


def test_a_failed_health_check_takes_an_upstream_out_and_a_passed_one_brings_it_back(upstreams, engines):
    upstream = upstreams()
    engine = engines(upstream, health_interval=0.05)
    upstream.health = 503
    assert wait_until(lambda: not status_of(engine, upstream)["up"])
    upstream.health = 200
    assert wait_until(lambda: status_of(engine, upstream)["up"])


def test_a_hung_health_probe_delays_no_other_upstreams_probe(upstreams, engines, monkeypatch):
    monkeypatch.setattr(remote, "HEALTH_TIMEOUT", 5.0)  # the hung probe is still open when the other is seen
    hung, failing = upstreams(), upstreams()
    hung.hang_health, failing.health = True, 503
    engine = engines(hung, failing, health_interval=0.05)
    assert wait_until(lambda: not status_of(engine, failing)["up"])
    assert status_of(engine, hung)["up"]  # its probe has not timed out yet: the probes ran side by side
    assert wait_until(lambda: not status_of(engine, hung)["up"])  # and then it times out: down


# -- fair admission -------------------------------------------------------------------------------------------


def test_workers_take_requests_fairly_between_owners(upstreams, engines):
    upstream = upstreams()
    upstream.gate.clear()  # replies wait: one worker holds the first, the rest queue
    engine = engines(upstream, max_connections=1)
    params = SamplingParams(max_tokens=8)
    generations = [engine.submit(chat(engine, "flood 1"), params, owner="user:1")]
    generations += [engine.submit(chat(engine, f"flood {n}"), params, owner="user:1") for n in (2, 3, 4)]
    generations.append(engine.submit(chat(engine, "polite 1"), params, owner="user:2"))
    upstream.gate.set()
    for generation in generations:
        "".join(generation)
    order = [body["messages"][-1]["content"] for body in upstream.requests]
    assert order == ["flood 1", "polite 1", "flood 2", "flood 3", "flood 4"]


def test_a_grammar_is_refused_for_an_upstream_that_would_not_enforce_it(upstreams, engines):
    upstream = upstreams(tokenize=False)  # no llama.cpp tokenize endpoint: not a llama.cpp server
    engine = engines(upstream)
    with pytest.raises(UnsupportedFeature):
        engine.submit(chat(engine, "Describe a ship as JSON."), SamplingParams(max_tokens=8, grammar=GRAMMAR))
    assert upstream.requests == []
    assert "".join(engine.submit(chat(engine, "Hello"), SamplingParams(max_tokens=8)))  # plain text still goes


def test_a_client_reads_an_upstreams_rejection_only_as_a_one_line_message():
    """A validation error's structure (FastAPI's 422 lists each field with its `input`) or a raw body can echo
    the request, whose first message is the character's system prompt."""
    import json

    from chat.engine.upstream import upstream_client_message

    echoed = {"detail": [{"type": "missing", "loc": ["body", "x"], "msg": "Field required",
                          "input": {"messages": [{"role": "system", "content": "SECRET persona"}]}}]}
    for body, status in ((json.dumps(echoed).encode(), 422), (b"<pre>SECRET persona</pre>", 400),
                         (json.dumps({"error": {"message": "SECRET\npersona"}}).encode(), 400)):
        message = upstream_client_message(body, status)
        assert "SECRET" not in message and f"HTTP {status}" in message
    said = json.dumps({"error": {"message": "Invalid grammar at line 1", "type": "invalid_request_error"}})
    assert upstream_client_message(said.encode(), 400) == "Invalid grammar at line 1"
