"""The workloads W1-W4 of the engine issue, run against any OpenAI-compatible server through streamed HTTP.

Every server gets identical request bodies (bench.streams.request_body): an explicit system message
(ours then uses it instead of its default system prompt, so the prompts match), temperature 0.8, a
fresh seed per request, and `Cache-Control: no-cache`. Texts that must not be cached anywhere (W2's
persona, W4's long prompt) start with a fresh nonce on every run.
"""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpx

from bench.api_extras import engine_counters
from bench.streams import StreamRecord, request_body, stream_chat, summarize

SYSTEM = "You are a helpful assistant."
TOPICS = ["dragons", "the sea", "a lighthouse", "a robot", "the moon", "a forest", "a city", "a river",
          "a clockmaker", "a storm", "a garden", "a train", "a desert", "a violin", "a mountain", "a library"]


@dataclass
class Target:
    """A running server as the client sees it."""

    name: str
    url: str
    headers: dict


@dataclass
class Sizes:
    """Workload sizes; `quick()` shrinks them for a smoke run (figures then mean nothing)."""

    w1_requests_per_client: int = 3
    w1_max_tokens: int = 128
    w2_clients: int = 8
    w2_persona_facts: int = 22      # ~1,000 tokens (a fact is ~43 tokens)
    w2_max_tokens: int = 64
    w3_requests: int = 4
    w3_max_tokens: int = 128
    w4_streams: int = 4
    w4_stream_tokens: int = 512     # still running when the long prompt comes, on both servers (256 ended first)
    w4_long_facts: int = 41         # ~1,850 tokens
    w4_long_max_tokens: int = 16
    w4_delay_s: float = 1.5

    @classmethod
    def quick(cls) -> Sizes:
        return cls(w1_requests_per_client=1, w1_max_tokens=16, w2_clients=2, w2_persona_facts=6, w2_max_tokens=8,
                   w3_requests=1, w3_max_tokens=16, w4_streams=2, w4_stream_tokens=48, w4_long_facts=10,
                   w4_long_max_tokens=4, w4_delay_s=1.0)


def story_messages(index: int) -> list[dict]:
    """A ~35-token chat prompt (template included) asking for a long reply."""
    topic = TOPICS[index % len(TOPICS)]
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Write a long story about {topic}, with vivid details and a surprising ending."}]


def fact_text(facts: int, nonce: str) -> str:
    """~43 tokens per fact (SmolLM2); the nonce first, so no server holds any of it from an earlier run."""
    lines = [f"Archive session {nonce}. You are the Archivist of the east wing; answer from these records."]
    lines += [f"Fact {n}: the archivist remembers the {TOPICS[n % len(TOPICS)]} of year {1700 + n} and catalogues it "
              f"on shelf {n % 40} in the east wing, next to the maps of {TOPICS[(n * 7) % len(TOPICS)]}."
              for n in range(1, facts + 1)]
    return "\n".join(lines)


def _burst(target: Target, bodies: list[dict]) -> tuple[list[StreamRecord], float]:
    """All bodies at once, one client thread each (own connection); returns the records and the wall time."""
    start = threading.Barrier(len(bodies))

    def one(body):
        with httpx.Client(timeout=600) as client:
            start.wait()
            return stream_chat(client, target.url, target.headers, body)

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=len(bodies)) as pool:
        records = list(pool.map(one, bodies))
    return records, time.perf_counter() - began


def clients_run(target: Target, clients: int, requests_per_client: int, max_tokens: int) -> dict:
    """`clients` concurrent clients, each sending its requests one after the other (W1, W3)."""
    records: list[StreamRecord] = []
    lock = threading.Lock()

    def client(index: int):
        with httpx.Client(timeout=600) as http:
            for rep in range(requests_per_client):
                record = stream_chat(http, target.url, target.headers,
                                     request_body(story_messages(index * 7 + rep), max_tokens))
                with lock:
                    records.append(record)

    began = time.perf_counter()
    with ThreadPoolExecutor(max_workers=clients) as pool:
        list(pool.map(client, range(clients)))
    return {"clients": clients, **summarize(records, time.perf_counter() - began)}


