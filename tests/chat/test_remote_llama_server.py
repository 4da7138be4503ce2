"""The openai_compatible backend against llama.cpp's own llama-server: two real instances on loopback.

Our server runs as a LiveServer whose config.yaml points at both instances; tests compare what our
API answers with what llama-server itself answers for the same input. Without the binary
(scripts/build_llama_server.sh) the module skips with the reason; REQUIRE_SERVICES=1 (CI) makes
that a failure. The last tests kill the instances, so they run last in this module.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

import httpx
import openai
import pytest

from tests.conftest import missing_service
from tests.live import LiveServer, content_of, free_port, prepare_database, sse_events
from tests.llama_server import LlamaServer, find_llama_server

pytestmark = [pytest.mark.smollm2, pytest.mark.services]  # the real model, served by llama-server

SLOT_CONTEXT = 1024  # each instance: 2 slots of 1,024 tokens
SYSTEM = "You are a helpful assistant."
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG_STORY = "Write a long story about a dragon who learns to sail. Make it at least 500 words."
# Byte-level BPE spends several tokens on each of these characters: a characters/4 estimate would be ~10x low.
CJK_TURN = "龍は海を渡り、嵐の夜に古い灯台を見つけた。" * 6


@dataclass
class Stack:
    server: LiveServer
    key: str
    a: LlamaServer
    b: LlamaServer

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=self.key, max_retries=0, timeout=120)

    @property
    def headers(self) -> dict:
        # no-cache: every request here must reach the upstream, never our response cache.
        return {"Authorization": f"Bearer {self.key}", "Cache-Control": "no-cache"}

    def post(self, path: str, body: dict) -> httpx.Response:
        return httpx.post(self.server.url + path, headers=self.headers, json=body, timeout=120)


def config_text(a: str, b: str) -> str:
    return f"""
system_prompt: {SYSTEM}
default_model: ls-pool
sampling: {{temperature: 0.7, max_tokens: 16}}
models:
  - name: ls-pool                 # round-robin over both instances
    backend: openai_compatible
    routing: round_robin          # (affinity, the default, is tested in test_remote_failover.py)
    base_url: [{a}/v1, {b}/v1]
    remote_model: smollm2
    context_length: {SLOT_CONTEXT}
    connect_timeout: 2
  - name: ls-a
    backend: openai_compatible
    base_url: {a}
    context_length: {SLOT_CONTEXT}
  - name: ls-completions          # prompt rendered here (ChatML), sent to /v1/completions
    backend: openai_compatible
    base_url: {a}
    remote_api: completions
    context_length: {SLOT_CONTEXT}
  - name: ls-overflow             # claims more context than the upstream's slot holds
    backend: openai_compatible
    base_url: {a}
    context_length: 8192
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_path):
    binary, missing = find_llama_server()
    if binary is None:
        missing_service(missing)
    workdir = tmp_path_factory.mktemp("llama-server")
    a, b = (LlamaServer(binary, smollm2_path, port=free_port(), log_path=workdir / f"llama-server-{name}.log",
                        context=2 * SLOT_CONTEXT, parallel=2, threads=1, extra=("--metrics",))
            for name in ("a", "b"))
    (workdir / "config.yaml").write_text(config_text(a.url, b.url))
    server = LiveServer(workdir=workdir, env={"LLMSITE_CONFIG": str(workdir / "config.yaml"), "API_RATE_LIMIT": "",
                                              "LOG_LEVEL": "INFO"})
    try:
        a.start()
        b.start()
        key = prepare_database(server, {"alice": ["alice"]})["alice"]  # while the upstreams load
        a.wait_until_ready()
        b.wait_until_ready()
        server.start()
        yield Stack(server=server, key=key, a=a, b=b)
    finally:
        server.stop()
        a.stop()
        b.stop()


