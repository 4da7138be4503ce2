"""The slot gate against a real llama-server (one slot, no RAM prompt cache): with `upstream_slots`, a burst that
interleaves two characters evaluates each character sheet once; sent all at once, the upstream's first-come,
first-served queue evaluates a sheet for every request. Counted by llama-server itself (--metrics)."""

from __future__ import annotations

import threading
import time

import pytest

from chat.engine import ModelSpec, SamplingParams
from chat.engine.remote import RemoteEngine
from tests.conftest import llama_server_binary
from tests.live import free_port
from tests.llama_server import LlamaServer

pytestmark = [pytest.mark.smollm2, pytest.mark.services]  # the real model, served by llama-server

SMOLLM2_END_TOKENS = (0, 1, 2)  # banned for the first request, so that it is still running when the others arrive


def sheet(name: str) -> str:
    """A character sheet of ~200 tokens, different from its first word."""
    return f"{name} is the character you play. " + " ".join(
        f"Fact {n}: {name} remembers detail {n} of a long career and speaks plainly about it." for n in range(12))


def prompt_tokens_evaluated(upstream: LlamaServer) -> int:
    return int(upstream.metric("llamacpp:prompt_tokens_total"))


@pytest.fixture(scope="module")
def upstream(tmp_path_factory, smollm2_path):
    with LlamaServer(llama_server_binary(), smollm2_path, port=free_port(), context=1024, parallel=1, threads=1,
                     log_path=tmp_path_factory.mktemp("slot-gate") / "llama-server.log",
                     extra=("--metrics", "--cache-ram", "0")) as server:
        yield server


def interleaved_burst(upstream: LlamaServer, *, slots: int, characters: tuple[str, str]) -> tuple[int, int]:
    """Six requests, characters alternating, while a first one runs: (prompt tokens evaluated, one sheet's)."""
    spec = ModelSpec("pool", "", backend="openai_compatible", base_urls=(upstream.url + "/v1",), context_length=1024,
                     upstream_slots=slots, timeout=120)
    engine = RemoteEngine(spec, health_interval=3600)
    try:
        def chat(character: str, question: str):
            return engine.render_chat([{"role": "system", "content": sheet(character)},
                                       {"role": "user", "content": question}])

        sheet_tokens = len(engine.prompt_tokens(chat(characters[0], "")))
        before = prompt_tokens_evaluated(upstream)
        first = engine.submit(chat(characters[0], "Hello."), SamplingParams(
            max_tokens=48, temperature=0, logit_bias=tuple((token, -100.0) for token in SMOLLM2_END_TOKENS)))
        reading = iter(first)
        next(reading)  # it runs: the others queue behind it
        generations, threads = [], []
        for number in range(6):
            character = characters[number % 2]

            def send(character=character, number=number):
                generations.append(engine.submit(chat(character, f"Question {number}?"),
                                                 SamplingParams(max_tokens=2, temperature=0)))
            threads.append(threading.Thread(target=send))
            threads[-1].start()
            time.sleep(0.05)  # arrival order: A, B, A, B, A, B
        for thread in threads:
            thread.join(timeout=120)
        "".join(reading)
        for generation in generations:
            "".join(generation)
        return prompt_tokens_evaluated(upstream) - before, sheet_tokens
    finally:
        engine.close()


def test_a_gated_burst_evaluates_each_character_sheet_once_where_the_upstreams_queue_evaluates_one_per_request(
        upstream):
    ungated, sheet_tokens = interleaved_burst(upstream, slots=0, characters=("Alba", "Bruno"))
    gated, _ = interleaved_burst(upstream, slots=1, characters=("Carla", "Dario"))
    # Gated: sheet A for the first request and A's two others, then sheet B for B's three (plus their questions).
    assert gated < 2.6 * sheet_tokens, (gated, ungated, sheet_tokens)
    # The upstream's own queue alternates A and B on its one slot: a sheet for nearly every request.
    assert ungated > 4.5 * sheet_tokens, (gated, ungated, sheet_tokens)
