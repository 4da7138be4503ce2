"""What OpenAI-style clients reach for, against the live server with SmolLM2: paths with and without a trailing
slash, /tokenize and /detokenize, prompt lists and echo on /v1/completions (LangChain's OpenAI LLM), logit_bias,
and tool_choice "required" with parallel calls ending in tool_calls."""

import httpx
import pytest
from langchain_openai import OpenAI

pytestmark = pytest.mark.smollm2

MODEL = "smollm2-135m-instruct"
FRESH = {"Cache-Control": "no-cache"}
TIMEOUT = 300
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The current weather in a city.",
                                            "parameters": {"type": "object", "required": ["city"], "properties": {
                                                "city": {"type": "string", "maxLength": 30}}}}}


def call(live_api, method: str, path: str, key: str = "alice", root: bool = False, **options) -> httpx.Response:
    base = live_api.server.url if root else live_api.base_url
    headers = {"Authorization": f"Bearer {live_api.keys[key]}", **FRESH} if key else {}
    return httpx.request(method, base + path, headers=headers, timeout=TIMEOUT, **options)


def test_every_v1_endpoint_answers_with_and_without_a_trailing_slash(live_api):
    stored = call(live_api, "POST", "/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1, "character": "captain-mira"})
    conversation = stored.json()["conversation"]
    response = call(live_api, "POST", "/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 1,
                                                          "character": "captain-mira"}).json()["id"]
    one_token = {"model": MODEL, "max_tokens": 1}
    requests = [
        ("POST", "/chat/completions", {**one_token, "messages": [{"role": "user", "content": "Hi"}]}, 200),
        ("POST", "/completions", {**one_token, "prompt": "Hi"}, 200),
        ("POST", "/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 1}, 200),
        ("GET", f"/responses/{response}", None, 200),
        ("GET", "/jobs/00000000-0000-0000-0000-000000000000", None, 404),
        ("GET", "/usage", None, 200),
        ("GET", "/models", None, 200),
        ("GET", f"/models/{MODEL}", None, 200),
        ("GET", "/characters", None, 200),
        ("GET", "/characters/captain-mira", None, 200),
        ("GET", "/conversations", None, 200),
        ("GET", f"/conversations/{conversation}", None, 200),
        ("GET", f"/conversations/{conversation}/messages", None, 200),
    ]
    for method, path, body, status in requests:
        for spelled in (path, path + "/"):
            answer = call(live_api, method, spelled, json=body, follow_redirects=False)
            assert answer.status_code == status, (spelled, answer.text[:300])
            if status == 404:  # the resource is missing, not the route
                assert "No API endpoint" not in answer.json()["error"]["message"]
    assert call(live_api, "DELETE", f"/responses/{response}/").status_code == 200


def test_tokenize_detokenize_round_trip_and_the_count_of_a_prompt(live_api):
    text = "The lighthouse keeper's cat, Ada, sleeps <|im_end|> at noon."
    plain = call(live_api, "POST", "/tokenize", root=True, json={"content": text, "parse_special": False}).json()
    assert plain["tokens"] and all(isinstance(token, int) for token in plain["tokens"])
    back = call(live_api, "POST", "/detokenize", root=True, json={"tokens": plain["tokens"]}).json()
    assert back == {"content": text}
    pieces = call(live_api, "POST", "/tokenize", root=True,
                  json={"content": text, "parse_special": False, "with_pieces": True}).json()["tokens"]
    assert [piece["id"] for piece in pieces] == plain["tokens"] and "".join(p["piece"] for p in pieces) == text
    # What /v1/completions counts as prompt_tokens for the same text (control-token texts parsed, BOS added).
    counted = call(live_api, "POST", "/tokenize", root=True, json={"content": text, "add_special": True,
                                                                   "model": MODEL}).json()["tokens"]
    usage = call(live_api, "POST", "/completions", json={"model": MODEL, "prompt": text, "max_tokens": 1}).json()["usage"]
    assert len(counted) == usage["prompt_tokens"]
    # Authenticated like the API; malformed requests name the field.
    assert call(live_api, "POST", "/tokenize", key=None, root=True, json={"content": text}).status_code == 401
    bad = call(live_api, "POST", "/detokenize", root=True, json={"tokens": [10**8]})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"


def test_langchain_openai_llm_batch_sends_a_prompt_list(live_api):
    prompts = ["The capital of France is", "One, two, three,", "Roses are red,"]
    llm = OpenAI(model=MODEL, base_url=live_api.base_url, api_key=live_api.keys["langchain"], max_tokens=8,
                 temperature=0, max_retries=0, timeout=TIMEOUT, default_headers=FRESH)
    replies = llm.batch(prompts)
    assert len(replies) == len(prompts) and all(reply.strip() for reply in replies)
    # One request with the list: one choice per prompt, in order, and the same text as each prompt alone.
    body = call(live_api, "POST", "/completions", json={"model": MODEL, "prompt": prompts, "max_tokens": 8,
                                                        "temperature": 0, "echo": True}).json()
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    for prompt, choice in zip(prompts, body["choices"]):
        assert choice["text"].startswith(prompt) and len(choice["text"]) > len(prompt)
    assert body["usage"]["completion_tokens"] > 3


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt": "Hi", "suffix": "end"}, "suffix"),
    ({"prompt": "Hi", "best_of": 3}, "best_of"),
    ({"prompt": ["Hi", "Ho"], "stream": True}, "prompt"),
    ({"prompt": [1, 2, 3]}, "prompt"),
    ({"prompt": "Hi", "echo": True, "logprobs": 1}, "echo"),
    ({"prompt": "Hi", "logit_bias": {"abc": 1}}, "logit_bias"),
    ({"prompt": "Hi", "logit_bias": {"5": -300}}, "logit_bias"),
])
def test_what_stays_unsupported_is_a_400_naming_it(live_api, body, param):
    answer = call(live_api, "POST", "/completions", json={"model": MODEL, "max_tokens": 1, **body})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


