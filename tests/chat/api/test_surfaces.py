"""What OpenAI-style clients reach for, against the live server with SmolLM2: paths with and without a trailing
slash, /tokenize and /detokenize, prompt lists and echo on /v1/completions (LangChain's OpenAI LLM), logit_bias,
and tool_choice "required" with parallel calls ending in tool_calls."""

import httpx
import pytest
from django.urls import URLResolver, get_resolver
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


def v1_routes() -> set[tuple[str, str]]:
    """(method, route without its trailing slash) of every documented /v1/ route, read from the URL resolver: a
    route added without a line in the test below fails it."""
    api = next(pattern for pattern in get_resolver().url_patterns
               if isinstance(pattern, URLResolver) and str(pattern.pattern) == "v1/")
    return set(_routes_under(api, prefix=""))


def _routes_under(resolver: URLResolver, prefix: str):
    for pattern in resolver.url_patterns:
        if isinstance(pattern, URLResolver):  # an include(): its routes, each with the include's prefix
            yield from _routes_under(pattern, prefix=prefix + str(pattern.pattern))
        elif pattern.name is not None:  # unnamed: the other spelling of a documented route (chat/api/urls.py both())
            view = pattern.callback.view_class
            yield from ((method.upper(), (prefix + str(pattern.pattern)).rstrip("/")) for method in
                        view.http_method_names if method not in ("head", "options") and hasattr(view, method))


def stored_exchange(live_api) -> dict:
    """A new stored conversation with a character (one user message, one reply) and a stored response."""
    conversation = call(live_api, "POST", "/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1,
        "character": "captain-mira"}).json()["conversation"]
    messages = call(live_api, "GET", f"/conversations/{conversation}/messages/").json()["results"]
    response = call(live_api, "POST", "/responses", json={"model": MODEL, "input": "Hi", "max_output_tokens": 1,
                                                          "character": "captain-mira"}).json()["id"]
    return {"pk": conversation, "response_id": response, "model_id": MODEL, "slug": "captain-mira",
            "user_message": next(m["id"] for m in messages if m["role"] == "user"),
            "reply": next(m["id"] for m in messages if m["role"] == "assistant")}