def direct_chat(upstream: LlamaServer, messages: list[dict], max_tokens: int) -> dict:
    """What llama-server itself answers (non-streamed) for these messages."""
    response = httpx.post(upstream.url + "/v1/chat/completions", timeout=120,
                          json={"messages": messages, "max_tokens": max_tokens, "temperature": 0})
    assert response.status_code == 200, response.text
    return response.json()


def upstream_tokens(upstream: LlamaServer, text: str) -> list[int]:
    response = httpx.post(upstream.url + "/tokenize", json={"content": text, "add_special": False}, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()["tokens"]


def generated_tokens(upstream: LlamaServer) -> int:
    """llama-server's own counter of generated tokens (--metrics): which instance did the work."""
    text = httpx.get(upstream.url + "/metrics", timeout=10).text
    found = re.search(r"^llamacpp:tokens_predicted_total\s+([0-9.e+]+)", text, re.MULTILINE)
    assert found, text[:500]
    return int(float(found.group(1)))


def test_plain_and_streamed_replies_carry_the_upstreams_usage(stack):
    upstream = direct_chat(stack.a, [{"role": "system", "content": SYSTEM}, *QUESTION], 8)["usage"]
    reply = stack.client().chat.completions.with_raw_response.create(
        model="ls-a", messages=QUESTION, max_tokens=8, temperature=0, extra_headers={"Cache-Control": "no-cache"})
    assert reply.headers["x-cache"] != "HIT"
    reply = reply.parse()
    assert reply.choices[0].message.content.strip()
    # The prompt was counted by llama-server (its own chat template), not by us.
    assert reply.usage.prompt_tokens == upstream["prompt_tokens"]
    assert 0 < reply.usage.completion_tokens <= 8

    chunks = list(stack.client().chat.completions.create(
        model="ls-a", messages=QUESTION, max_tokens=8, temperature=0.8, seed=7, stream=True,
        stream_options={"include_usage": True}, extra_headers={"Cache-Control": "no-cache"}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip()
    assert chunks[-1].usage.prompt_tokens == upstream["prompt_tokens"]
    assert 0 < chunks[-1].usage.completion_tokens <= 8


def test_token_counts_for_context_fitting_come_from_llama_servers_tokenize(stack):
    shown = stack.server.manage(f"""
from chat.engines import get_engine
engine = get_engine("ls-pool")
print(engine.count_tokens({CJK_TURN!r}), engine.stats()["tokenizer"])
""").strip().splitlines()[-1]
    expected = len(upstream_tokens(stack.a, CJK_TURN))
    assert shown == f"{expected} llama_server"
    assert expected > 3 * len(CJK_TURN) / 4  # an estimate of characters / 4 would be far off

    # A history longer than the upstream's slot: the oldest turns are dropped here so the rest fits,
    # which only works when the counts are llama-server's own.
    history = []
    for turn in range(12):
        history += [{"role": "user", "content": f"{turn}: {CJK_TURN}"}, {"role": "assistant", "content": CJK_TURN}]
    total = sum(len(upstream_tokens(stack.a, message["content"])) for message in history)
    assert total > SLOT_CONTEXT
    response = stack.post("/v1/chat/completions", {"model": "ls-pool", "max_tokens": 8,
                                                   "messages": [*history, *QUESTION]})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert SLOT_CONTEXT // 2 < usage["prompt_tokens"] <= SLOT_CONTEXT - 8


def test_completions_mode_sends_the_prompt_rendered_here(stack):
    reply = stack.client().chat.completions.create(model="ls-completions", messages=QUESTION, max_tokens=6,
                                                   extra_headers={"Cache-Control": "no-cache"})
    assert reply.choices[0].message.content
    rendered = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{QUESTION[0]['content']}<|im_end|>\n"
                "<|im_start|>assistant\n")
    direct = httpx.post(stack.a.url + "/v1/completions", timeout=60,
                        json={"prompt": rendered, "max_tokens": 1}).json()["usage"]["prompt_tokens"]
    assert reply.usage.prompt_tokens == direct
    # A plain POST /v1/completions prompt goes upstream as it is.
    response = stack.post("/v1/completions", {"model": "ls-a", "prompt": "The capital of France is",
                                              "max_tokens": 4})
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["prompt_tokens"] == len(upstream_tokens(stack.a, "The capital of France is"))


def test_requests_go_round_robin_over_both_instances(stack):
    before = generated_tokens(stack.a), generated_tokens(stack.b)
    for turn in range(4):
        response = stack.post("/v1/chat/completions", {"model": "ls-pool", "max_tokens": 4, "temperature": 0.8,
                                                       "messages": [{"role": "user", "content": f"Say {turn}."}]})
        assert response.status_code == 200, response.text
    after = generated_tokens(stack.a), generated_tokens(stack.b)
    assert after[0] > before[0] and after[1] > before[1]


def test_an_upstream_context_overflow_is_a_400_naming_the_problem(stack):
    prompt = " ".join(f"Fact {n}: the archivist keeps the maps of year {1700 + n} on shelf {n % 40}." for n in range(90))
    assert len(upstream_tokens(stack.a, prompt)) > SLOT_CONTEXT  # fits our 8,192, not the upstream's slot
    for stream in (False, True):
        response = stack.post("/v1/chat/completions", {"model": "ls-overflow", "max_tokens": 8, "stream": stream,
                                                       "messages": [{"role": "user", "content": prompt}]})
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "context_length_exceeded"
        # The sizes are llama-server's own (its n_prompt_tokens and its slot's n_ctx), not our configured 8,192.
        assert f"the model's context holds {SLOT_CONTEXT} tokens" in error["message"]
        assert "Shorten the conversation" in error["message"]
        assert "Traceback" not in response.text


def test_a_killed_instance_hands_its_reply_to_the_other_then_both_down_is_503(stack):
    def kill_the_busy_instance(event):
        if content_of(event) and not killed:
            for upstream in (stack.a, stack.b):
                if "llamacpp:requests_processing 1" in httpx.get(upstream.url + "/metrics", timeout=5).text:
                    upstream.kill()
                    killed.append(upstream)
                    return

    killed: list[LlamaServer] = []
    with httpx.Client(timeout=120) as client:
        with client.stream("POST", stack.server.url + "/v1/chat/completions", headers=stack.headers,
                           json={"model": "ls-pool", "max_tokens": 400, "stream": True,
                                 "messages": [{"role": "user", "content": LONG_STORY}]}) as response:
            assert response.status_code == 200
            events = sse_events(response, kill_the_busy_instance)
    assert len(killed) == 1 and not killed[0].running
    # The other instance continued the reply (chat/engine/remote.py): no error, one finish, [DONE].
    assert not [event for event in events if isinstance(event, dict) and "error" in event]
    finishes = [e["choices"][0].get("finish_reason") for e in events if isinstance(e, dict) and e.get("choices")]
    assert len([f for f in finishes if f]) == 1
    assert events[-1] == "[DONE]"

    survivor = stack.b if killed[0] is stack.a else stack.a
    before = generated_tokens(survivor)
    for turn in range(3):  # every next request is served, by the instance still running
        response = stack.post("/v1/chat/completions", {"model": "ls-pool", "max_tokens": 4,
                                                       "messages": [{"role": "user", "content": f"Say {turn}."}]})
        assert response.status_code == 200, response.text
    assert generated_tokens(survivor) > before

    survivor.kill()
    started = time.monotonic()
    for stream in (False, True):
        response = stack.post("/v1/chat/completions", {"model": "ls-pool", "max_tokens": 4, "stream": stream,
                                                       "messages": QUESTION})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "model_unavailable"
        assert stack.a.label in error["message"] and stack.b.label in error["message"]
        assert "Traceback" not in response.text
    assert time.monotonic() - started < 30
