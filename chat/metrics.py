"""Prometheus metrics (prometheus_client), exposed at /metrics; served by chat/ops/views.py."""

from __future__ import annotations

from django.db.models import Count
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, SummaryMetricFamily

from .engines import loaded_engines
from .models import Job

# auto_describe stays off: the collectors query the database, which must not happen at import.
REGISTRY = CollectorRegistry()

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)

http_requests = Counter("llmsite_http_requests", "HTTP requests by endpoint and status.",
                        ["endpoint", "method", "status"], registry=REGISTRY)
generation_seconds = Histogram("llmsite_generation_seconds", "Time from submit to the last token.",
                               ["model"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
time_to_first_token_seconds = Histogram("llmsite_time_to_first_token_seconds", "Time from submit to the first token.",
                                        ["model"], buckets=LATENCY_BUCKETS, registry=REGISTRY)
tokens_per_second = Histogram("llmsite_generation_tokens_per_second", "Decode speed of each generation.",
                              ["model"], buckets=(1, 5, 10, 20, 40, 60, 80, 100, 150, 200, 400), registry=REGISTRY)
completion_tokens = Counter("llmsite_completion_tokens", "Tokens generated.", ["model"], registry=REGISTRY)
prompt_tokens = Counter("llmsite_prompt_tokens", "Prompt tokens processed (cached ones included).", ["model"],
                        registry=REGISTRY)
response_cache = Counter("llmsite_response_cache", "Response cache lookups by result.", ["result"],
                         registry=REGISTRY)


class EngineCollector:
    """Scheduler and prefix-cache figures of the models loaded in this process, read at scrape time."""

    def collect(self):
        active = GaugeMetricFamily("llmsite_scheduler_active_sequences", "Sequences being decoded.", labels=["model"])
        queued = GaugeMetricFamily("llmsite_scheduler_queued_sequences", "Sequences waiting for a slot.",
                                   labels=["model"])
        hits = CounterMetricFamily("llmsite_prefix_cache_hits", "Prompts that reused a cached prefix.", labels=["model"])
        misses = CounterMetricFamily("llmsite_prefix_cache_misses", "Prompts evaluated from scratch.", labels=["model"])
        rejected = CounterMetricFamily("llmsite_scheduler_rejected", "Requests refused with 503 (queue full or "
                                       "waited too long).", labels=["model", "reason"])
        evaluated = CounterMetricFamily("llmsite_prompt_tokens_evaluated", "Prompt tokens that went through the "
                                        "model (reused, shared and forked ones excluded).", labels=["model"])
        forked = CounterMetricFamily("llmsite_forked_sequences", "Sequences forked from another evaluating the same "
                                     "prompt (n choices) instead of evaluating it.", labels=["model"])
        side = CounterMetricFamily("llmsite_side_prefills", "Long prompts evaluated in the second context while "
                                   "replies streamed (side_prefill), then moved into their slot.", labels=["model"])
        failovers = CounterMetricFamily("llmsite_upstream_failovers", "Replies an upstream broke off, continued on "
                                        "the next upstream.", labels=["model"])
        preempted = CounterMetricFamily("llmsite_scheduler_preemptions", "Running sequences suspended to give their "
                                        "slot to another owner's waiting request.", labels=["model"])
        dropped = CounterMetricFamily("llmsite_state_writes_dropped", "Conversation states not written to state_dir "
                                      "because the disk writer was behind.", labels=["model"])
        for name, engine in loaded_engines():
            stats = engine.stats()
            failovers.add_metric([name], stats.get("failovers", 0))
            dropped.add_metric([name], stats.get("state_writes_dropped", 0))
            evaluated.add_metric([name], stats.get("prompt_tokens_evaluated", 0))
            forked.add_metric([name], stats.get("forked_sequences", 0))
            side.add_metric([name], stats.get("side_prefills", 0))
            preempted.add_metric([name], stats.get("preemptions", 0))
            active.add_metric([name], stats.get("active", 0))
            queued.add_metric([name], stats.get("queued", 0))
            hits.add_metric([name], stats.get("prefix_hits", 0))
            misses.add_metric([name], stats.get("prefix_misses", 0))
            for reason in ("queue_full", "queue_timeout"):
                rejected.add_metric([name, reason], stats.get(f"rejected_{reason}", 0))
        yield from (active, queued, hits, misses, rejected, evaluated, forked, side, preempted, failovers, dropped)
        yield from upstream_families()


def upstream_families():
    """Per-upstream figures of the remote models (chat/engine/upstream.py): requests, errors, in flight, latency."""
    labels = ["model", "upstream"]
    requests = CounterMetricFamily("llmsite_upstream_requests", "Requests sent to each upstream (failovers "
                                   "included).", labels=labels)
    errors = CounterMetricFamily("llmsite_upstream_errors", "Requests an upstream failed (connection, 5xx, "
                                 "broken stream).", labels=labels)
    in_flight = GaugeMetricFamily("llmsite_upstream_in_flight", "Requests open at each upstream.", labels=labels)
    waiting = GaugeMetricFamily("llmsite_upstream_waiting", "Requests waiting here for one of the upstream's "
                                "slots (upstream_slots).", labels=labels)
    up = GaugeMetricFamily("llmsite_upstream_up", "1 while the upstream answers, 0 while it is skipped.",
                           labels=labels)
    seconds = SummaryMetricFamily("llmsite_upstream_request_seconds", "Duration of each upstream request "
                                  "(to its last byte).", labels=labels)
    for name, engine in loaded_engines():
        for row in engine.stats().get("upstreams") or []:
            key = [name, row["upstream"]]
            requests.add_metric(key, row.get("requests", 0))
            errors.add_metric(key, row.get("errors", 0))
            in_flight.add_metric(key, row.get("in_flight", 0))
            waiting.add_metric(key, row.get("waiting", 0))
            up.add_metric(key, 1 if row.get("up") else 0)
            seconds.add_metric(key, count_value=row.get("seconds_count", 0), sum_value=row.get("seconds_total", 0.0))
    yield from (requests, errors, in_flight, waiting, up, seconds)


class JobCollector:
    """Background jobs by state, from the database (shared by every instance)."""

    def collect(self):
        family = GaugeMetricFamily("llmsite_jobs", "Background jobs by state.", labels=["state"])
        counts = dict(Job.objects.values_list("status").annotate(n=Count("pk")))
        for state in Job.Status.values:
            family.add_metric([state], counts.get(state, 0))
        yield family


REGISTRY.register(EngineCollector())
REGISTRY.register(JobCollector())


def record_generation(*, model: str, completion, started: float, first_token_at: float | None, finished: float):
    """Count one finished generation (live, not replayed from the cache)."""
    total = max(finished - started, 1e-9)
    generation_seconds.labels(model).observe(total)
    if first_token_at is not None:
        time_to_first_token_seconds.labels(model).observe(first_token_at - started)
        decode_time = finished - first_token_at
        if completion.completion_tokens > 1 and decode_time > 0:
            tokens_per_second.labels(model).observe((completion.completion_tokens - 1) / decode_time)
    completion_tokens.labels(model).inc(completion.completion_tokens)
    prompt_tokens.labels(model).inc(completion.prompt_tokens)