ONE_TOKEN = {"max_tokens": 1}
NO_JOB = "00000000-0000-0000-0000-000000000000"  # also no invitation
# (method, route) -> (the path to request, its body, the status expected). Deletions come last: each spelling
# gets its own stored exchange.
ENDPOINTS = {
    ("POST", "chat/completions"): ("/chat/completions", {"model": MODEL, **ONE_TOKEN,
                                                         "messages": [{"role": "user", "content": "Hi"}]}, 200),
    ("POST", "completions"): ("/completions", {"model": MODEL, **ONE_TOKEN, "prompt": "Hi"}, 200),
    ("POST", "responses"): ("/responses", {"model": MODEL, "input": "Hi", "max_output_tokens": 1}, 200),
    ("GET", "responses/<str:response_id>"): ("/responses/{response_id}", None, 200),
    ("GET", "jobs/<lookup_uuid:pk>"): (f"/jobs/{NO_JOB}", None, 404),
    ("DELETE", "jobs/<lookup_uuid:pk>"): (f"/jobs/{NO_JOB}", None, 404),
    ("GET", "usage"): ("/usage", None, 200),
    ("GET", "models"): ("/models", None, 200),
    ("GET", "models/<path:model_id>"): ("/models/{model_id}", None, 200),
    ("GET", "characters"): ("/characters", None, 200),
    ("GET", "characters/<str:slug>"): ("/characters/{slug}", None, 200),
    ("GET", "groups"): ("/groups", None, 200),
    ("GET", "conversations"): ("/conversations", None, 200),
    ("GET", "conversations/<lookup_uuid:pk>"): ("/conversations/{pk}", None, 200),
    ("PATCH", "conversations/<lookup_uuid:pk>"): ("/conversations/{pk}", {"title": "Renamed"}, 200),
    ("GET", "conversations/<lookup_uuid:pk>/messages"): ("/conversations/{pk}/messages", None, 200),
    # A conversation with one character takes no participants (400 not_a_group_chat): the route answered.
    ("POST", "conversations/<lookup_uuid:pk>/participants"): ("/conversations/{pk}/participants", {"username": "alice"},
                                                        400),
    ("GET", "conversations/<lookup_uuid:pk>/participants"): ("/conversations/{pk}/participants", None, 200),
    ("GET", "invitations"): ("/invitations", None, 200),
    ("DELETE", "invitations/<lookup_uuid:pk>"): (f"/invitations/{NO_JOB}", None, 404),
    ("POST", "invitations/<lookup_uuid:pk>/accept"): (f"/invitations/{NO_JOB}/accept", {}, 404),
    ("DELETE", "conversations/<lookup_uuid:pk>/participants/<str:username>"): (  # no such participant
        "/conversations/{pk}/participants/nobody", None, 404),
    ("GET", "conversations/<lookup_uuid:pk>/path"): ("/conversations/{pk}/path", None, 200),
    ("GET", "conversations/<lookup_uuid:pk>/reply"): ("/conversations/{pk}/reply", None, 404),  # none is running
    ("POST", "conversations/<lookup_uuid:pk>/stop"): ("/conversations/{pk}/stop", {}, 404),
    ("GET", "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>/alternatives"): (
        "/conversations/{pk}/messages/{reply}/alternatives", None, 200),
    ("POST", "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>/select"): (
        "/conversations/{pk}/messages/{reply}/select", {}, 200),
    ("POST", "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>/regenerate"): (
        "/conversations/{pk}/messages/{reply}/regenerate", ONE_TOKEN, 200),
    ("POST", "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>/continue"): (
        "/conversations/{pk}/messages/{reply}/continue", ONE_TOKEN, 200),
    ("POST", "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>/edit"): (
        "/conversations/{pk}/messages/{user_message}/edit", {**ONE_TOKEN, "content": "Hello"}, 200),
    ("DELETE", "conversations/<lookup_uuid:pk>/messages/<lookup_int:message_id>"): (
        "/conversations/{pk}/messages/{reply}", None, 200),
    ("DELETE", "responses/<str:response_id>"): ("/responses/{response_id}", None, 200),
    ("DELETE", "conversations/<lookup_uuid:pk>"): ("/conversations/{pk}", None, 204),  # the whole conversation: last
}


def test_every_v1_endpoint_answers_with_and_without_a_trailing_slash(live_api):
    assert set(ENDPOINTS) == v1_routes()
    for trailing in ("", "/"):
        ids = stored_exchange(live_api)
        for (method, _), (path, body, status) in ENDPOINTS.items():
            spelled = path.format(**ids) + trailing
            answer = call(live_api, method, spelled, json=body, follow_redirects=False)
            assert answer.status_code == status, (method, spelled, answer.text[:300])
            if status == 404:  # the resource is missing, not the route
                assert "No API endpoint" not in answer.json()["error"]["message"]


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
    assert bad.json()["error"]["param"] == "tokens"
    # Special-token parsing is quadratic in llama.cpp (90,000 "<|im_end|>a" in 1 MB: 32 s of CPU): bounded.
    for path, body in (("/tokenize", {"content": "<|im_end|>a" * 4097}),
                       ("/completions", {"model": MODEL, "prompt": "<|im_end|>a" * 4097, "max_tokens": 1})):
        refused = call(live_api, "POST", path, root=path == "/tokenize", json=body)
        assert refused.status_code == 400 and "control-token texts" in refused.json()["error"]["message"], path
    many = call(live_api, "POST", "/tokenize", root=True, json={"content": "<|im_end|>a" * 4096}).json()
    assert len(many["tokens"]) == 8192
    # A piece each is a detokenize call (an upstream request for a remote model): bounded.
    pieces = call(live_api, "POST", "/tokenize", root=True, json={"content": "<|im_end|>a" * 4096,
                                                                   "with_pieces": True}).json()["tokens"]
    assert len(pieces) == 8192 and pieces[0]["piece"] == "<|im_end|>"
    refused = call(live_api, "POST", "/tokenize", root=True, json={"content": "a " * 9000, "with_pieces": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "with_pieces"


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
    ({"prompt": "Hi", "logit_bias": {"99999999": 5}}, "logit_bias"),  # outside the vocabulary: the engine says so
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