def w1(target: Target, sizes: Sizes, clients: int = 8) -> dict:
    """W1: `clients` clients x 3 requests, ~35-token prompts, 128 tokens, streamed."""
    return clients_run(target, clients, sizes.w1_requests_per_client, sizes.w1_max_tokens)


def w2(target: Target, sizes: Sizes) -> dict:
    """W2: 8 clients sharing a ~1,000-token persona (system message), first burst: nothing is cached."""
    persona = fact_text(sizes.w2_persona_facts, uuid.uuid4().hex)
    questions = ["What is on shelf 3?", "Tell me about year 1710.", "Which wing holds the maps?", "Who are you?",
                 "What do you remember of the sea?", "Name one fact.", "Where is shelf 12?", "What is in year 1720?"]
    bodies = [request_body([{"role": "system", "content": persona},
                            {"role": "user", "content": questions[i % len(questions)]}], sizes.w2_max_tokens)
              for i in range(sizes.w2_clients)]
    records, wall = _burst(target, bodies)
    return summarize(records, wall)


def w3(target: Target, sizes: Sizes) -> dict:
    """W3: one client, requests one after the other."""
    return clients_run(target, 1, sizes.w3_requests, sizes.w3_max_tokens)


def long_prompt_messages(sizes: Sizes) -> list[dict]:
    text = fact_text(sizes.w4_long_facts, uuid.uuid4().hex)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": text + "\n\nWhich shelf holds the records of year 1703?"}]


def w4(target: Target, sizes: Sizes) -> dict:
    """W4: streams running; a long prompt arrives after a delay. Longest pause in a running stream, and the
    long prompt's TTFT there and on the idle server (a fresh long prompt of the same size, sent alone)."""
    long_record: list[StreamRecord] = []

    def late_long_prompt():
        time.sleep(sizes.w4_delay_s)
        with httpx.Client(timeout=600) as client:
            long_record.append(stream_chat(client, target.url, target.headers,
                                           request_body(long_prompt_messages(sizes), sizes.w4_long_max_tokens)))

    ours = target.name == "llmsite"  # whether the long prompt went to the second context (side_prefill)
    side_before = engine_counters(target.url)["side_prefills"] if ours else 0.0
    late = threading.Thread(target=late_long_prompt)
    late.start()
    streams, wall = _burst(target, [request_body(story_messages(i), sizes.w4_stream_tokens)
                                    for i in range(sizes.w4_streams)])
    late.join()
    (loaded,) = long_record
    side_prefills = engine_counters(target.url)["side_prefills"] - side_before if ours else None
    window_end = loaded.arrivals[0] if loaded.arrivals else loaded.finished
    # Pauses that overlap the long prompt's prefill (sent to first token), in streams that were running then.
    running = [s for s in streams if s.arrivals and s.arrivals[0] < loaded.sent < s.arrivals[-1]]
    pauses = [gap for s in running for gap in s.gaps_between(loaded.sent, window_end)]
    # When the longest pause began, from the long prompt's send: at its arrival, or at the hand-over before its first
    # token (a diagnostic).
    pause_at = max(((b - a, a - loaded.sent) for s in running for a, b in zip(s.arrivals, s.arrivals[1:])
                    if b >= loaded.sent and a <= window_end), default=(0.0, 0.0))[1]
    with httpx.Client(timeout=600) as client:
        idle = stream_chat(client, target.url, target.headers,
                           request_body(long_prompt_messages(sizes), sizes.w4_long_max_tokens))
    return {**summarize(streams, wall), "streams_running_at_arrival": len(running),
            "longest_pause_s": max(pauses, default=0.0), "longest_pause_at_s": pause_at,
            "long_prompt_tokens": loaded.prompt_tokens,
            "long_ttft_loaded_s": loaded.ttft, "long_ttft_idle_s": idle.ttft,
            "long_ttft_ratio": loaded.ttft / idle.ttft if idle.ttft > 0 else 0.0,
            "long_error": loaded.error or idle.error, "side_prefills": side_prefills}


WORKLOADS = {"W1": w1, "W2": w2, "W3": w3, "W4": w4}
