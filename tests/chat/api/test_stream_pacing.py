"""STREAM_INTERVAL_MS: a stream's text goes out at most every interval, tokens decoded meanwhile in one chunk; the
first at once, the end not held back, the text and usage as without it. A tiny random-weight model."""

import json
import time

import pytest
from asgiref.sync import async_to_sync

from chat.engine.faults import Faults
from chat.engines import get_engine
from tests.factories import make_api_client, serve_tiny_model, write_tiny_gguf

pytestmark = pytest.mark.django_db(transaction=True)

URL = "/v1/chat/completions"
BODY = {"messages": [{"role": "user", "content": "Count with me."}], "max_tokens": 24, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, "store": False}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("pacing") / "tiny.gguf")


@pytest.fixture
def tiny_site(settings, tiny_model):
    serve_tiny_model(settings, tiny_model, context_length=2048)


def streamed(client) -> tuple[list[str], dict, float]:
    async def read(stream):
        return [chunk async for chunk in stream]

    started = time.perf_counter()
    response = client.post(URL, BODY, format="json", HTTP_CACHE_CONTROL="no-cache")
    text = b"".join(async_to_sync(read)(response.streaming_content)).decode()
    seconds = time.perf_counter() - started
    events = [json.loads(line[6:]) for line in text.split("\n") if line.startswith("data: {")]
    contents = [e["choices"][0]["delta"]["content"] for e in events if e.get("choices") and e["choices"][0]["delta"].get("content")]
    usage = next(e["usage"] for e in events if e.get("usage"))
    return contents, usage, seconds


@pytest.fixture
def slow_steps(tiny_site, monkeypatch):
    """Scheduler steps of 10 ms: the tiny model alone decodes its 24 tokens before a reader looks."""
    monkeypatch.setattr(get_engine(), "faults", Faults(step=lambda step: time.sleep(0.01)))


def test_text_goes_out_at_most_every_interval_and_the_end_is_not_held_back(slow_steps, settings):
    client = make_api_client("pacer")
    settings.STREAM_INTERVAL_MS = 0
    every_token, usage, _ = streamed(client)
    assert usage["completion_tokens"] == 24 and len(every_token) > 12  # (byte pieces of one character go together)
    settings.STREAM_INTERVAL_MS = 100
    paced, paced_usage, seconds = streamed(client)
    assert 2 <= len(paced) <= 2 + seconds / 0.1  # the first at once, then one chunk per 100 ms at most
    assert "".join(paced) == "".join(every_token) and paced_usage["completion_tokens"] == 24
    settings.STREAM_INTERVAL_MS = 60_000
    held, _, seconds = streamed(client)
    assert len(held) == 2 and seconds < 10  # the first, then the rest with the end, not a minute later
