"""One streamed chat completion as a client sees it: when it was sent, when each token arrived, and statistics over many."""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass, field

import httpx

MODEL_NAME = "smollm2-135m-instruct"  # ours serves it by this name; llama-server gets it as --alias
_seeds = itertools.count(1000)


def request_body(messages: list[dict], max_tokens: int) -> dict:
    """The body every server gets, byte for byte: streamed, temperature 0.8, a fresh seed per request."""
    return {"model": MODEL_NAME, "messages": messages, "max_tokens": max_tokens, "temperature": 0.8,
            "seed": next(_seeds), "stream": True, "stream_options": {"include_usage": True}, "store": False}


def request_headers(key: str | None) -> dict:
    # no-cache: our response cache must never answer a benchmark request (the peers have none).
    # Connection: close: llama-server drops idle keep-alive connections, and a request sent on one fails
    # before it is read ("Server disconnected"); a fresh loopback connection per request costs nothing.
    headers = {"Cache-Control": "no-cache", "Connection": "close"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


@dataclass
class StreamRecord:
    """Times are perf_counter seconds; `arrivals` holds one time per content chunk (one token on every server here)."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    finished: float = 0.0
    completion_tokens: int = 0  # from the final usage chunk, else the number of content chunks
    prompt_tokens: int = 0
    error: str = ""

    @property
    def ttft(self) -> float:
        return (self.arrivals[0] if self.arrivals else self.finished) - self.sent

    @property
    def latency(self) -> float:
        return self.finished - self.sent

    @property
    def gaps(self) -> list[float]:
        """Inter-token gaps: what a reader of this stream waited between two tokens."""
        return [later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:])]

    def gaps_between(self, start: float, end: float) -> list[float]:
        """Gaps that overlap [start, end] (a gap that spans `start` counts: the reader was waiting then)."""
        return [later - earlier for earlier, later in zip(self.arrivals, self.arrivals[1:])
                if later >= start and earlier <= end]


def stream_chat(client: httpx.Client, url: str, headers: dict, body: dict) -> StreamRecord:
    record = StreamRecord(sent=time.perf_counter())
    usage = None
    try:
        with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as response:
            if response.status_code != 200:
                record.error = f"HTTP {response.status_code}: {response.read()[:200]!r}"
                return record
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                now = time.perf_counter()
                event = json.loads(line[6:])
                if event.get("error"):
                    record.error = str(event["error"])[:200]
                usage = event.get("usage") or usage
                for choice in event.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        record.arrivals.append(now)
    except httpx.HTTPError as error:
        record.error = f"{type(error).__name__}: {error}"
    finally:
        record.finished = time.perf_counter()
    record.completion_tokens = int((usage or {}).get("completion_tokens") or len(record.arrivals))
    record.prompt_tokens = int((usage or {}).get("prompt_tokens") or 0)
    return record


def percentile(values: list[float], fraction: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def summarize(records: list[StreamRecord], wall: float) -> dict:
    """Aggregate tok/s over the wall time, TTFT and latency p50/p95, inter-token gaps p50/p95/p99/max (ms)."""
    good = [record for record in records if not record.error]
    gaps = [gap for record in good for gap in record.gaps]
    tokens = sum(record.completion_tokens for record in good)
    return {
        "requests": len(records), "errors": len(records) - len(good), "completion_tokens": tokens,
        "prompt_tokens_mean": sum(r.prompt_tokens for r in good) / len(good) if good else 0,
        "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else 0.0,
        "ttft_p50_s": percentile([r.ttft for r in good], 0.5), "ttft_p95_s": percentile([r.ttft for r in good], 0.95),
        "latency_p50_s": percentile([r.latency for r in good], 0.5),
        "latency_p95_s": percentile([r.latency for r in good], 0.95),
        "gap_p50_ms": percentile(gaps, 0.5) * 1000, "gap_p95_ms": percentile(gaps, 0.95) * 1000,
        "gap_p99_ms": percentile(gaps, 0.99) * 1000, "gap_max_ms": max(gaps, default=0.0) * 1000,
        "first_error": next((r.error for r in records if r.error), ""),
    }
