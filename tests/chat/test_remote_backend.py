"""The openai_compatible backend against real upstreams: llama-cpp-python's own server, twice, on loopback.

Our server runs as a LiveServer whose config.yaml points at the upstreams; a small recording
reverse proxy (test infrastructure) sits in front of one of them to show what arrives upstream.
One upstream is killed mid-stream by a test; the module's fixture stops whatever is left.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import openai
import pytest

from chat.engine.errors import ContextOverflow
from chat.engine.upstream import Upstream as PoolMember
from chat.engine.upstream import UpstreamPool, error_for_status
from llmsite.config import ConfigError, load_config
from tests.live import LiveServer, content_of, free_port, prepare_database, sse_events
from tests.subprocess_helpers import ROOT

pytestmark = pytest.mark.smollm2

KEY_ENV = "LLMSITE_TEST_UPSTREAM_KEY"
UPSTREAM_KEY = "upstream-secret-3f9a"  # given to our server through the environment only
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
LONG_STORY = "Write a long story about a dragon who learns to sail. Make it at least 500 words."
KEYS = {"alice": ["alice"], "kim": ["kim"]}


@dataclass
class Recorded:
    path: str
    headers: dict
    body: bytes

    @property
    def json(self) -> dict:
        return json.loads(self.body)


class RecordingProxy:
    """A reverse proxy thread that stores every request it forwards and streams the answer back as it comes."""

    def __init__(self, target: str):
        self.target = target
        self.requests: list[Recorded] = []
        self._client = httpx.Client(timeout=60)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                proxy.requests.append(Recorded(self.path, {k.lower(): v for k, v in self.headers.items()}, body))
                with proxy._client.stream("POST", proxy.target + self.path, content=body,
                                          headers={"Content-Type": "application/json"}) as answer:
                    self.send_response(answer.status_code)
                    self.send_header("Content-Type", answer.headers.get("content-type", "application/json"))
                    self.end_headers()  # HTTP/1.0: the body ends when the connection closes
                    for chunk in answer.iter_raw():
                        self.wfile.write(chunk)
                        self.wfile.flush()

            def log_message(self, *args):
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    def sent(self, path: str, since: int = 0) -> list[Recorded]:
        return [request for request in self.requests[since:] if request.path == path]

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._client.close()


@dataclass
class Upstream:
    port: int
    log_path: Path
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, model_path: Path) -> None:
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.llama_cpp_server", "--model", str(model_path), "--host", "127.0.0.1",
             "--port", str(self.port), "--n_ctx", "2048", "--n_threads", "1", "--interrupt_requests", "False"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def wait_until_ready(self, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited early:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/v1/models", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"llama_cpp.server did not answer within {timeout}s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass
class Stack:
    server: LiveServer
    keys: dict
    upstream_a: Upstream
    upstream_b: Upstream
    proxy: RecordingProxy
    dead_port: int
    config_text: str

    def client(self, key_name: str = "alice") -> openai.OpenAI:
        return openai.OpenAI(base_url=self.server.url + "/v1", api_key=self.keys[key_name], max_retries=0, timeout=60)

    def headers(self, key_name: str = "alice") -> dict:
        return {"Authorization": f"Bearer {self.keys[key_name]}"}


def remote_config(*, proxy: str, a: str, b: str, dead: str) -> str:
    return f"""
system_prompt: You are a helpful assistant.
default_model: remote
sampling: {{temperature: 0.7, max_tokens: 32}}
models:
  - name: remote                  # through the recording proxy to upstream A
    backend: openai_compatible
    base_url: {proxy}/v1
    remote_model: upstream-smollm2
    api_key_env: {KEY_ENV}
    context_length: 2048
  - name: remote-completions      # prompt rendered here (ChatML), sent to /v1/completions
    backend: openai_compatible
    base_url: {proxy}
    remote_api: completions
  - name: remote-direct
    backend: openai_compatible
    base_url: {a}
  - name: remote-down
    backend: openai_compatible
    base_url: {dead}
    connect_timeout: 2
  - name: remote-b                # killed mid-stream by a test
    backend: openai_compatible
    base_url: {b}
  - name: remote-pool             # one upstream never answers
    backend: openai_compatible
    base_url: [{dead}, {a}]
    connect_timeout: 2
  - name: remote-pool-b           # B dies during the tests
    backend: openai_compatible
    base_url: [{b}, {a}]
