"""Graceful drain (chat/ops/drain.py, `manage.py serve`): refuse new work, finish running replies, exit in bounds."""

from __future__ import annotations

import signal
import threading
import time

import httpx
import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chat.ops.drain import drain_begin, drain_reset, requests_in_flight
from llmsite.asgi import application
from tests.factories import make_api_client
from tests.live import LiveServer, content_of, prepare_database, sse_events

STORY = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper and a storm."}]
# SmolLM2's <|endoftext|>, <|im_start|> and <|im_end|> banned: every reply runs to max_tokens, however it is sampled.
NO_END = {"0": -100, "1": -100, "2": -100}


@pytest.fixture
def draining():
    drain_begin()
    try:
        yield
    finally:
        drain_reset()


@pytest.mark.django_db
def test_a_draining_instance_refuses_api_requests_with_503_and_retry_after(client, draining):
    response = client.post("/v1/chat/completions", {"messages": STORY}, content_type="application/json")
    assert response.status_code == 503
    assert response["Retry-After"] == "5"
    assert response.json()["error"]["code"] == "draining"
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}


@pytest.mark.django_db
def test_a_draining_instance_is_not_ready(client, draining):
    response = client.get("/ready")
    assert response.status_code == 503
    assert response.json()["checks"]["drain"]["ok"] is False


@pytest.mark.django_db
def test_requests_in_flight_come_back_to_zero_after_a_refused_and_an_answered_request(client):
    before = requests_in_flight()
    client.post("/v1/chat/completions", {"messages": "not a list"}, content_type="application/json")
    assert requests_in_flight() == before


@pytest.mark.django_db(transaction=True)
async def test_a_draining_instance_refuses_a_new_websocket_reply_and_closes_with_1012(draining):
    key = await sync_to_async(lambda: make_api_client("ws-drain", key_name="ws").raw_key)()
    socket = WebsocketCommunicator(application, "/ws/chat/captain-mira/",
                                   headers=[(b"origin", b"http://127.0.0.1:8000"),
                                            (b"authorization", f"Bearer {key}".encode())])
    connected, _ = await socket.connect()
    assert connected
    await socket.send_json_to({"type": "message", "content": "Hello"})
    error = await socket.receive_json_from(timeout=30)
    assert (error["type"], error["status"], error["error"]["code"], error["retry_after"]) == ("error", 503,
                                                                                              "draining", 5)
    assert await socket.receive_output(timeout=10) == {"type": "websocket.close", "code": 1012}
    await socket.disconnect()


def start_server(tmp_path, drain_timeout: float) -> tuple[LiveServer, str]:
    server = LiveServer(workdir=tmp_path, env={"DRAIN_TIMEOUT": str(drain_timeout), "API_RATE_LIMIT": "",
                                               "LOG_LEVEL": "INFO"})
    key = prepare_database(server, {"alice": ["alice"]})["alice"]
    server.start()
    return server, key


def stream_in_thread(server: LiveServer, key: str, max_tokens: int, first_token: threading.Event, results: list,
                     seed: int) -> threading.Thread:
    def run():
        body = {"messages": STORY, "stream": True, "max_tokens": max_tokens, "temperature": 0.9, "seed": seed,
                "logit_bias": NO_END}
        headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
        try:
            with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers,
                              timeout=120) as response:
                events = sse_events(response, on_event=lambda e: content_of(e) and first_token.set())
            results.append(events)
        except httpx.HTTPError as exc:
            results.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread


@pytest.mark.smollm2
def test_sigterm_while_4_streams_run_lets_all_finish_refuses_new_requests_and_exits(tmp_path, smollm2_path):
    drain_timeout = 180  # a bound, not a wait: under a load average of 12, 4 x 96 tokens took 53 s and more than 60 s
    server, key = start_server(tmp_path, drain_timeout)
    try:
        started = [threading.Event() for _ in range(4)]
        results: list = []
        threads = [stream_in_thread(server, key, 96, started[i], results, seed=i) for i in range(4)]
        for event in started:
            assert event.wait(120), "a stream produced no token"
        assert not results, "a stream ended before SIGTERM: nothing was running to drain"
        server.process.send_signal(signal.SIGTERM)
        time.sleep(0.3)  # the signal is handled on the server's event loop

        refused = httpx.post(server.url + "/v1/chat/completions", json={"messages": STORY},
                             headers={"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}, timeout=30)
        ready = httpx.get(server.url + "/ready", timeout=30)
        for thread in threads:
            thread.join(drain_timeout + 30)
        exit_code = server.process.wait(timeout=drain_timeout + 15)
    finally:
        server.stop()

    assert refused.status_code == 503, refused.text
    assert refused.headers["Retry-After"] == "5"
    assert refused.json()["error"]["code"] == "draining"
    assert ready.status_code == 503
    assert len(results) == 4
    for events in results:
        assert not isinstance(events, Exception), repr(events)
        assert events[-1] == "[DONE]"
        assert "".join(content_of(e) for e in events)
        assert not [e for e in events if isinstance(e, dict) and "error" in e], events
        finishes = [choice.get("finish_reason") for e in events if isinstance(e, dict) for choice in e.get("choices", [])]
        assert len([reason for reason in finishes if reason]) == 1, finishes  # one reply, ended once
    assert exit_code == 0
    assert "drained: stopping" in server.log()


@pytest.mark.smollm2
def test_the_drain_is_bounded_by_drain_timeout(tmp_path, smollm2_path):
    drain_timeout = 1
    server, key = start_server(tmp_path, drain_timeout)
    try:
        started = threading.Event()
        results: list = []
        thread = stream_in_thread(server, key, 1000, started, results, seed=1)
        assert started.wait(120)
        server.process.send_signal(signal.SIGTERM)
        exit_code = server.process.wait(timeout=drain_timeout + 15)
        thread.join(30)
    finally:
        server.stop()
    assert exit_code == 0
    assert "drain timeout: stopping with" in server.log()
