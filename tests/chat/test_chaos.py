"""Chaos against a live server (issue 21): mixed odd requests, vanishing clients and injected faults at once.

The tiny random-weight model keeps it within a minute or two on 2 cores. The server injects two faults
(chat/engine/faults.py): one scheduler step stalls, and sampling any sequence with seed 4242 raises.
Afterwards: no 5xx but 503s with Retry-After, the process alive, /ready 200, no active sequence, and
the greedy replies of the quiet run repeated exactly.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.live import LiveServer, prepare_database, sse_events

FAULT_SEED = 4242
CONCURRENCY = 8
CHAOS_REQUESTS = 48

SCHEMAS = [
    {"type": "integer", "minimum": 1, "maximum": 10},
    {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}}, "required": ["name"]},
    {"type": "array", "items": {"type": "number"}, "minItems": 3, "maxItems": 1},  # unsatisfiable
    {"enum": []},
    {"const": "\u0000"},
    {"type": "string", "pattern": "^[a-z]{3}$"},
    {"anyOf": [{"type": "null"}, {"type": "boolean"}]},
    {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "array",
                                                                                   "items": {"type": "string"}}}}}},
    {"type": "string", "maxLength": 100000},
    {"not": {"type": "string"}},
]
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": {"type": "object", "required": ["city"],
                                                          "properties": {"city": {"type": "string"}}}}}]


def reference_requests() -> list[dict]:
    """Deterministic requests (greedy, or seeded) whose replies must not depend on what else runs."""
    asks = ["Hi there.", "Tell me about the sea.", "What is two plus two?", "Name a colour."]
    bodies = []
    for index, ask in enumerate(asks):
        base = {"messages": [{"role": "user", "content": ask}], "max_tokens": 24, "character": "captain-mira"}
        bodies.append({**base, "temperature": 0})
        bodies.append({**base, "temperature": 0.9, "seed": 100 + index, "stream": True})
        bodies.append({**base, "temperature": 0, "stop": ["e", "\n"], "logprobs": True, "top_logprobs": 2})
    schema = {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]}
    bodies.append({"messages": [{"role": "user", "content": "Answer in JSON."}], "max_tokens": 30, "temperature": 0,
                   "response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": schema}}})
    return bodies


def chaos_request(rng: random.Random) -> tuple[dict, str]:
    """A random odd request and what the client does with it: "read", "vanish" (streamed), "impatient"."""
    body = {"messages": [{"role": "user", "content": rng.choice(["Hi", "Weather in Oslo?", "Count to 50.", "{}"])}],
            "max_tokens": rng.choice([1, 8, 40, 120]), "temperature": rng.choice([0, 0.7, 1.5]),
            "seed": rng.randrange(1000)}
    kind = rng.choice(["schema", "tools", "logprobs", "stop", "fault", "plain"])
    if kind == "schema":
        body["response_format"] = {"type": "json_schema",
                                   "json_schema": {"name": "s", "schema": rng.choice(SCHEMAS)}}
    elif kind == "tools":
        body["tools"] = TOOLS
        body["tool_choice"] = rng.choice(["auto", "required", "none"])
    elif kind == "logprobs":
        body.update(logprobs=True, top_logprobs=rng.choice([0, 1, 5, 20]))
    elif kind == "stop":
        body["stop"] = rng.sample(["a", "the", "\n", "}", "ship", "."], 2)
    elif kind == "fault":
        body["seed"] = FAULT_SEED  # sampling it raises in the server: that stream ends in an error event
    body["stream"] = kind == "fault" or rng.random() < 0.5
    behaviour = "read" if kind == "fault" else rng.choice(["read", "read", "vanish" if body["stream"] else "impatient"])
    return body, behaviour


def send(server: LiveServer, headers: dict, body: dict, behaviour: str = "read", rng: random.Random | None = None):
    """(status, Retry-After, reply text or None); a vanishing client closes its connection at a random moment."""
    timeout = httpx.Timeout(120, read=0.05 if behaviour == "impatient" else 120)
    with httpx.Client(base_url=server.url, headers=headers, timeout=timeout) as client:
        if not body.get("stream"):
            try:
                response = client.post("/v1/chat/completions", json=body)
            except httpx.ReadTimeout:
                return None, None, None
            text = response.json()["choices"][0]["message"]["content"] if response.status_code == 200 else None
            return response.status_code, response.headers.get("Retry-After"), text
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                response.read()
                return response.status_code, response.headers.get("Retry-After"), None
            if behaviour == "vanish":
                lines = response.iter_lines()
                for _ in range(rng.randrange(1, 6)):
                    next(lines, None)
                return 200, None, None  # leaving the block closes the connection mid-stream
            events = sse_events(response)
            text = "".join((event["choices"][0]["delta"].get("content") or "")
                           for event in events if isinstance(event, dict) and event.get("choices"))
            errors = [event for event in events if isinstance(event, dict) and "error" in event]
            return 200, None, ("error" if errors else text)


def metric(server: LiveServer, name: str) -> float:
    for line in httpx.get(server.url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


@pytest.fixture(scope="module")
def chaos_model(tmp_path_factory):
    from tests import factories

    return factories.write_tiny_gguf(tmp_path_factory.mktemp("models") / "tiny-chaos.gguf", seed=0)


def test_chaos_leaves_the_server_alive_ready_idle_and_its_replies_unchanged(tmp_path, chaos_model):
    config = tmp_path / "config.yaml"
    # No prefill budget: whole prompts per step, so that a reply does not depend on what it was batched with.
    config.write_text(json.dumps({
        "model_path": str(chaos_model), "model_name": "tiny", "system_prompt": "You are a helpful assistant.", "context_length": 1024, "parallel": 4,
        "prefill_step_ms": 0, "max_queue": 12, "queue_timeout": 20,
        "sampling": {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "max_tokens": 64}}))
    server = LiveServer(workdir=tmp_path, env={
        "API_RATE_LIMIT": "", "LLMSITE_CONFIG": str(config), "PYTHONFAULTHANDLER": "1",
        "LLMSITE_ENGINE_FAULTS": f"stall_step=450:1.0,fail_seed={FAULT_SEED}"})
    keys = prepare_database(server, {"chaos": ["chaos"]})
    server.start()
    try:
        headers = {"Authorization": f"Bearer {keys['chaos']}", "Cache-Control": "no-cache"}
        references = reference_requests()
        quiet = [send(server, headers, body) for body in references]
        assert all(status == 200 and text not in (None, "error") for status, _, text in quiet), quiet

        rng = random.Random(21)
        work = [(body, "read", True) for body in references]
        work += [(*chaos_request(rng), False) for _ in range(CHAOS_REQUESTS)]
        rng.shuffle(work)
        lock = threading.Lock()
        outcomes = []

        def run(item):
            body, behaviour, is_reference = item
            result = send(server, headers, body, behaviour, random.Random(id(item)))
            with lock:
                outcomes.append((body, behaviour, is_reference, result))

        with ThreadPoolExecutor(CONCURRENCY) as pool:
            list(pool.map(run, work))

        for body, behaviour, _, (status, retry_after, _) in outcomes:
            if status is not None and status >= 500:
                assert status == 503 and retry_after and int(retry_after) >= 1, (status, body)
        assert server.process.poll() is None  # the process survived
        loud = [result for body, _, is_reference, result in outcomes if is_reference]
        replayed = {json.dumps(body, sort_keys=True): result for body, _, is_reference, result in outcomes
                    if is_reference}
        assert len(loud) == len(references)
        for body, expected in zip(references, quiet):
            status, _, text = replayed[json.dumps(body, sort_keys=True)]
            if status == 503:
                continue  # refused at admission (queue full): not affected, only not served
            assert (status, text) == (200, expected[2]), body
        assert any(behaviour == "vanish" for _, behaviour, _, _ in outcomes)  # the chaos did happen
        assert any(behaviour == "impatient" for _, behaviour, _, _ in outcomes)
        faulted = [result for body, _, _, result in outcomes if body.get("seed") == FAULT_SEED]
        assert faulted
        assert all(result[0] == 503 or result[2] == "error" for result in faulted)  # the fault hit only them

        deadline = time.monotonic() + 60
        while metric(server, "llmsite_scheduler_active_sequences") > 0 and time.monotonic() < deadline:
            time.sleep(0.2)
        assert metric(server, "llmsite_scheduler_active_sequences") == 0
        assert metric(server, "llmsite_scheduler_queued_sequences") == 0
        assert httpx.get(server.url + "/ready", timeout=30).status_code == 200
    finally:
        server.stop()
