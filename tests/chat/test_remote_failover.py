"""Affinity routing over a pool of real llama-server upstreams, one of them killed in the middle of a burst.

Its requests fail over to the other upstream: every request is answered once, none fails, and a
reply that had begun is continued from where it stopped (no text lost or repeated).
"""

from __future__ import annotations

import re
import threading
import time

import httpx
import pytest

from tests.conftest import missing_service
from tests.live import LiveServer, content_of, free_port, prepare_database, sse_events
from tests.llama_server import LlamaServer, find_llama_server

pytestmark = [pytest.mark.smollm2, pytest.mark.services]

SLOT_CONTEXT = 512
TOPICS = ["the sea", "a mountain", "bread", "a violin", "the moon", "a fox", "rain", "a library"]
METRICS_TOKEN = "test-metrics-token"


def config_text(a: str, b: str) -> str:
    return f"""
system_prompt: You are a helpful assistant.
default_model: pool
sampling: {{temperature: 0, max_tokens: 40}}
models:
  - name: pool
    backend: openai_compatible
    base_url: [{a}/v1, {b}/v1]
    routing: affinity
    context_length: {SLOT_CONTEXT}
    connect_timeout: 2
    timeout: 60
"""


@pytest.fixture
def pool(tmp_path, smollm2_path):
    binary, missing = find_llama_server()
    if binary is None:
        missing_service(missing)
    a, b = (LlamaServer(binary, smollm2_path, port=free_port(), log_path=tmp_path / f"llama-server-{name}.log",
                        context=4 * SLOT_CONTEXT, parallel=4, threads=1, extra=("--metrics", "--jinja"))
            for name in ("a", "b"))
    (tmp_path / "config.yaml").write_text(config_text(a.url, b.url))
    server = LiveServer(workdir=tmp_path, env={"LLMSITE_CONFIG": str(tmp_path / "config.yaml"), "API_RATE_LIMIT": "",
                                               "METRICS_TOKEN": METRICS_TOKEN, "LOG_LEVEL": "INFO"})
    try:
        a.start()
        b.start()
        key = prepare_database(server, {"alice": ["alice"]})["alice"]
        a.wait_until_ready()
        b.wait_until_ready()
        server.start()
        yield server, key, a, b
    finally:
        server.stop()
        a.stop()
        b.stop()


def processing(upstream: LlamaServer) -> int:
    text = httpx.get(upstream.url + "/metrics", timeout=10).text
    found = re.search(r"^llamacpp:requests_processing\s+([0-9.e+]+)", text, re.MULTILINE)
    return int(float(found.group(1))) if found else 0


def ask(server: LiveServer, key: str, topic: str, stream: bool, on_event=None):
    body = {"messages": [{"role": "user", "content": f"Write three sentences about {topic}."}], "stream": stream}
    headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
    if not stream:
        response = httpx.post(server.url + "/v1/chat/completions", json=body, headers=headers, timeout=180)
        return response.status_code, response.json()
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, headers=headers,
                      timeout=180) as response:
        return response.status_code, sse_events(response, on_event)


def test_an_upstream_killed_mid_burst_hands_its_requests_over_none_lost_or_repeated(pool):
    server, key, a, b = pool
    results: dict[str, tuple] = {}
    texts_before_kill: dict[str, str] = {}
    killed = threading.Event()

    def run(topic):
        seen = []

        def on_event(event):
            seen.append(content_of(event))
            if not killed.is_set():
                texts_before_kill[topic] = "".join(seen)

        results[topic] = ask(server, key, topic, stream=True, on_event=on_event)

    threads = [threading.Thread(target=run, args=(topic,)) for topic in TOPICS]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 120
    while processing(b) == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert processing(b) > 0, "upstream b never received a request: affinity sent everything to a"
    decodes = b.metric("llamacpp:n_decode_total")
    while b.metric("llamacpp:n_decode_total") < decodes + 4 and time.monotonic() < deadline:
        time.sleep(0.02)  # b's replies have begun: a few decode steps past its prompts
    b.kill()
    killed.set()
    for thread in threads:
        thread.join(240)

    assert len(results) == len(TOPICS)
    for topic, (status, events) in results.items():
        assert status == 200, (topic, events)
        assert not [e for e in events if isinstance(e, dict) and "error" in e], (topic, events)
        assert events[-1] == "[DONE]"
        finishes = [e["choices"][0].get("finish_reason") for e in events if isinstance(e, dict) and e.get("choices")]
        assert [f for f in finishes if f] in (["stop"], ["length"])  # one reply, finished once

    metrics = httpx.get(server.url + "/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}, timeout=10).text
    label = f'model="pool",upstream="127.0.0.1:{b.port}"'
    errors = re.search(r"^llmsite_upstream_errors_total\{" + re.escape(label) + r"\}\s+([0-9.e+]+)", metrics, re.M)
    assert errors and float(errors.group(1)) >= 1, metrics  # b's requests failed there and went elsewhere
    failovers = re.search(r'^llmsite_upstream_failovers_total\{model="pool"\}\s+([0-9.e+]+)', metrics, re.M)
    assert failovers and float(failovers.group(1)) >= 1, metrics  # at least one reply was cut mid-stream on b
    for upstream in (a, b):  # every figure per upstream: requests, in flight, latency
        label = f'model="pool",upstream="127.0.0.1:{upstream.port}"'
        for family in ("llmsite_upstream_requests_total", "llmsite_upstream_in_flight",
                       "llmsite_upstream_request_seconds_count", "llmsite_upstream_request_seconds_sum"):
            assert re.search("^" + family + r"\{" + re.escape(label) + r"\}\s", metrics, re.M), (family, label)

    # Greedy decoding: each reply is what the surviving upstream alone answers, so a reply continued after the
    # kill lost nothing and repeated nothing.
    for topic in TOPICS:
        status, reference = ask(server, key, topic, stream=False)
        assert status == 200
        streamed = "".join(content_of(e) for e in results[topic][1])
        assert streamed.startswith(texts_before_kill.get(topic, ""))
        assert streamed == reference["choices"][0]["message"]["content"], topic