"""


@pytest.fixture(scope="module")
def stack(tmp_path_factory, smollm2_path):
    workdir = tmp_path_factory.mktemp("remote")
    upstream_a = Upstream(free_port(), workdir / "upstream-a.log")
    upstream_b = Upstream(free_port(), workdir / "upstream-b.log")
    proxy = RecordingProxy(upstream_a.url)
    dead_port = free_port()  # nothing listens there
    config_text = remote_config(proxy=proxy.url, a=upstream_a.url, b=upstream_b.url, dead=f"http://127.0.0.1:{dead_port}")
    (workdir / "config.yaml").write_text(config_text)
    server = LiveServer(workdir=workdir, env={"LLMSITE_CONFIG": str(workdir / "config.yaml"), KEY_ENV: UPSTREAM_KEY,
                                              "API_RATE_LIMIT": "", "LOG_LEVEL": "INFO"})
    try:
        upstream_a.start(smollm2_path)
        upstream_b.start(smollm2_path)
        keys = prepare_database(server, KEYS)  # while the upstreams load
        upstream_a.wait_until_ready()
        upstream_b.wait_until_ready()
        server.start()
        yield Stack(server=server, keys=keys, upstream_a=upstream_a, upstream_b=upstream_b, proxy=proxy,
                    dead_port=dead_port, config_text=config_text)
    finally:
        server.stop()
        upstream_a.stop()
        upstream_b.stop()
        proxy.close()


def test_plain_and_streamed_completions_and_caching_stay_here(stack):
    client = stack.client()
    before = len(stack.proxy.requests)
    raw = client.chat.completions.with_raw_response.create(model="remote", messages=QUESTION, max_tokens=16,
                                                          temperature=0)
    reply = raw.parse()
    assert raw.headers["x-cache"] == "MISS"
    assert reply.model == "remote" and reply.object == "chat.completion"
    assert reply.choices[0].message.content.strip()
    assert reply.choices[0].finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 16

    stream = client.chat.completions.create(model="remote", messages=[{"role": "user", "content": "Name a colour."}],
                                            max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices).strip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (["stop"],
                                                                                                     ["length"])
    assert 0 < chunks[-1].usage.completion_tokens <= 12
    assert len(stack.proxy.sent("/v1/chat/completions", before)) == 2

    # The same greedy request again comes from our response cache: nothing is sent upstream.
    again = client.chat.completions.with_raw_response.create(model="remote", messages=QUESTION, max_tokens=16,
                                                            temperature=0)
    assert again.headers["x-cache"] == "HIT"
    assert again.parse().choices[0].message.content == reply.choices[0].message.content
    assert len(stack.proxy.sent("/v1/chat/completions", before)) == 2


def test_a_characters_prompt_arrives_upstream_intact(stack):
    message = "Captain, is a storm coming tonight?"
    before = len(stack.proxy.requests)
    reply = stack.client().chat.completions.create(model="remote", messages=[{"role": "user", "content": message}],
                                                   max_tokens=12, temperature=0, extra_body={"character": "captain-mira"})
    sent = stack.proxy.sent("/v1/chat/completions", before)
    assert len(sent) == 1
    body = sent[0].json
    assert body["model"] == "upstream-smollm2" and body["stream"] is True
    assert body["max_tokens"] == 12 and body["temperature"] == 0
    # The upstream gets exactly the messages our composer builds (profile, example dialogue, scenario, history).
    composed = json.loads(stack.server.manage(f"""
import json
from characters.models import Character
from chat.engines import get_engine
from chat.prompting import prompt_compose
prompt = prompt_compose(engine=get_engine("remote"), character=Character.objects.get(slug="captain-mira"),
                        turns=[{{"role": "user", "content": {message!r}}}], max_tokens=12,
                        user_name="alice")  # {{{{user}}}} is the key's account (the request names no one)
