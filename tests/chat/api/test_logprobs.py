"""`logprobs` / `top_logprobs` against a live server with the real SmolLM2 model, and their refusal elsewhere."""

import json
import math

import httpx
import pytest

from tests.live import LiveServer, free_port, prepare_database
from tests.factories import write_tiny_gguf

pytestmark = pytest.mark.smollm2

MODEL = "smollm2-135m-instruct"
NO_CACHE = {"Cache-Control": "no-cache"}  # every reply is generated, so a test can fail
TIMEOUT = 300
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]
# Greedy and unpenalised: the sampled token is then the model's most likely one at every step.
GREEDY = {"temperature": 0, "repetition_penalty": 1.0, "max_tokens": 24}


def post(live_api, path: str, body: dict, headers: dict = NO_CACHE) -> httpx.Response:
    return httpx.post(f"{live_api.base_url}/{path}", json={"model": MODEL, **body}, timeout=TIMEOUT,
                      headers={"Authorization": f"Bearer {live_api.keys['alice']}", **headers})


def sse_payloads(response: httpx.Response) -> list[dict]:
    payloads = [line[len("data: "):] for line in response.text.splitlines() if line.startswith("data: ")]
    assert payloads[-1] == "[DONE]"
    return [json.loads(payload) for payload in payloads[:-1]]


def assert_distribution(entries: list[dict], top: int, *, greedy: bool = True):
    """Each entry: a log-probability, its bytes, `top` alternatives sorted, the greedy pick being the first."""
    assert entries
    for entry in entries:
        assert entry["logprob"] <= 0 and entry["bytes"] == list(entry["token"].encode("utf-8"))
        alternatives = entry["top_logprobs"]
        assert len(alternatives) == top
        values = [alternative["logprob"] for alternative in alternatives]
        assert values == sorted(values, reverse=True) and all(value <= 0 for value in values)
        assert sum(math.exp(value) for value in values) <= 1 + 1e-6  # a real distribution, not raw logits
        if greedy:
            assert entry["logprob"] == pytest.approx(values[0], abs=1e-6)
            assert entry["token"] == alternatives[0]["token"]


def test_chat_logprobs_line_up_with_the_reply(live_api):
    response = post(live_api, "chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 5,
                                                   **GREEDY})
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    entries = choice["logprobs"]["content"]
    assert "".join(entry["token"] for entry in entries) == choice["message"]["content"]
    assert len(entries) == response.json()["usage"]["completion_tokens"]  # the end-of-turn token is not listed
    assert_distribution(entries, 5)


def test_the_openai_sdk_reads_the_logprobs(live_api):
    reply = live_api.client().chat.completions.create(model=MODEL, messages=QUESTION, logprobs=True, top_logprobs=3,
                                                      temperature=0, max_tokens=6, extra_headers=NO_CACHE,
                                                      extra_body={"repetition_penalty": 1.0})
    content = reply.choices[0].logprobs.content
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    assert all(len(entry.top_logprobs) == 3 and entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob
               for entry in content)


def test_streamed_logprobs_come_with_their_text_and_match_the_unstreamed_reply(live_api):
    whole = post(live_api, "chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 2, **GREEDY})
    expected = whole.json()["choices"][0]["logprobs"]["content"]
    response = post(live_api, "chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 2,
                                                   "stream": True, **GREEDY})
    assert response.status_code == 200, response.text
    entries, content = [], ""
    for payload in sse_payloads(response):
        choice = payload["choices"][0]
        text = choice["delta"].get("content") or ""
        if choice["logprobs"] is not None:
            chunk_entries = choice["logprobs"]["content"]
            assert "".join(entry["token"] for entry in chunk_entries) == text  # each chunk carries its own tokens
            entries += chunk_entries
        else:
            assert not text  # no text without its logprobs
        content += text
    assert "".join(entry["token"] for entry in entries) == content
    assert_distribution(entries, 2)
    assert [entry["token"] for entry in entries] == [entry["token"] for entry in expected]
    for streamed, unstreamed in zip(entries, expected):
        assert streamed["logprob"] == pytest.approx(unstreamed["logprob"], abs=0.05)


