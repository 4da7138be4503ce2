"""What each API surface leaves in the usage ledger and the request log: `n` choices, /v1/responses and a
/v1/completions prompt list each record their generations with the request's opaque `user`; a prompt list
counts against the key's concurrency; a prompt that fails cancels the others. A tiny random-weight model: the
texts do not matter."""

import gc
import logging
import time

import pytest

from chat.engine.errors import GenerationFailed
from chat.engine.faults import Faults, InjectedFault
from chat.engines import get_engine
from chat.models import UsageRecord
from chat.services import text_completion_run
from tests.factories import make_api_client, make_character

pytestmark = pytest.mark.django_db(transaction=True)
NO_CACHE = {"HTTP_CACHE_CONTROL": "no-cache"}
END_USER = "sha256:2c26b46b68ffc68f"
PROMPTS = ["The sea is", "One, two,", "Roses are"]


@pytest.fixture
def tiny_site(endless_site):
    endless_site(context_length=1024)


def rows_of(client) -> list[UsageRecord]:
    """The caller's ledger rows, once every generation has settled (a cancelled one settles in a thread)."""
    return list(UsageRecord.objects.filter(owner=client.user).order_by("id"))


def test_n_choices_are_recorded_with_the_requests_end_user(tiny_site):
    client = make_api_client("ann")
    response = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                                    "max_tokens": 3, "user": END_USER}, format="json", **NO_CACHE)
    assert response.status_code == 200, response.content
    assert len(response.json()["choices"]) == 2
    rows = rows_of(client)
    assert rows and all(row.end_user == END_USER for row in rows)


def test_a_response_writes_one_ledger_row(tiny_site):
    client = make_api_client("ann")
    make_character("mira")
    response = client.post("/v1/responses", {"input": "Hi", "max_output_tokens": 3, "character": "mira",
                                             "user": END_USER}, format="json", **NO_CACHE)
    assert response.status_code == 200, response.content
    (row,) = rows_of(client)
    assert row.end_user == END_USER and row.completion_tokens == response.json()["usage"]["output_tokens"]


def test_a_prompt_list_writes_one_row_per_prompt_and_logs_the_end_user(tiny_site, caplog):
    client = make_api_client("ann")
    with caplog.at_level(logging.INFO, logger="llmsite.requests"):
        response = client.post("/v1/completions", {"prompt": PROMPTS, "max_tokens": 3, "user": END_USER},
                               format="json", **NO_CACHE)
    assert response.status_code == 200, response.content
    rows = rows_of(client)
    assert len(rows) == len(PROMPTS) and all(row.end_user == END_USER for row in rows)
    assert sum(row.completion_tokens for row in rows) == response.json()["usage"]["completion_tokens"]
    (line,) = [record for record in caplog.records if record.name == "llmsite.requests"]
    assert line.end_user == END_USER and line.completion_tokens == response.json()["usage"]["completion_tokens"]


@pytest.fixture
def without_cycle_collection():
    """The slot must come back because the request cancelled its generation, not because the garbage collector
    happened to free a traceback holding it (that took over 10 s once, in a full run)."""
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def test_a_prompt_list_takes_a_concurrency_slot_per_prompt(tiny_site, without_cycle_collection):
    client = make_api_client("ann")
    client.key.max_concurrent = 1
    client.key.save(update_fields=["max_concurrent"])
    response = client.post("/v1/completions", {"prompt": PROMPTS[:2], "max_tokens": 3}, format="json", **NO_CACHE)
    assert response.status_code == 429, response.content
    assert response.json()["error"]["code"] == "concurrency_limit_exceeded"
    # The slot the first prompt took is given back (its cancelled generation settles in a thread, so
    # allow it a moment): one prompt alone is then admitted.
    deadline = time.monotonic() + 10
    while True:
        alone = client.post("/v1/completions", {"prompt": PROMPTS[0], "max_tokens": 3}, format="json", **NO_CACHE)
        if alone.status_code != 429 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert alone.status_code == 200, alone.content


def test_a_prompt_that_fails_while_read_cancels_the_others(tiny_site, monkeypatch):
    engine = get_engine()
    failing = engine.prompt_tokens(PROMPTS[0])

    def fail_the_first_prompt(sequence):
        if sequence.prompt_tokens == failing:
            raise InjectedFault("injected sampling fault")

    # Every step slowed down: the other prompts' 400 tokens cannot all be decoded before the first one fails.
    monkeypatch.setattr(engine, "faults", Faults(step=lambda step: time.sleep(0.01), sample=fail_the_first_prompt))
    submitted = []
    submit = engine.submit

    def recording_submit(*args, **kwargs):
        submitted.append(submit(*args, **kwargs))
        return submitted[-1]

    monkeypatch.setattr(engine, "submit", recording_submit)
    client = make_api_client("ann")
    # The use case itself, not through the view: the view also cancels its generations when the error response
    # is closed, but no caller of text_completion_run may have to.
    with pytest.raises(GenerationFailed):  # what the engine makes of the injected fault
        text_completion_run(user=client.user, api_key=client.key,
                            data={"prompt": PROMPTS[0], "prompts": PROMPTS, "max_tokens": 400})
    assert len(submitted) == len(PROMPTS), submitted
    assert submitted[0].result is None  # the first one failed
    assert all(generation.cancel_requested for generation in submitted[1:]), submitted