def test_logit_bias_bans_a_token_the_greedy_reply_contains(live_api):
    question = {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12, "temperature": 0}
    plain = live_api.client().chat.completions.create(**question, extra_headers=FRESH).choices[0].message.content
    assert "Paris" in plain
    paris = call(live_api, "POST", "/tokenize", root=True, json={"content": " Paris", "parse_special": False}).json()
    assert len(paris["tokens"]) == 1
    biased = live_api.client().chat.completions.create(**question, logit_bias={str(paris["tokens"][0]): -100},
                                                       extra_headers=FRESH).choices[0].message.content
    assert " Paris" not in biased and biased != plain


@pytest.mark.parametrize("stream", [False, True])
def test_required_with_default_parallel_calls_ends_in_tool_calls(live_api, stream):
    """SmolLM2 repeats its call when more may follow; the repeat ends the reply instead of max_tokens."""
    options = dict(model=MODEL, messages=[{"role": "user", "content": "What is the weather like in Paris today?"}],
                   tools=[WEATHER], tool_choice="required", temperature=0, max_tokens=300, extra_headers=FRESH)
    client = live_api.client().with_options(timeout=TIMEOUT)
    if not stream:
        choice = client.chat.completions.create(**options).choices[0]
        finish, calls = choice.finish_reason, [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    else:
        chunks = [chunk for chunk in client.chat.completions.create(**options, stream=True) if chunk.choices]
        finish = next(c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason)
        arguments: dict = {}
        for chunk in chunks:
            for delta in chunk.choices[0].delta.tool_calls or []:
                name, text = arguments.get(delta.index, ("", ""))
                arguments[delta.index] = (name + (delta.function.name or ""), text + (delta.function.arguments or ""))
        calls = list(arguments.values())
    assert finish == "tool_calls"
    assert calls and len(set(calls)) == len(calls)  # no call twice