def test_sampled_logprobs_without_top_and_with_a_stop_string(live_api):
    full = post(live_api, "chat/completions", {"messages": QUESTION, **GREEDY}).json()["choices"][0]["message"]
    words = full["content"].split()
    assert len(words) >= 4, full
    stop = words[len(words) // 2]
    response = post(live_api, "chat/completions", {"messages": QUESTION, "logprobs": True, "stop": [stop], **GREEDY})
    choice = response.json()["choices"][0]
    content, entries = choice["message"]["content"], choice["logprobs"]["content"]
    assert choice["finish_reason"] == "stop" and stop not in content and full["content"].startswith(content)
    joined = "".join(entry["token"] for entry in entries)
    # The tokens cover the text; only the last one may reach into the cut-off stop string.
    assert joined.startswith(content)
    if entries:
        assert len(joined) - len(entries[-1]["token"]) <= len(content)
    assert all(entry["top_logprobs"] == [] and entry["logprob"] <= 0 for entry in entries)


def test_logprobs_requests_bypass_the_response_cache(live_api):
    body = {"messages": QUESTION, "logprobs": True, **GREEDY, "max_tokens": 6}
    first, second = (post(live_api, "chat/completions", body, headers={}) for _ in range(2))
    for response in (first, second):
        assert response.status_code == 200 and response.headers["X-Cache"] == "BYPASS"
        assert response.json()["choices"][0]["logprobs"]["content"]


def test_completions_legacy_logprobs_streamed_and_not(live_api):
    body = {"prompt": "The capital of France is", "logprobs": 3, **GREEDY}
    choice = post(live_api, "completions", body).json()["choices"][0]
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == choice["text"]
    assert logprobs["text_offset"] == [sum(map(len, logprobs["tokens"][:i])) for i in range(len(logprobs["tokens"]))]
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert logprob <= 0 and top[token] == logprob and len(top) <= 4  # 3 likeliest plus the sampled one
        assert logprob == pytest.approx(max(top.values()), abs=1e-6)  # greedy
    streamed = post(live_api, "completions", {**body, "stream": True})
    tokens, offsets, text = [], [], ""
    for payload in sse_payloads(streamed):
        choice = payload["choices"][0]
        text += choice["text"]
        tokens += choice["logprobs"]["tokens"]
        offsets += choice["logprobs"]["text_offset"]
    assert "".join(tokens) == text and tokens == logprobs["tokens"] and offsets == logprobs["text_offset"]


@pytest.mark.parametrize(("path", "body", "param"), [
    ("chat/completions", {"top_logprobs": 3}, "top_logprobs"),
    ("chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("chat/completions", {"logprobs": True, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {}}}}]}, "logprobs"),
    ("completions", {"logprobs": 6}, "logprobs"),
])
def test_invalid_logprobs_requests_are_400_naming_the_parameter(live_api, path, body, param):
    request = {"messages": QUESTION} if path == "chat/completions" else {"prompt": "Hello"}
    response = post(live_api, path, {**request, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


# --- Backends without logprobs ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_backends(tmp_path_factory):
    """A server whose models are a tiny ctransformers model and a remote one (whose upstream is never reached)."""
    workdir = tmp_path_factory.mktemp("logprobs-backends")
    tiny = write_tiny_gguf(workdir / "tiny.gguf", seed=0)
    (workdir / "config.yaml").write_text(f"""
system_prompt: You are a helpful assistant.
default_model: tiny-ct
sampling: {{temperature: 0.7, max_tokens: 8}}
models:
  - name: tiny-ct
    model_path: {tiny}
    backend: ctransformers
    context_length: 256
    threads: 1
  - name: remote
    backend: openai_compatible
    base_url: http://127.0.0.1:{free_port()}/v1
    connect_timeout: 1
""")
    server = LiveServer(workdir=workdir, env={"LLMSITE_CONFIG": str(workdir / "config.yaml"), "API_RATE_LIMIT": ""})
    key = prepare_database(server, {"alice": ["alice"]})["alice"]
    server.start()
    try:
        yield server, key
    finally:
        server.stop()


# A remote model passes its upstream's logprobs through (tests/chat/test_remote_contract.py).
@pytest.mark.parametrize("model", ["tiny-ct"])
@pytest.mark.parametrize(("path", "body"), [
    ("chat/completions", {"messages": QUESTION, "logprobs": True}),
    ("completions", {"prompt": "Hello", "logprobs": 2}),
])
def test_backends_without_logprobs_refuse_them(other_backends, model, path, body):
    server, key = other_backends
    response = httpx.post(f"{server.url}/v1/{path}", json={"model": model, **body}, timeout=TIMEOUT,
                          headers={"Authorization": f"Bearer {key}", **NO_CACHE})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "logprobs" and model in error["message"], error
