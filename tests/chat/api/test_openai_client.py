"""The official `openai` client against a live daphne server running the real SmolLM2 model."""

import time

import httpx
import openai
import pytest

from tests.chat.api.conftest import RATE_LIMIT_PER_MINUTE

pytestmark = pytest.mark.smollm2

MODEL = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
FRESH = {"Cache-Control": "no-cache"}  # the reply must come from the model, not the response cache


def test_non_streamed_completion_has_the_openai_shape(live_api):
    reply = live_api.client().chat.completions.create(model=MODEL, messages=QUESTION,
                                                      max_tokens=24, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "smollm2-135m-instruct"
    choice = reply.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    assert reply.usage.prompt_tokens > 5 and 0 < reply.usage.completion_tokens <= 24
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    assert reply.model_extra["conversation"] is None  # no character: nothing stored


def test_streamed_completion_with_usage(live_api):
    stream = live_api.client("alice-stream").chat.completions.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_headers=FRESH)
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish in (["stop"], ["length"])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert "Paris" in text
    # The streamed text equals the non-streamed reply for the same greedy request, both generated.
    response = live_api.client().chat.completions.with_raw_response.create(
        model=MODEL, messages=QUESTION, max_tokens=16, temperature=0, extra_headers=FRESH)
    assert response.headers["X-Cache"] != "HIT"
    assert response.parse().choices[0].message.content == text


def test_usage_reports_the_prompt_tokens_a_slot_gave(live_api):
    """usage.prompt_tokens_details.cached_tokens, as OpenAI and llama-server report it: the same short prompt
    again takes all its tokens but the last from the slot that evaluated it."""
    ask = dict(model=MODEL, max_tokens=4, temperature=0, extra_headers=FRESH,
               messages=[{"role": "user", "content": f"Name a colour. {time.time_ns()}"}])
    client = live_api.client("alice")
    first = client.chat.completions.create(**ask).usage
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    again = chunks[-1].usage
    assert again.prompt_tokens == first.prompt_tokens
    assert again.prompt_tokens_details.cached_tokens == again.prompt_tokens - 1
    assert first.prompt_tokens_details.cached_tokens < again.prompt_tokens_details.cached_tokens


def test_stop_strings_end_the_reply(live_api):
    def ask(**options):
        return live_api.client().chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Describe the sea in two sentences."}],
            max_tokens=40, temperature=0, **options).choices[0]

    full = ask().message.content
    words = full.split()
    assert len(words) > 6, full
    stop_word = words[len(words) // 2]
    stopped = ask(stop=["zzzz-never", stop_word])
    assert stopped.finish_reason == "stop"
    assert stopped.message.content == full[:full.index(stop_word)]


def test_seed_makes_sampling_reproducible(live_api):
    def ask(seed):
        response = live_api.client().chat.completions.with_raw_response.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a short story about a cat."}],
            max_tokens=20, temperature=1.0, seed=seed, extra_headers=FRESH)
        assert response.headers["X-Cache"] != "HIT"  # each answer was sampled by the model
        return response.parse().choices[0].message.content

    assert ask(1234) == ask(1234)
    assert len({ask(1234), ask(1), ask(2)}) > 1


def test_another_users_identical_prompt_reuses_only_the_characters_own_text(live_api):
    """usage.cached_tokens, and the time to the first token, show what was reused: one user sending another's
    very message (a guess of it) must not find it evaluated. A character's system prompt and persona, the site's
    own text, are shared between users; a user's message, or a client's own system message, only within the user."""
    secret = " ".join(f"word{index}x{time.time_ns() % 100000}" for index in range(150))  # 150+ tokens, fresh
    ask = dict(model=MODEL, max_tokens=2, temperature=0, extra_headers=FRESH)

    def cached(key: str, **request) -> tuple[int, int]:
        usage = live_api.client(key).chat.completions.create(**ask, **request).usage
        return usage.prompt_tokens_details.cached_tokens, usage.prompt_tokens

    in_character = dict(messages=[{"role": "user", "content": secret}], extra_body={"character": "professor-quill"})
    cached("alice", **in_character)
    guessed, prompt_tokens = cached("bob", **in_character)
    own, _ = cached("alice", **in_character)
    assert 0 < guessed <= prompt_tokens - 150  # the persona only, not a chunk of alice's message
    assert own > guessed + 64  # into the message, for alice herself

    system_of_her_own = dict(messages=[{"role": "system", "content": secret}, {"role": "user", "content": "Hi."}])
    cached("alice", **system_of_her_own)
    assert cached("bob", **system_of_her_own)[0] == 0
    assert cached("alice", **system_of_her_own)[0] >= 128


