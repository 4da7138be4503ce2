"""The same contract local or remote: tool choice, response_format and logprobs through a llama-server pool.

Two real llama-server upstreams (`--jinja`, 2 slots each) behind the openai_compatible backend. SmolLM2's own
template answers `tool_choice` required or named as plain text when llama-server applies it; here the
grammar built by this project goes with the request, so the calls are enforced as they are locally.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.chat.api.test_tools import ADD, QUESTION, SCHEMAS, WEATHER, WEATHER_PARAMETERS
from tests.conftest import missing_service
from tests.live import LiveServer, free_port, prepare_database
from tests.llama_server import LlamaServer, find_llama_server

pytestmark = [pytest.mark.smollm2, pytest.mark.services]

SLOT_CONTEXT = 1024
NO_CACHE = {"Cache-Control": "no-cache"}


@pytest.fixture(scope="module")
def pool(tmp_path_factory, smollm2_path):
    binary, missing = find_llama_server()
    if binary is None:
        missing_service(missing)
    workdir = tmp_path_factory.mktemp("remote-contract")
    upstreams = [LlamaServer(binary, smollm2_path, port=free_port(), log_path=workdir / f"llama-server-{n}.log",
                             context=2 * SLOT_CONTEXT, parallel=2, threads=1, extra=("--jinja",)) for n in "ab"]
    (workdir / "config.yaml").write_text(f"""
system_prompt: You are a helpful assistant.
default_model: pool
sampling: {{temperature: 0, max_tokens: 80}}
models:
  - name: pool
    backend: openai_compatible
    base_url: [{upstreams[0].url}/v1, {upstreams[1].url}/v1]
    context_length: {SLOT_CONTEXT}
""")
    server = LiveServer(workdir=workdir, env={"LLMSITE_CONFIG": str(workdir / "config.yaml"), "API_RATE_LIMIT": ""})
    try:
        for upstream in upstreams:
            upstream.start()
        key = prepare_database(server, {"alice": ["alice"]})["alice"]
        for upstream in upstreams:
            upstream.wait_until_ready()
        server.start()
        yield openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=300)
    finally:
        server.stop()
        for upstream in upstreams:
            upstream.stop()


def create(client, **options):
    options.setdefault("max_tokens", 80)
    return client.chat.completions.create(model="pool", temperature=0, extra_headers=NO_CACHE, **options)


def assert_valid_call(call):
    assert call.type == "function" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_required_tool_choice_returns_calls_through_the_pool(pool):
    choice = create(pool, messages=QUESTION, tools=[WEATHER, ADD], tool_choice="required").choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert_valid_call(call)


def test_a_named_function_is_the_one_called_through_the_pool(pool):
    calls = create(pool, messages=QUESTION, tools=[WEATHER, ADD],
                   tool_choice={"type": "function", "function": {"name": "add"}}).choices[0].message.tool_calls
    assert calls and {call.function.name for call in calls} == {"add"}
    for call in calls:
        assert_valid_call(call)


def test_streamed_tool_calls_through_the_pool(pool):
    stream = create(pool, messages=QUESTION, tools=[WEATHER], tool_choice="required", stream=True,
                    parallel_tool_calls=False)
    deltas = [c.choices[0].delta.tool_calls[0] for c in stream if c.choices and c.choices[0].delta.tool_calls]
    assert deltas and deltas[0].function.name == "get_weather" and deltas[0].id.startswith("call_")
    arguments = "".join(delta.function.arguments or "" for delta in deltas if delta.index == 0)
    jsonschema.validate(json.loads(arguments), WEATHER_PARAMETERS)


def test_a_json_schema_response_format_holds_through_the_pool(pool):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                               "population": {"type": "integer"}},
              "required": ["city", "population"], "additionalProperties": False}
    reply = create(pool, messages=[{"role": "user", "content": "Name a big city and its population."}],
                   response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema}})
    jsonschema.validate(json.loads(reply.choices[0].message.content), schema)


def test_logprobs_come_back_from_the_upstream(pool):
    reply = create(pool, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, logprobs=True,
                   top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert content, reply
    assert "".join(entry.token for entry in content) == reply.choices[0].message.content
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].logprob >= entry.logprob - 1e-6  # the likeliest first


def test_streamed_logprobs_come_back_from_the_upstream(pool):
    stream = create(pool, messages=[{"role": "user", "content": "Say hello."}], max_tokens=6, logprobs=True,
                    top_logprobs=2, stream=True)
    chunks = [c for c in stream if c.choices]
    entries = [entry for c in chunks if c.choices[0].logprobs for entry in c.choices[0].logprobs.content or []]
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert entries and "".join(entry.token for entry in entries) == text


def test_the_upstreams_cached_tokens_are_not_passed_on(pool):
    """llama-server reuses its slot's cache token by token whoever sent the prompt: its count, passed on, told
    one tenant another's prompt a guessed token at a time. The same prompt twice: the upstream reused it."""
    ask = dict(messages=[{"role": "user", "content": "My code is 4 7 1 1. Repeat it."}], max_tokens=2)
    for _ in range(2):
        usage = create(pool, **ask).usage
        assert usage.prompt_tokens > 10
        assert usage.prompt_tokens_details is None or not usage.prompt_tokens_details.cached_tokens