print(json.dumps(prompt.messages))
""").strip().splitlines()[-1])
    assert body["messages"] == composed
    assert "Captain Mira Vale commands the Gilded Gull" in composed[0]["content"]
    assert "Black clouds are gathering" in composed[1]["content"]  # the storm scenario fired
    assert {"role": "user", "content": message} in composed
    assert composed[-1] == {"role": "system", "content": "Answer as Captain Mira, in two or three lively sentences."}
    # The API key came from the environment variable that api_key_env names, not from config.yaml.
    assert sent[0].headers["authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert UPSTREAM_KEY not in stack.config_text and KEY_ENV in stack.config_text
    # The conversation is stored here, with the upstream's reply.
    stored = httpx.get(f"{stack.server.url}/v1/conversations/{reply.model_extra['conversation']}/messages/",
                       headers=stack.headers(), timeout=10).json()
    stored = stored["results"]
    assert [m["role"] for m in stored] == ["user", "assistant"]
    assert stored[-1]["content"] == reply.choices[0].message.content and stored[-1]["model_name"] == "remote"


def test_plain_prompts_and_completions_mode_go_to_v1_completions(stack):
    before = len(stack.proxy.requests)
    response = httpx.post(stack.server.url + "/v1/completions", headers=stack.headers(), timeout=30,
                          json={"model": "remote", "prompt": "The capital of France is", "max_tokens": 6})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] and response.json()["usage"]["completion_tokens"] > 0
    reply = stack.client().chat.completions.create(model="remote-completions", messages=QUESTION, max_tokens=6)
    assert reply.choices[0].message.content
    sent = [request.json for request in stack.proxy.sent("/v1/completions", before)]
    assert [body["prompt"] for body in sent[:1]] == ["The capital of France is"]
    assert len(sent) == 2 and "messages" not in sent[1]
    assert sent[1]["prompt"].startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert sent[1]["prompt"].endswith("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                                      "<|im_start|>assistant\n")


def test_a_named_tool_choice_is_enforced_by_our_grammar_on_a_llama_cpp_upstream(stack):
    parameters = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    weather = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city.",
                                                "parameters": parameters}}
    choice = {"type": "function", "function": {"name": "get_weather"}}
    before = len(stack.proxy.requests)
    for stream in (False, True):
        reply = stack.client().chat.completions.create(
            model="remote", messages=[{"role": "user", "content": "What is the weather in Paris?"}], tools=[weather],
            tool_choice=choice, max_tokens=40, temperature=0, stream=stream,
            extra_headers={"Cache-Control": "no-cache"})
        if stream:
            deltas = [c.choices[0].delta.tool_calls[0] for c in reply if c.choices and c.choices[0].delta.tool_calls]
            assert deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
            arguments = "".join(d.function.arguments or "" for d in deltas)
        else:
            assert reply.choices[0].finish_reason in ("tool_calls", "length")
            (call,) = reply.choices[0].message.tool_calls
            assert call.function.name == "get_weather"
            arguments = call.function.arguments
        assert isinstance(json.loads(arguments)["city"], str)
    sent = stack.proxy.sent("/v1/chat/completions", before)
    assert len(sent) == 2
    for request in sent:  # a llama.cpp upstream gets the grammar built here, and the tools as text: as locally
        body = request.json
        assert "tools" not in body and "get_weather" in body["grammar"]
        assert "get_weather" in json.dumps(body["messages"])


def test_an_upstream_that_is_down_answers_503_naming_it(stack):
    for stream in (False, True):
        response = httpx.post(stack.server.url + "/v1/chat/completions", headers=stack.headers(), timeout=30,
                              json={"model": "remote-down", "messages": QUESTION, "max_tokens": 4, "stream": stream})
        assert response.status_code == 503, response.text
        error = response.json()["error"]
        assert error["code"] == "model_unavailable" and error["type"] == "service_unavailable"
        assert error["message"] == (f"Model 'remote-down' (127.0.0.1:{stack.dead_port}) is unavailable: "
                                    "the upstream server does not answer (connection refused).")


def test_a_client_that_leaves_stops_the_upstream(stack):
    def abandon_a_long_reply():
        with httpx.Client(timeout=60) as client:
            with client.stream("POST", stack.server.url + "/v1/chat/completions", headers=stack.headers(),
                               json={"model": "remote-direct", "messages": [{"role": "user", "content": LONG_STORY}],
                                     "max_tokens": 1000, "temperature": 0, "stream": True}) as response:
                assert response.status_code == 200
                texts = 0
                for line in response.iter_lines():
                    if line.startswith("data: {") and content_of(json.loads(line[len("data: "):])):
                        texts += 1
                    if texts == 5:
                        return  # closes the stream mid-reply

    disconnects = stack.upstream_a.log().count("Disconnected from client")
    abandon_a_long_reply()
    deadline = time.monotonic() + 10
    while stack.upstream_a.log().count("Disconnected from client") == disconnects and time.monotonic() < deadline:
        time.sleep(0.1)
    assert stack.upstream_a.log().count("Disconnected from client") == disconnects + 1
    # The upstream serves one request at a time: the next one is not stuck behind the abandoned story.
    started = time.monotonic()
    reply = stack.client().chat.completions.create(model="remote-direct", messages=QUESTION, max_tokens=8)
    assert reply.choices[0].message.content and time.monotonic() - started < 10


def test_an_upstream_killed_mid_stream_gives_an_error_event_and_stores_nothing(stack):
    def kill_at_first_text(event):
        if content_of(event):
            stack.upstream_b.kill()

    with httpx.Client(timeout=60) as client:
        with client.stream("POST", stack.server.url + "/v1/chat/completions", headers=stack.headers("kim"),
                           json={"model": "remote-b", "character": "captain-mira", "max_tokens": 600,
                                 "temperature": 0, "stream": True,
                                 "messages": [{"role": "user", "content": LONG_STORY}]}) as response:
            assert response.status_code == 200
            events = sse_events(response, kill_at_first_text)
    assert stack.upstream_b.process.poll() is not None  # it really was killed mid-reply
    assert any(content_of(event) for event in events)
    assert events[-1] == "[DONE]"
    errors = [event for event in events if isinstance(event, dict) and "error" in event]
    assert len(errors) == 1
    assert errors[0]["error"]["code"] == "model_unavailable"
    assert f"127.0.0.1:{stack.upstream_b.port}" in errors[0]["error"]["message"]
    assert "stopped in the middle of the reply" in errors[0]["error"]["message"]
    assert not any(isinstance(e, dict) and e.get("choices") and e["choices"][0].get("finish_reason") for e in events)
    # Nothing was stored as a complete reply.
    conversations = httpx.get(stack.server.url + "/v1/conversations/", headers=stack.headers("kim"), timeout=10).json()
    assert conversations["count"] == 0

    # A pool holding the dead upstream and a live one still answers every request.
    for _ in range(3):
        reply = stack.client("kim").chat.completions.create(model="remote-pool-b", messages=QUESTION, max_tokens=4)
        assert reply.choices[0].message.content


def test_a_pool_with_an_upstream_that_never_answers_fails_over(stack):
    started = time.monotonic()
    for _ in range(4):
        reply = stack.client().chat.completions.create(model="remote-pool", messages=QUESTION, max_tokens=4)
        assert reply.choices[0].message.content and reply.model == "remote-pool"
    assert time.monotonic() - started < 30


def test_a_remote_model_loads_no_inference_library(stack):
    shown = stack.server.manage("""