def test_character_conversation_across_three_turns(live_api):
    client = live_api.client()
    first = client.chat.completions.create(model=MODEL, 
        messages=[{"role": "user", "content": "Hello Captain! Is a storm coming?"}],
        max_tokens=24, temperature=0, extra_body={"character": "captain-mira"})
    conversation_id = first.model_extra["conversation"]
    assert conversation_id
    assert any(s["title"] == "A storm is coming" for s in first.model_extra["scenarios"])
    for question in ("Where are we sailing?", "What is for dinner?"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": question}], max_tokens=16,
                                       temperature=0, extra_body={"conversation": conversation_id})
    http = httpx.Client(base_url=live_api.server.url, headers={"Authorization": f"Bearer {live_api.keys['alice']}"})
    messages = http.get(f"/v1/conversations/{conversation_id}/messages/").json()["results"]
    assert [m["role"] for m in messages] == ["user", "assistant"] * 3
    assert messages[0]["content"] == "Hello Captain! Is a storm coming?"
    assert messages[4]["content"] == "What is for dinner?"
    assert messages[1]["scenarios"][0]["title"] == "A storm is coming"
    assert all(m["completion_tokens"] for m in messages)
    assert messages[5]["prompt_tokens"] > messages[1]["prompt_tokens"]  # the history grew into the prompt
    conversation = http.get(f"/v1/conversations/{conversation_id}/").json()
    assert conversation["character"] == "captain-mira" and conversation["message_count"] == 6


def test_shorthand_request_of_the_original_design(live_api):
    response = httpx.post(live_api.base_url + "/chat/completions?character_id=byte",
                          headers={"Authorization": f"Bearer {live_api.keys['alice']}"},
                          json={"prompt": "Hello! What are your opening hours?", "max_tokens": 20}, timeout=120)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["text"] and body["text"] == body["choices"][0]["message"]["content"]
    assert any(s["title"] == "Library opening hours" for s in body["scenarios"])


def test_two_keys_cannot_read_each_others_conversations(live_api):
    reply = live_api.client("alice").chat.completions.create(model=MODEL, 
        messages=[{"role": "user", "content": "Ciao!"}], max_tokens=8, extra_body={"character": "chef-luca"})
    conversation_id = reply.model_extra["conversation"]
    bob = httpx.Client(base_url=live_api.server.url, headers={"Authorization": f"Bearer {live_api.keys['bob']}"})
    assert bob.get(f"/v1/conversations/{conversation_id}/messages/").status_code == 404
    assert conversation_id not in {c["id"] for c in bob.get("/v1/conversations/").json()["results"]}
    with pytest.raises(openai.NotFoundError):
        live_api.client("bob").chat.completions.create(model=MODEL, 
            messages=[{"role": "user", "content": "Hi"}], max_tokens=4, extra_body={"conversation": conversation_id})


def test_revoked_key_fails(live_api):
    client = live_api.client("carol-revoked")
    assert client.models.list().data
    live_api.server.manage("from chat.models import ApiKey\nfrom chat.api.keys import api_keys_revoke\n"
                           "api_keys_revoke(queryset=ApiKey.objects.filter(name='carol-revoked'))")
    with pytest.raises(openai.AuthenticationError) as error:
        client.models.list()
    assert "revoked" in error.value.message


def test_models_list_and_retrieve(live_api):
    models = live_api.client().models.list().data
    assert [m.id for m in models] == ["smollm2-135m-instruct"]
    model = live_api.client().models.retrieve(MODEL)
    assert (model.id, model.object, model.owned_by) == (MODEL, "model", "llmsite")
    with pytest.raises(openai.NotFoundError) as error:
        live_api.client().models.retrieve("gpt-17")
    assert error.value.code == "model_not_found"


