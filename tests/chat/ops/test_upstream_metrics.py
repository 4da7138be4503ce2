"""Per-upstream figures of a remote model in /metrics (chat/metrics.py), over scripted upstreams."""

from __future__ import annotations

import dataclasses
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from rest_framework.test import APIClient

from chat.engine import ModelSpec, SamplingParams
from chat.engines import get_engine
from tests.fake_upstream import FakeUpstream

pytestmark = pytest.mark.django_db


def samples_of(labels_wanted: dict) -> dict:
    text = APIClient().get("/metrics").content.decode()
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name.startswith("llmsite_upstream_") and sample.labels == labels_wanted:
                found[sample.name] = sample.value
    return found


def test_metrics_show_requests_in_flight_and_latency_per_upstream(settings):
    a, b = FakeUpstream(), FakeUpstream()
    try:
        spec = ModelSpec("pool", "", backend="openai_compatible", base_urls=(a.url, b.url), context_length=2048,
                         routing="round_robin")
        settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=(spec,), default_model="pool")
        engine = get_engine("pool")

        def ask(text: str):
            return engine.submit(engine.render_chat([{"role": "user", "content": text}]), SamplingParams(max_tokens=4))

        assert "".join(ask("one")) and "".join(ask("two"))  # one to each upstream, in turn
        a.gate.clear()
        held = ask("three")  # a's again, held open
        at_a = samples_of({"model": "pool", "upstream": f"127.0.0.1:{a.port}"})
        at_b = samples_of({"model": "pool", "upstream": f"127.0.0.1:{b.port}"})
        a.gate.set()
        assert "".join(held)
    finally:
        a.stop()
        b.stop()
    assert at_a["llmsite_upstream_requests_total"] == 2 and at_b["llmsite_upstream_requests_total"] == 1
    assert at_a["llmsite_upstream_in_flight"] == 1 and at_b["llmsite_upstream_in_flight"] == 0
    assert at_a["llmsite_upstream_request_seconds_count"] == 1 and at_b["llmsite_upstream_request_seconds_count"] == 1
    assert at_b["llmsite_upstream_request_seconds_sum"] > 0
    assert at_a["llmsite_upstream_errors_total"] == 0 and at_a["llmsite_upstream_up"] == 1


def test_metrics_show_the_requests_waiting_for_an_upstreams_slot(settings):
    upstream = FakeUpstream()
    try:
        spec = ModelSpec("pool", "", backend="openai_compatible", base_urls=(upstream.url,), context_length=2048,
                         upstream_slots=1)
        settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=(spec,), default_model="pool")
        engine = get_engine("pool")

        def ask(text: str):
            return engine.submit(engine.render_chat([{"role": "user", "content": text}]), SamplingParams(max_tokens=4))

        upstream.gate.clear()
        running, waiting = ask("one"), ask("two")  # the second waits here for the upstream's one slot
        during = samples_of({"model": "pool", "upstream": f"127.0.0.1:{upstream.port}"})
        upstream.gate.set()
        assert "".join(running) and "".join(waiting)
        deadline = time.monotonic() + 10  # a worker counts its request over just after the reply's last event
        while True:
            after = samples_of({"model": "pool", "upstream": f"127.0.0.1:{upstream.port}"})
            if after["llmsite_upstream_request_seconds_count"] == 2 or time.monotonic() > deadline:
                break
            time.sleep(0.01)
    finally:
        upstream.stop()
    assert during["llmsite_upstream_waiting"] == 1 and during["llmsite_upstream_requests_total"] == 2
    assert after["llmsite_upstream_waiting"] == 0 and after["llmsite_upstream_request_seconds_count"] == 2