import sys
from chat.engines import get_engine
engine = get_engine("remote-direct")
print(engine.count_tokens("Hello there"), engine.stats()["tokenizer"],
      [name for name in ("llama_cpp", "ctransformers") if name in sys.modules])
""").strip().splitlines()[-1]
    assert shown == "2 llama_cpp_python []"  # counted by the upstream's tokenizer; nothing loaded here


def test_the_pool_skips_a_failed_upstream_until_it_answers_again():
    pool = UpstreamPool(["http://a:1/v1", "http://b:2/"], retry_after=0.2)
    assert [u.root for u in pool.upstreams] == ["http://a:1", "http://b:2"]
    assert [u.label for u in pool.candidates()] == ["a:1", "b:2"]
    assert [u.label for u in pool.candidates()] == ["b:2", "a:1"]  # round-robin
    assert [u.label for u in pool.candidates(rotate=False)] == ["a:1", "b:2"]  # token counting: no turn taken
    assert [u.label for u in pool.candidates()] == ["a:1", "b:2"]
    assert [u.label for u in pool.candidates()] == ["b:2", "a:1"]
    a = pool.upstreams[0]
    pool.failed(a)
    assert [[u.label for u in pool.candidates()] for _ in range(2)] == [["b:2"], ["b:2"]]  # skipped
    time.sleep(0.25)
    assert [u.label for u in pool.candidates()] == ["b:2", "a:1"]  # one request tries it again...
    assert [u.label for u in pool.candidates()] == ["b:2"]  # ...and only one
    pool.succeeded(a)  # it answered
    assert {u.label for u in pool.candidates()} == {"a:1", "b:2"}
    for upstream in pool.upstreams:
        pool.failed(upstream)
    assert len(pool.candidates()) == 1  # all down: the one due soonest is still asked


@pytest.mark.parametrize("body, expected", [
    # llama-server: its own count and its slot's size, in the error's fields.
    (b'{"error": {"code": 400, "message": "request (1500 tokens) exceeds the available context size (1024 tokens), '
     b'try increasing it", "n_ctx": 1024, "n_prompt_tokens": 1500, "type": "exceed_context_size_error"}}', (1500, 1024)),
    # Only the message: the size is read from it, the prompt is our own count.
    (b'{"error": {"message": "request (1500 tokens) exceeds the available context size (1024 tokens)"}}', (1400, 1024)),
    (b'{"error": {"message": "This model\'s maximum context length is 4096 tokens."}}', (1400, 4096)),
])
def test_an_upstream_context_error_becomes_context_overflow_with_the_upstreams_sizes(body, expected):
    error = error_for_status(model="m", upstream=PoolMember.from_url("http://gpu-1:8000"), status=400, body=body,
                             prompt_tokens=1400, context_length=8192)
    assert isinstance(error, ContextOverflow)
    assert (error.prompt_tokens, error.context_length) == expected


REMOTE = "system_prompt: hi\nmodels:\n  - name: r\n    backend: openai_compatible\n"


@pytest.mark.parametrize("options, expected", [
    ("", "model 'r': backend openai_compatible needs 'base_url' (one URL or a list of URLs)"),
    ("    base_url: gpu-1:8000\n", "model 'r': base_url 'gpu-1:8000' must be an http:// or https:// URL"),
    ("    base_url: http://me:secret@gpu-1\n", "model 'r': base_url must not hold credentials; name an environment "
                                               "variable in api_key_env"),
    ("    base_url: http://gpu-1\n    api_key_env: sk-live-123\n", "model 'r': api_key_env must be the name of an "
                                                                   "environment variable (letters, digits, _), never "
                                                                   "the key itself"),
    ("    base_url: http://gpu-1\n    timeout: 0\n", "model 'r': timeout must be a positive number of seconds"),
    ("    base_url: http://gpu-1\n    reply_timeout: -1\n", "model 'r': reply_timeout must be a positive number of "
                                                        "seconds"),
    ("    base_url: http://gpu-1\n    max_connections: 0\n", "model 'r': max_connections must be at least 1"),
    ("    base_url: http://gpu-1\n    remote_api: embeddings\n", "model 'r': remote_api must be chat or completions"),
    ("    base_url: http://gpu-1\n    routing: random\n", "model 'r': routing must be affinity or round_robin"),
    ("    base_url: http://gpu-1\n    upstream_slots: -1\n", "model 'r': upstream_slots must be a non-negative integer"),
])
def test_config_rejects_bad_remote_options_in_one_line(tmp_path, options, expected):
    config = tmp_path / "config.yaml"
    config.write_text(REMOTE + options)
    with pytest.raises(ConfigError) as raised:
        load_config(config, base_dir=tmp_path)
    assert str(raised.value).startswith(f"{config}: {expected}") and "\n" not in str(raised.value)


def test_config_accepts_a_remote_model_without_model_path(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(REMOTE + "    base_url: [http://gpu-1:8000/v1, http://gpu-2:8000/v1]\n    api_key_env: POOL_KEY\n"
                               "    remote_model: Qwen/Qwen2.5-7B-Instruct\n    threads: 4\n")
    (model,) = load_config(config, base_dir=tmp_path).models
    assert (model.path, model.base_urls, model.api_key_env, model.remote_model) == (
        "", ("http://gpu-1:8000/v1", "http://gpu-2:8000/v1"), "POOL_KEY", "Qwen/Qwen2.5-7B-Instruct")
    assert model.threads == 0  # options of the local backends are dropped
    assert model.routing == "affinity"  # by prompt prefix unless `routing: round_robin`
    assert model.upstream_slots == 0  # no slot gate unless set
    assert model.reply_timeout == 1800  # a reply's deadline upstream, failovers included, unless set
    config.write_text("system_prompt: hi\nmodel_path: m.gguf\nbase_url: http://gpu-1\n")
    with pytest.raises(ConfigError, match="base_url is only used with backend openai_compatible"):
        load_config(config, base_dir=tmp_path)


def test_a_busy_tokenizer_pool_estimates_and_does_not_mark_the_upstream_down():
    """One tenant's flood of /tokenize requests kept the tokenizer's connections busy: the next one's wait for a
    connection ran out, counted as the upstream failing, and routing took it out of service for everyone."""
    from chat.engine.remote import RemoteTokenizer
    from tests.fake_upstream import FakeUpstream

    fake, release = FakeUpstream(), threading.Event()
    fake.tokenize_body = lambda text: (release.wait(10), None)[1] if text == "slow" else None
    client = httpx.Client(limits=httpx.Limits(max_connections=1), timeout=httpx.Timeout(10, pool=0.2))
    pool = UpstreamPool([fake.url], retry_after=30)
    tokenizer = RemoteTokenizer(pool=pool, client=client, model="m", headers={})
    tokenizer.dialect = "llama_server"
    try:
        holder = threading.Thread(target=tokenizer.tokenize, args=("slow",), daemon=True)
        holder.start()
        time.sleep(0.2)  # the one connection is held
        assert tokenizer.tokenize("twelve chars") == [0, 0, 0]  # an estimate
        assert tokenizer.tokenize("twelve chars", exact=True) is None  # ids asked for: no placeholders
        assert all(upstream.up for upstream in pool.upstreams)
    finally:
        release.set()
        holder.join(5)
        client.close()
        fake.stop()


def test_the_token_cache_is_bounded_by_what_it_holds_not_only_by_entries(monkeypatch):
    """256 texts of a megabyte each held ~3.5 GB (their token ids most of it), and one tenant's long texts pushed
    everyone's turns out: a long text is not remembered, and the entries' characters and ids are bounded together."""
    from chat.engine import remote
    from chat.engine.remote import RemoteTokenizer
    from tests.fake_upstream import FakeUpstream

    fake, asked = FakeUpstream(), []
    fake.tokenize_body = lambda text: asked.append(text)  # None: the fair answer, len(text) // 4 + 1 ids
    client = httpx.Client(timeout=10)
    tokenizer = RemoteTokenizer(pool=UpstreamPool([fake.url], retry_after=30), client=client, model="m", headers={})
    tokenizer.dialect = "llama_server"
    try:
        turn, document = "a turn of a conversation", "d" * (remote.TOKEN_CACHE_TEXT_CHARS + 1)
        for _ in range(2):
            assert len(tokenizer.tokenize(turn)) == len(turn) // 4 + 1
            assert len(tokenizer.tokenize(document)) == len(document) // 4 + 1
        assert asked == [turn, document, document]  # the turn remembered; the document asked for each time
        assert list(tokenizer._cache) == [turn]

        monkeypatch.setattr(remote, "TOKEN_CACHE_CHARS", 1200)
        texts = [f"{index:03d}" + "x" * 297 for index in range(4)]  # 300 characters and 76 ids each
        for text in texts:
            tokenizer.tokenize(text)
        assert list(tokenizer._cache) == texts[1:]  # the turn and the oldest text forgotten: 3 * 376 <= 1200
        assert tokenizer._cache_chars == 3 * 376
        asked.clear()
        tokenizer.tokenize(texts[3])
        tokenizer.tokenize(texts[0])
        assert asked == [texts[0]]
    finally:
        client.close()
        fake.stop()


def test_a_long_texts_count_is_remembered_by_its_digest(monkeypatch):
    """A history turn too long to keep whole is counted on every request of its conversation: its count is
    remembered (the upstream was asked to tokenize it each time), by digest, for at most LONG_TEXT_COUNTS texts."""
    from chat.engine import remote
    from chat.engine.remote import RemoteTokenizer
    from tests.fake_upstream import FakeUpstream

    fake, asked = FakeUpstream(), []
    fake.tokenize_body = lambda text: asked.append(text)
    client = httpx.Client(timeout=10)
    tokenizer = RemoteTokenizer(pool=UpstreamPool([fake.url], retry_after=30), client=client, model="m", headers={})
    tokenizer.dialect = "llama_server"
    monkeypatch.setattr(remote, "LONG_TEXT_COUNTS", 2)
    try:
        long_turns = [letter * (remote.TOKEN_CACHE_TEXT_CHARS + 1) for letter in "abc"]
        for _ in range(2):
            assert tokenizer.count(long_turns[0]) == len(long_turns[0]) // 4 + 1
        assert asked == [long_turns[0]] and list(tokenizer._cache) == []  # counted once, its tokens not kept
        for turn in long_turns[1:]:
            tokenizer.count(turn)
        asked.clear()
        assert [tokenizer.count(turn) for turn in (long_turns[2], long_turns[1], long_turns[0])] == \
            [len(long_turns[0]) // 4 + 1] * 3
        assert asked == [long_turns[0]]  # the two newest remembered, the oldest forgotten
        assert len(tokenizer._long_counts) == 2
    finally:
        client.close()
        fake.stop()