@pytest.mark.parametrize("stream", [False, True])
def test_a_large_max_tokens_is_an_ordinary_completion(live_api, stream):
    """max_tokens=1500 is answered like any request (not turned into a background job)."""
    client = live_api.client("alice-stream")
    ask = {"model": MODEL, "messages": [{"role": "user", "content": "Say hello in one short sentence."}],
           "max_tokens": 1500, "temperature": 0.3, "seed": 11, "extra_headers": FRESH}
    if stream:
        chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
        usage = chunks[-1].usage
        assert all(c.object == "chat.completion.chunk" for c in chunks)
    else:
        reply = client.chat.completions.create(**ask)
        assert reply.object == "chat.completion"
        text, finish, usage = reply.choices[0].message.content, [reply.choices[0].finish_reason], reply.usage
    assert text.strip() and finish in (["stop"], ["length"])
    assert 0 < usage.completion_tokens <= 1500


def test_errors_map_to_the_clients_exceptions(live_api):
    client = live_api.client()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, temperature=5)
    assert error.value.body["param"] == "temperature" and "temperature" in error.value.body["message"]
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, n=9)
    assert error.value.body["param"] == "n"
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 2500}], max_tokens=10)
    assert error.value.code == "context_length_exceeded"
    assert "2048" in error.value.message
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=live_api.base_url, api_key="llms-wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(messages=QUESTION, model="gpt-17")
    assert error.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError) as error:
        client.chat.completions.create(model=MODEL, messages=QUESTION, extra_body={"character": "nobody"})
    assert error.value.code == "character_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=MODEL, messages=QUESTION,
                                       extra_body={"conversation": "00000000-0000-0000-0000-000000000000"})
    with pytest.raises(openai.APIStatusError) as error:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x" * 300_000}])
    assert error.value.status_code == 413 and error.value.code == "request_too_large"


def test_rate_limit_gives_429(live_api):
    # Fire the burst early in a minute so it cannot straddle two fixed windows.
    if time.time() % 60 > 45:
        time.sleep(61 - time.time() % 60)
    client = live_api.client("dave-limited")
    with pytest.raises(openai.RateLimitError) as error:
        for _ in range(RATE_LIMIT_PER_MINUTE + 5):
            client.models.list()
    assert error.value.code == "rate_limit_exceeded"
    assert error.value.response.headers.get("Retry-After")


def test_model_unavailable_is_503_naming_the_model(tmp_path_factory):
    from tests.live import LiveServer, prepare_database

    server = LiveServer(workdir=tmp_path_factory.mktemp("no-model"),
                        env={"LLMSITE_MODEL_PATH": "/nonexistent/missing-model.gguf"})
    keys = prepare_database(server, {"erin": ["erin"]})
    server.start()
    try:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key=keys["erin"], max_retries=0)
        with pytest.raises(openai.InternalServerError) as error:
            client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=4)
        assert error.value.status_code == 503 and error.value.code == "model_unavailable"
        assert "missing-model.gguf" in error.value.message
    finally:
        server.stop()


def test_json_mode_constrains_the_reply_with_a_grammar(live_api):
    import json

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
              "additionalProperties": False}
    reply = live_api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Which city is the capital of France? Answer in JSON."}],
        max_tokens=40, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}})
    assert set(json.loads(reply.choices[0].message.content)) == {"city"}
    reply = live_api.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Give me a JSON object with a key 'ok' set to true."}],
        max_tokens=60, temperature=0, response_format={"type": "json_object"})
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(reply.choices[0].message.content), dict)
    else:  # cut by max_tokens: still the start of a JSON object
        assert reply.choices[0].message.content.lstrip().startswith("{")


def test_streamed_plain_text_completion(live_api):
    ask = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8, "temperature": 0}
    chunks = list(live_api.client().completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert all(c.object == "text_completion" for c in chunks) and len({c.id for c in chunks}) == 1
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["stop"], ["length"])
    assert chunks[-1].choices == [] and 0 < chunks[-1].usage.completion_tokens <= 8
    # The same greedy request, not streamed, gives the same text (/v1/completions has no response cache).
    assert live_api.client().completions.create(**ask).choices[0].text == text


def test_plain_text_completion(live_api):
    reply = live_api.client().completions.create(model=MODEL, prompt="The capital of France is", max_tokens=8,
                                                 temperature=0)
    assert reply.object == "text_completion" and "Paris" in reply.choices[0].text
    assert reply.usage.completion_tokens > 0
