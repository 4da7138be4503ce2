"""A conversation outlives a real restart of `manage.py serve`: at shutdown, also when the drain times out with a
reply still streaming, every slot's state goes to `state_dir`; the next process restores it instead of evaluating
the conversation again, and gives the reply it gave while the state was in memory."""

from __future__ import annotations

import signal
import threading

import httpx
import pytest

from tests.live import LiveServer, bearer_client, prepare_database, sse_events

pytestmark = pytest.mark.smollm2

LEDGER = ("The harbour town kept a ledger of every ship that came in: its name, its captain, its cargo, the "
          "weather on the day it arrived and the tide it left on. ")
CONFIG = """\
model_path: {model}
model_name: smollm2
context_length: 2048
parallel: 2
threads: 0
flash_attention: true
prefill_step_ms: 0
state_dir: {states}
state_cache_mb: 512
system_prompt: You are a helpful assistant.
"""
NO_CACHE = {"Cache-Control": "no-cache"}
NO_END = {"0": -100, "1": -100, "2": -100}  # SmolLM2's end tokens: the stream runs until the drain cuts it


def ask(client: httpx.Client, messages: list[dict]) -> dict:
    response = client.post("/v1/chat/completions", headers=NO_CACHE, json={
        "model": "smollm2", "messages": messages, "max_tokens": 12, "temperature": 0.8, "seed": 26})
    assert response.status_code == 200, response.text
    return response.json()


def test_a_conversation_cut_by_the_drain_timeout_resumes_from_disk_after_a_restart(tmp_path, smollm2_path):
    states = tmp_path / "states"
    (tmp_path / "config.yaml").write_text(CONFIG.format(model=smollm2_path, states=states))
    env = {"LLMSITE_CONFIG": str(tmp_path / "config.yaml"), "DRAIN_TIMEOUT": "1", "API_RATE_LIMIT": "",
           "LOG_LEVEL": "INFO"}
    first = LiveServer(workdir=tmp_path, env=env)
    key = prepare_database(first, {"alice": ["alice"]})["alice"]
    opening = [{"role": "user", "content": LEDGER * 45 + "Summarise the ledger."}]

    first.start()
    try:
        with bearer_client(first, key) as client:
            reply = ask(client, opening)["choices"][0]["message"]["content"]
            resumed = opening + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And the tides?"}]
            in_memory = ask(client, resumed)
            assert in_memory["usage"]["prompt_tokens"] >= 1400

            streaming = threading.Event()
            outcome: list = []

            def stream():  # a reply still running when SIGTERM comes: the 1 s drain times out
                body = {"model": "smollm2", "stream": True, "max_tokens": 1500, "logit_bias": NO_END,
                        "messages": [{"role": "user", "content": "Tell me a long story."}]}
                try:
                    with client.stream("POST", "/v1/chat/completions", json=body, headers=NO_CACHE) as response:
                        outcome.append(sse_events(response, on_event=lambda event: streaming.set()))
                except httpx.HTTPError as exc:
                    outcome.append(exc)

            thread = threading.Thread(target=stream)
            thread.start()
            assert streaming.wait(120)
            first.process.send_signal(signal.SIGTERM)
            assert first.process.wait(timeout=180) == 0
            thread.join(30)
    finally:
        first.stop()
    assert "drain timeout: stopping with" in first.log()
    assert list(states.glob("*.kv")), "no state written at shutdown"

    second = LiveServer(workdir=tmp_path, env=env)
    second.start()
    try:
        with bearer_client(second, key) as client:
            restored = ask(client, resumed)
    finally:
        second.stop()
    cached = restored["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= restored["usage"]["prompt_tokens"] - 64, restored["usage"]  # all but the last chunk restored
    assert restored["choices"][0]["message"]["content"] == in_memory["choices"][0]["message"]["content"]
