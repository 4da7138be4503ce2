"""`manage.py serve` runs on uvloop by default and on asyncio's own loop with EVENT_LOOP=asyncio (llmsite/event_loop.py);
a reply streams on either."""

from __future__ import annotations

import asyncio

import httpx
import pytest
import uvloop

from llmsite.event_loop import install_event_loop
from tests.live import LiveServer, content_of, prepare_database, sse_events


@pytest.fixture
def default_policy():
    yield
    asyncio.set_event_loop_policy(None)


def test_uvloop_makes_the_new_event_loops(default_policy):
    install_event_loop("uvloop")
    loop = asyncio.new_event_loop()
    try:
        assert isinstance(loop, uvloop.Loop)
    finally:
        loop.close()


def test_asyncio_leaves_the_default_event_loop(default_policy):
    install_event_loop("asyncio")
    loop = asyncio.new_event_loop()
    try:
        assert not isinstance(loop, uvloop.Loop)
        assert isinstance(loop, asyncio.SelectorEventLoop)
    finally:
        loop.close()


@pytest.mark.parametrize(("setting", "loop_class"), [(None, "uvloop.Loop"),
                                                      ("asyncio", "asyncio.unix_events._UnixSelectorEventLoop")])
def test_the_server_streams_on_the_event_loop_it_is_given(tmp_path, monkeypatch, setting, loop_class):
    monkeypatch.delenv("EVENT_LOOP", raising=False)  # None: the default
    server = LiveServer(workdir=tmp_path, env={"API_RATE_LIMIT": "", "LOG_LEVEL": "INFO",
                                               **({"EVENT_LOOP": setting} if setting else {})})
    key = prepare_database(server, {"alice": ["alice"]})["alice"]
    server.start()
    try:
        body = {"messages": [{"role": "user", "content": "Say hello."}], "stream": True, "max_tokens": 8,
                "temperature": 0, "store": False}
        headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers,
                          timeout=120) as response:
            assert response.status_code == 200
            events = sse_events(response)
        assert events[-1] == "[DONE]"
        assert "".join(content_of(event) for event in events)
        assert f"event loop: {loop_class} (EVENT_LOOP={setting or 'uvloop'})" in server.log()
    finally:
        server.stop()
