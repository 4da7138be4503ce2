"""Conversations as trees over the HTTP API (chat/api/conversation_ops.py, chat/trees/): regenerate (with n),
list and select alternatives, edit, continue, delete, stop; owner-only; concurrent operations; the path the
model sees; the migration of existing conversations. A tiny random-weight model: the texts do not matter."""

import dataclasses
import threading
import time
from types import SimpleNamespace

import pytest
from asgiref.sync import async_to_sync
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from chat.engine.faults import Faults
from chat.engine.backends.llama_cpp import PROMPT_CHUNK
from chat.engines import get_engine, reset_registry
from chat.models import Conversation, Message
from chat.trees.operations import reply_regenerate
from chat.trees.running import ReplyRun, reply_run_of
from tests.factories import make_api_client, make_character, write_tiny_gguf

pytestmark = pytest.mark.django_db(transaction=True)
NO_CACHE = {"HTTP_CACHE_CONTROL": "no-cache"}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tree")
    return write_tiny_gguf(folder / "tiny.gguf"), write_tiny_gguf(folder / "endless.gguf", never_ends=True)


@pytest.fixture
def tiny_site(settings, tiny_models):
    models = tuple(dataclasses.replace(m, path=str(tiny_models[0]), context_length=1024)
                   for m in settings.LLMSITE.models)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)
    settings.API_RATE_LIMIT = ""


@pytest.fixture
def endless_site(settings, tiny_models):
    """A model that never ends a reply by itself: replies run until max_tokens (or a stop)."""
    models = tuple(dataclasses.replace(m, path=str(tiny_models[1]), context_length=4096)
                   for m in settings.LLMSITE.models)
    settings.LLMSITE = dataclasses.replace(settings.LLMSITE, models=models)
    settings.API_RATE_LIMIT = ""


@pytest.fixture
def chat(tiny_site):
    """alice's conversation of two exchanges (greeting-less), stored through the API."""
    client = make_api_client("alice")
    make_character("mira")
    first = client.post("/v1/chat/completions", {"character": "mira", "max_tokens": 5, "temperature": 0.9,
                                                 "messages": [{"role": "user", "content": "Hello there"}]},
                        format="json", **NO_CACHE).json()
    conversation = Conversation.objects.get(pk=first["conversation"])
    client.post("/v1/chat/completions", {"conversation": str(conversation.pk), "max_tokens": 5, "temperature": 0.9,
                                         "messages": [{"role": "user", "content": "How are you?"}]},
                format="json", **NO_CACHE)
    return client, conversation


def url(conversation, tail: str) -> str:
    return f"/v1/conversations/{conversation.pk}/{tail}"


def slow_conversation(client, monkeypatch):
    """(conversation, its reply) of one exchange with mira; then every engine step is slowed down, so that a
    reply started next is still running when a test's second request arrives, however fast the machine."""
    make_character("mira")
    first = client.post("/v1/chat/completions", {"character": "mira", "max_tokens": 3,
                                                 "messages": [{"role": "user", "content": "Hi"}]},
                        format="json", **NO_CACHE).json()
    conversation = Conversation.objects.get(pk=first["conversation"])
    leaf = conversation.messages.order_by("id").last()
    monkeypatch.setattr(get_engine(), "faults", Faults(step=lambda step: time.sleep(0.05)))
    return conversation, leaf


def path_of(client, conversation) -> list[dict]:
    response = client.get(url(conversation, "path/"))
    assert response.status_code == 200
    return response.json()["messages"]


def sse_events(response) -> list:
    import json

    async def read(stream):
        return [chunk async for chunk in stream]

    text = b"".join(async_to_sync(read)(response.streaming_content)).decode()
    data = [line[6:] for line in text.split("\n") if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(item) for item in data[:-1]]


def test_exchanges_form_a_single_path_ending_at_the_active_leaf(chat):
    client, conversation = chat
    conversation.refresh_from_db()
    messages = list(conversation.messages.order_by("id"))
    assert [m.role for m in messages] == ["user", "assistant", "user", "assistant"]
    assert [m.parent_id for m in messages] == [None, *[m.pk for m in messages[:-1]]]
    assert conversation.active_id == messages[-1].pk
    path = path_of(client, conversation)
    assert [m["id"] for m in path] == [m.pk for m in messages]
    assert all(m["alternatives"] == {"index": 0, "count": 1, "ids": [m["id"]]} for m in path)


def test_regenerate_adds_an_alternative_that_can_be_listed_and_selected(chat):
    client, conversation = chat
    old = conversation.messages.order_by("id").last()
    response = client.post(url(conversation, f"messages/{old.pk}/regenerate/"), {"max_tokens": 5, "seed": 3},
                           format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    new = body["messages"][0]
    assert body["kind"] == "regenerate" and new["parent"] == old.parent_id and new["id"] != old.pk
    conversation.refresh_from_db()
    assert conversation.active_id == new["id"]

    alternatives = client.get(url(conversation, f"messages/{old.pk}/alternatives/")).json()
    assert [m["id"] for m in alternatives["data"]] == [old.pk, new["id"]] and alternatives["index"] == 0
    assert path_of(client, conversation)[-1]["alternatives"] == {"index": 1, "count": 2, "ids": [old.pk, new["id"]]}

    selected = client.post(url(conversation, f"messages/{old.pk}/select/")).json()
    assert selected["active"] == old.pk and selected["messages"][-1]["id"] == old.pk
    # The next message continues the selected alternative's branch.
    client.post("/v1/chat/completions", {"conversation": str(conversation.pk), "max_tokens": 4,
                                         "messages": [{"role": "user", "content": "Go on"}]}, format="json",
                **NO_CACHE)
    path = path_of(client, conversation)
    assert [m["content"] for m in path][-2] == "Go on" and path[-3]["id"] == old.pk


def test_n_alternatives_come_from_one_prompt_evaluation(chat):
    client, conversation = chat
    old = conversation.messages.order_by("id").last()
    reset_registry()  # a fresh engine: the reply's prompt is cached nowhere, so it must be evaluated
    engine = get_engine()
    before = engine.stats()
    response = client.post(url(conversation, f"messages/{old.pk}/regenerate/"),
                           {"n": 3, "max_tokens": 6, "temperature": 1.0, "seed": 11}, format="json")
    after = engine.stats()
    body = response.json()
    assert len(body["messages"]) == 3 and {m["parent"] for m in body["messages"]} == {old.parent_id}
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == sum(m["completion_tokens"] for m in body["messages"])
    evaluated = after["prompt_tokens_evaluated"] - before["prompt_tokens_evaluated"]
    # Evaluated once: all of it (nothing was cached), and not again for the other two, which fork from the first.
    assert prompt_tokens <= evaluated < 2 * prompt_tokens, (evaluated, prompt_tokens)
    assert after["forked_sequences"] - before["forked_sequences"] == 2
    assert len(Message.objects.filter(parent_id=old.parent_id)) == 4


def test_a_regenerate_of_a_long_conversation_evaluates_at_most_its_last_two_chunks(tiny_site):
    client = make_api_client("long-regenerator")
    make_character("mira")
    story = " ".join(f"The {word} drifted past the harbour wall." for word in ("gull", "boat", "rope", "fog") * 4)
    first = client.post("/v1/chat/completions", {"character": "mira", "max_tokens": 4,
                                                 "messages": [{"role": "user", "content": story}]},
                        format="json", **NO_CACHE).json()
    assert "conversation" in first, first
    conversation = Conversation.objects.get(pk=first["conversation"])
    reply = conversation.messages.order_by("id").last()
    engine = get_engine()
    before = engine.stats()["prompt_tokens_evaluated"]
    body = client.post(url(conversation, f"messages/{reply.pk}/regenerate/"), {"max_tokens": 3},
                       format="json").json()
    evaluated = engine.stats()["prompt_tokens_evaluated"] - before
    assert body["usage"]["prompt_tokens"] >= 4 * PROMPT_CHUNK  # long enough for the bound to mean something
    # Only the last chunk (1-64 tokens) is evaluated again: every whole chunk before it is reused.
    assert evaluated <= PROMPT_CHUNK, (evaluated, body["usage"])


def test_edit_makes_a_new_branch_answered_at_once_and_the_old_branch_stays(chat):
    client, conversation = chat
    second_user = conversation.messages.filter(role="user").order_by("id").last()
    old_leaf = conversation.messages.order_by("id").last()
    response = client.post(url(conversation, f"messages/{second_user.pk}/edit/"),
                           {"content": "How old are you?", "max_tokens": 4}, format="json")
    assert response.status_code == 200, response.content
    reply = response.json()["messages"][0]
    edited = Message.objects.get(pk=reply["parent"])
    assert edited.content == "How old are you?" and edited.parent_id == second_user.parent_id
    path = path_of(client, conversation)
    assert [m["content"] for m in path][-2] == "How old are you?"
    assert path[-2]["alternatives"]["count"] == 2
    # Switching back to the old branch shows it as it was, down to its leaf.
    back = client.post(url(conversation, f"messages/{second_user.pk}/select/")).json()
    assert back["active"] == old_leaf.pk and Message.objects.filter(pk=old_leaf.pk).exists()


def test_continue_extends_the_reply_with_its_turn_left_open(chat):
    client, conversation = chat
    leaf = conversation.messages.order_by("id").last()
    before = leaf.content
    response = client.post(url(conversation, f"messages/{leaf.pk}/continue/"), {"max_tokens": 5, "seed": 2},
                           format="json")
    assert response.status_code == 200, response.content
    body = response.json()
    leaf.refresh_from_db()
    assert body["messages"][0]["id"] == leaf.pk and leaf.content == before + body["text"]
    assert leaf.completion_tokens >= 5 and Message.objects.filter(conversation=conversation).count() == 4
    # Only the last reply of a branch can be continued.
    first_reply = conversation.messages.filter(role="assistant").order_by("id").first()
    refused = client.post(url(conversation, f"messages/{first_reply.pk}/continue/"), {}, format="json")
    assert refused.status_code == 400 and refused.json()["error"]["code"] == "not_continuable"


def test_the_continued_prompt_ends_inside_the_reply(tiny_site):
    engine = get_engine()
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Once upon a"}]
    prompt = engine.render_chat(messages, continue_final=True)
    assert prompt.endswith("Once upon a")
    closed = engine.render_chat(messages, add_generation_prompt=False)
    assert closed.startswith(prompt) and closed[len(prompt):].startswith("<|im_end|>")


def test_delete_removes_the_subtree_and_the_conversation_shows_the_branch_beside_it(chat):
    client, conversation = chat
    leaf = conversation.messages.order_by("id").last()
    client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"), {"max_tokens": 3}, format="json")
    second_user = leaf.parent
    response = client.delete(url(conversation, f"messages/{second_user.pk}/"))
    assert response.status_code == 200
    assert not Message.objects.filter(parent_id=second_user.pk).exists()
    assert not Message.objects.filter(pk=second_user.pk).exists()
    body = response.json()
    assert body["active"] == second_user.parent_id and len(body["messages"]) == 2


def long_chain_conversation(messages: int = 1200):
    """(client, conversation): a conversation of one chain of `messages` messages ("0", "1"...), as a long
    conversation is: deleting it, or an early message, must not follow the chain message by message."""
    client = make_api_client("longtalker")
    conversation = Conversation.objects.create(character=make_character("mira"), owner=client.user)
    parent = None
    for index in range(messages):
        parent = Message.objects.create(conversation=conversation, parent=parent, content=str(index),
                                        role="user" if index % 2 == 0 else "assistant")
    Conversation.objects.filter(pk=conversation.pk).update(active=parent)
    return client, conversation


def test_deleting_an_early_message_of_a_long_conversation_deletes_its_whole_chain(transactional_db):
    client, conversation = long_chain_conversation()
    second = conversation.messages.order_by("id")[1]
    response = client.delete(url(conversation, f"messages/{second.pk}/"))
    assert response.status_code == 200, response.content[:300]
    assert list(conversation.messages.values_list("content", flat=True)) == ["0"]
    conversation.refresh_from_db()
    assert conversation.active_id == response.json()["active"] == conversation.messages.get().pk


def test_a_tree_at_its_caps_refuses_to_grow_with_409(chat, settings):
    client, conversation = chat
    leaf = conversation.messages.order_by("id").last()
    settings.CONVERSATION_MAX_ALTERNATIVES = 2
    refused = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"), {"n": 2, "max_tokens": 3},
                          format="json")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "too_many_alternatives"
    assert client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"), {"max_tokens": 3},
                       format="json").status_code == 200  # the second alternative still fits
    settings.CONVERSATION_MAX_MESSAGES = conversation.messages.count() + 1  # no room for a message and its reply
    more = {"conversation": str(conversation.pk), "max_tokens": 3, "messages": [{"role": "user", "content": "More"}]}
    full = client.post("/v1/chat/completions", more, format="json", **NO_CACHE)
    assert full.status_code == 409 and full.json()["error"]["code"] == "conversation_full"
    count = conversation.messages.count()
    # A continuation adds no message; nothing was stored by the refused requests.
    conversation.refresh_from_db()
    assert client.post(url(conversation, f"messages/{conversation.active_id}/continue/"), {"max_tokens": 2},
                       format="json").status_code == 200
    assert conversation.messages.count() == count


def test_stop_keeps_what_was_generated_marked_stopped(endless_site, monkeypatch):
    client = make_api_client("stopper")
    conversation, leaf = slow_conversation(client, monkeypatch)
    streamed = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"),
                           {"max_tokens": 2000, "stream": True}, format="json")
    assert streamed.status_code == 200
    run = reply_run_of(conversation.pk)
    deadline = time.monotonic() + 60
    while not run.texts[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    stopped = client.post(url(conversation, "stop/"))
    assert stopped.status_code == 200, stopped.content
    body = stopped.json()
    assert body["stopped"] is True and body["messages"][0]["stopped"] is True
    message = Message.objects.get(pk=body["messages"][0]["id"])
    assert message.content and message.finish_reason == "cancelled" and message.completion_tokens < 2000
    assert client.post(url(conversation, "stop/")).json()["error"]["code"] == "reply_not_running"


def test_a_reply_no_client_ever_watched_is_stopped_after_the_detached_timeout(endless_site, monkeypatch, settings):
    client = make_api_client("never-watcher")
    conversation, leaf = slow_conversation(client, monkeypatch)
    settings.REPLY_DETACHED_SECONDS = 0.5
    # No listener ever attaches: a socket that closed before its watch task ran.
    run = reply_regenerate(user=client.user, api_key=None, conversation_id=conversation.pk, message_id=leaf.pk,
                           data={"max_tokens": 2000})
    assert run.finished.wait(30) and run.record.stopped
    assert run.record.stored and run.record.stored[0].stopped


def test_an_owner_leaves_at_most_the_cap_of_replies_alone_the_oldest_is_stopped(endless_site, monkeypatch,
                                                                                settings):
    settings.REPLY_DETACHED_MAX_PER_OWNER = 1
    client = make_api_client("hoarder")
    older, older_leaf = slow_conversation(client, monkeypatch)
    newer = Conversation.objects.get(pk=client.post("/v1/chat/completions", {
        "character": "mira", "max_tokens": 2, "messages": [{"role": "user", "content": "Hi"}]},
        format="json", **NO_CACHE).json()["conversation"])
    left = [client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"), {"max_tokens": 2000, "stream": True},
                        format="json")
            for conversation, leaf in [(older, older_leaf), (newer, newer.messages.order_by("id").last())]]
    older_run, newer_run = reply_run_of(older.pk), reply_run_of(newer.pk)
    assert older_run.finished.wait(30) and older_run.record.stopped  # the oldest left alone past the cap
    assert not newer_run.finished.is_set()
    assert client.post(url(newer, "stop/")).status_code == 200
    for response in left:
        response.close()


def test_another_key_gets_404_for_every_operation(chat):
    client, conversation = chat
    other = make_api_client("mallory")
    leaf = conversation.messages.order_by("id").last()
    for method, tail, data in [
        ("get", "path/", None), ("get", f"messages/{leaf.pk}/alternatives/", None),
        ("post", f"messages/{leaf.pk}/select/", None), ("delete", f"messages/{leaf.pk}/", None),
        ("post", f"messages/{leaf.pk}/regenerate/", {}), ("post", f"messages/{leaf.pk}/continue/", {}),
        ("post", f"messages/{leaf.parent_id}/edit/", {"content": "mine now"}), ("post", "stop/", None),
        ("get", "reply/", None),
    ]:
        response = getattr(other, method)(url(conversation, tail), data, format="json")
        assert response.status_code == 404, (tail, response.content)
        assert response.json()["error"]["code"] == "conversation_not_found"
    assert conversation.messages.count() == 4
    # A message of another conversation is a 404 too.
    assert client.post(url(conversation, "messages/999999/select/")).json()["error"]["code"] == "message_not_found"


def test_a_message_of_another_users_conversation_is_a_404_for_every_operation(chat):
    client, conversation = chat
    other = make_api_client("mallory-too")
    own = Conversation.objects.get(pk=other.post("/v1/chat/completions", {
        "character": "mira", "max_tokens": 3, "messages": [{"role": "user", "content": "Mine"}]},
        format="json", **NO_CACHE).json()["conversation"])
    leaf = conversation.messages.order_by("id").last()  # alice's: real ids, under mallory's own conversation
    for method, tail, data in [
        ("get", f"messages/{leaf.pk}/alternatives/", None), ("post", f"messages/{leaf.pk}/select/", None),
        ("delete", f"messages/{leaf.pk}/", None), ("post", f"messages/{leaf.pk}/regenerate/", {}),
        ("post", f"messages/{leaf.pk}/continue/", {}),
        ("post", f"messages/{leaf.parent_id}/edit/", {"content": "mine now"}),
    ]:
        response = getattr(other, method)(url(own, tail), data, format="json")
        assert response.status_code == 404, (tail, response.content)
        assert response.json()["error"]["code"] == "message_not_found"
    assert conversation.messages.count() == 4 and own.messages.count() == 2


def read_then_leave(response, count: int) -> list:
    """Read `count` chunks of a streamed response, then go away as a client that disconnects does (the task
    that streams it is cancelled)."""
    import asyncio
    import contextlib

    async def read():
        chunks = []

        async def consume():
            async for chunk in response.streaming_content:
                chunks.append(chunk)

        task = asyncio.ensure_future(consume())
        while len(chunks) < count and not task.done():
            await asyncio.sleep(0.01)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        return chunks

    return async_to_sync(read)()


def test_a_stream_left_mid_reply_is_still_stored_and_get_reply_resumes_it(endless_site, monkeypatch):
    client = make_api_client("http-walker")
    conversation, leaf = slow_conversation(client, monkeypatch)
    streamed = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"), {"max_tokens": 120, "stream": True},
                           format="json")
    assert len(read_then_leave(streamed, 3)) == 3  # start and two tokens, then the client is gone
    run = reply_run_of(conversation.pk)
    assert run is not None and not run.finished.is_set()
    events = sse_events(client.get(url(conversation, "reply/")))
    assert events[0]["type"] == "start" and events[0]["resumed"] is True and events[-1]["type"] == "end"
    reply = Message.objects.get(pk=events[-1]["messages"][0]["id"])
    assert reply.parent_id == leaf.parent_id and not reply.stopped and reply.completion_tokens == 120
    assert reply.content == events[0]["text"][0] + "".join(e["text"] for e in events if e["type"] == "token")


class _CountedPiece(str):
    """A delta that counts the characters copied whenever a string is extended by it (`text + piece`)."""

    copied = 0

    def __radd__(self, other):
        _CountedPiece.copied += len(other) + len(self)
        return str.__add__(other, self)


def test_a_running_reply_keeps_its_text_so_far_without_copying_it_at_every_token(monkeypatch):
    class Generation(list):
        def cancel(self):
            pass

    plan = SimpleNamespace(user=None, conversation=None, store=False, new_conversation_id=None)
    record = SimpleNamespace(plan=plan, owner="", timing=None)
    run = ReplyRun(record, [Generation([_CountedPiece("abcd")] * 4000)])
    monkeypatch.setattr(_CountedPiece, "copied", 0)
    run._read(0)
    assert run.texts == ["abcd" * 4000]
    # Extending one string per token copied 32 million characters here (all the text so far, 4,000 times).
    assert _CountedPiece.copied <= 2 * len(run.texts[0])


def test_a_stream_that_asked_to_be_cancelled_on_disconnect_stores_nothing(endless_site, monkeypatch):
    client = make_api_client("http-canceller")
    conversation, leaf = slow_conversation(client, monkeypatch)
    streamed = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"),
                           {"max_tokens": 2000, "stream": True, "on_disconnect": "cancel"}, format="json")
    run = reply_run_of(conversation.pk)
    read_then_leave(streamed, 3)
    assert run.finished.wait(30) and not run.record.stored
    assert conversation.messages.count() == 2 and not Message.objects.filter(parent_id=leaf.parent_id).exclude(
        pk=leaf.pk).exists()


def test_two_concurrent_operations_one_gets_409_and_no_branch_is_lost(endless_site, monkeypatch):
    client = make_api_client("racer")
    conversation, leaf = slow_conversation(client, monkeypatch)
    running = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"),
                          {"max_tokens": 60, "stream": True}, format="json")
    assert running.status_code == 200
    for tail, data in [(f"messages/{leaf.pk}/regenerate/", {}), (f"messages/{leaf.parent_id}/edit/", {"content": "x"}),
                       (f"messages/{leaf.pk}/select/", None), (f"messages/{leaf.pk}/", None)]:
        method = client.delete if tail.endswith(f"{leaf.pk}/") else client.post
        busy = method(url(conversation, tail), data, format="json")
        assert busy.status_code == 409 and busy.json()["error"]["code"] == "conversation_busy", tail
    events = sse_events(running)
    assert events[0]["type"] == "start" and events[-1]["type"] == "end"
    # Both alternatives are there, and the first operation's is the active leaf.
    assert Message.objects.filter(parent_id=leaf.parent_id).count() == 2
    conversation.refresh_from_db()
    assert conversation.active_id == events[-1]["messages"][0]["id"]


def test_two_operations_started_at_the_same_moment(chat):
    client, conversation = chat
    leaf = conversation.messages.order_by("id").last()
    results = []

    def regenerate():
        results.append(client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"), {"max_tokens": 8},
                                   format="json").status_code)
        connection.close()

    threads = [threading.Thread(target=regenerate) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results) in ([200, 200], [200, 409])  # never a lost write: each 200 stored its reply
    assert Message.objects.filter(parent_id=leaf.parent_id).count() == 1 + results.count(200)


def test_a_streamed_regenerate_sends_start_tokens_and_end(chat):
    client, conversation = chat
    leaf = conversation.messages.order_by("id").last()
    events = sse_events(client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"),
                                    {"max_tokens": 6, "stream": True, "n": 2}, format="json"))
    assert events[0]["type"] == "start" and events[0]["choices"] == 2
    tokens = [e for e in events if e["type"] == "token"]
    end = events[-1]
    assert end["type"] == "end" and {t["index"] for t in tokens} <= {0, 1} and len(end["messages"]) == 2
    for index, message in enumerate(end["messages"]):  # the text so far (at start), then the tokens
        streamed = events[0]["text"][index] + "".join(t["text"] for t in tokens if t["index"] == index)
        assert streamed == message["content"]


def test_existing_conversations_migrate_as_a_single_path(transactional_db):
    executor = MigrationExecutor(connection)
    executor.migrate([("chat", "0004_apikey_quotas_usagerecord")])
    try:
        # Chat as of 0004, beside the content apps as they are now (migrating chat back leaves them so).
        content = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "chat"]
        old = executor.loader.project_state([("chat", "0004_apikey_quotas_usagerecord"), *content]).apps
        user = old.get_model("auth", "User").objects.create(username="before")
        character = old.get_model("characters", "Character").objects.create(name="Old", slug="old", description="x")
        conversation = old.get_model("chat", "Conversation").objects.create(character=character, owner=user)
        OldMessage = old.get_model("chat", "Message")
        ids = [OldMessage.objects.create(conversation=conversation, role=role, content=str(index)).pk
               for index, role in enumerate(["assistant", "user", "assistant", "user", "assistant"])]
        executor = MigrationExecutor(connection)
        executor.migrate([("chat", "0005_message_tree")])
        executor.loader.build_graph()
        # The models as of 0005 (later migrations add columns the current models would ask for).
        tree = executor.loader.project_state([("chat", "0005_message_tree"), *content]).apps
        migrated = tree.get_model("chat", "Conversation").objects.get(pk=conversation.pk)
        assert migrated.active_id == ids[-1]
        assert list(tree.get_model("chat", "Message").objects.filter(conversation=migrated).order_by("id")
                    .values_list("parent_id", flat=True)) == [None, *ids[:-1]]
    finally:  # the tests after this one need the whole schema
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


def test_chat_completions_with_n_return_n_choices_counting_the_prompt_once(chat):
    client, conversation = chat
    engine = get_engine()
    before = engine.stats()["prompt_tokens_evaluated"]
    body = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Name a colour " * 20}],
                                                "n": 3, "max_tokens": 5, "temperature": 1.0}, format="json").json()
    evaluated = engine.stats()["prompt_tokens_evaluated"] - before
    assert [choice["index"] for choice in body["choices"]] == [0, 1, 2]
    assert all(choice["message"]["role"] == "assistant" for choice in body["choices"])
    usage = body["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    assert usage["completion_tokens"] >= 3 and evaluated <= usage["prompt_tokens"] * 1.5, (evaluated, usage)

    # In a stored conversation the choices become alternatives of one another.
    leaf = conversation.messages.order_by("id").last()
    stored = client.post("/v1/chat/completions", {"conversation": str(conversation.pk), "n": 2, "max_tokens": 4,
                                                  "messages": [{"role": "user", "content": "Pick one"}]},
                         format="json").json()
    question = Message.objects.get(parent=leaf)
    replies = list(Message.objects.filter(parent=question).order_by("id"))
    assert [r.content for r in replies] == [choice["message"]["content"] for choice in stored["choices"]]
    conversation.refresh_from_db()
    assert conversation.active_id == replies[0].pk


def test_chat_completions_stream_n_choices_with_their_index(chat):
    client, _ = chat
    response = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": 2,
                                                    "max_tokens": 5, "stream": True,
                                                    "stream_options": {"include_usage": True}}, format="json")
    chunks = sse_events(response)
    indexes = {choice["index"] for chunk in chunks for choice in chunk["choices"]}
    assert indexes == {0, 1}
    finished = [choice for chunk in chunks for choice in chunk["choices"] if choice["finish_reason"]]
    assert sorted(choice["index"] for choice in finished) == [0, 1]
    assert chunks[-1]["usage"]["completion_tokens"] > 0


def test_n_is_one_to_eight(chat):
    client, _ = chat
    for n in (0, 9):
        response = client.post("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "n": n},
                               format="json")
        assert response.status_code == 400 and response.json()["error"]["param"] == "n"


def test_a_stop_reaches_a_reply_running_in_another_process(endless_site, monkeypatch):
    from chat.trees import running

    client = make_api_client("far-stopper")
    conversation, leaf = slow_conversation(client, monkeypatch)
    streamed = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"),
                           {"max_tokens": 2000, "stream": True}, format="json")
    run = reply_run_of(conversation.pk)
    deadline = time.monotonic() + 60
    while not run.texts[0] and time.monotonic() < deadline:
        time.sleep(0.01)
    monkeypatch.setattr(running, "_runs", {})  # this process no longer knows the run: as if another one ran it
    body = client.post(url(conversation, "stop/")).json()
    assert body["stopped"] is True and body["messages"][0]["stopped"] is True, body
    assert run.finished.is_set() and run.record.stopped
    conversation.refresh_from_db()
    assert conversation.active_id == body["messages"][0]["id"]
    streamed.close()


def test_a_non_streamed_operation_whose_client_left_is_left_alone_as_a_stream_is(endless_site, monkeypatch):
    """A non-streamed regenerate whose client goes away (through Django's ASGI handler, as a real disconnect): the
    view stops waiting, so the run's on_disconnect applies (here "cancel": nothing stored), as for a stream. The
    view's thread watched it before, and it ran to max_tokens counted against no cap of runs left alone."""
    import asyncio
    import json

    from asgiref.testing import ApplicationCommunicator
    from django.core.asgi import get_asgi_application

    client = make_api_client("http-leaver")
    conversation, leaf = slow_conversation(client, monkeypatch)
    body = json.dumps({"max_tokens": 2000, "on_disconnect": "cancel"}).encode()
    path = url(conversation, f"messages/{leaf.pk}/regenerate/")
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"testserver"), (b"content-type", b"application/json"),
                         (b"content-length", str(len(body)).encode()),
                         (b"authorization", f"Bearer {client.raw_key}".encode())],
             "client": ("127.0.0.1", 50000), "server": ("testserver", 80)}

    async def request_then_leave():
        application = ApplicationCommunicator(get_asgi_application(), scope)
        await application.send_input({"type": "http.request", "body": body})
        deadline = time.monotonic() + 30
        while reply_run_of(conversation.pk) is None:
            assert time.monotonic() < deadline, "the regenerate never started"
            await asyncio.sleep(0.01)
        run = reply_run_of(conversation.pk)
        await application.send_input({"type": "http.disconnect"})
        await application.wait(timeout=30)
        return run

    run = async_to_sync(request_then_leave)()
    assert run.finished.wait(30) and not run.record.stored
    assert not Message.objects.filter(parent_id=leaf.parent_id).exclude(pk=leaf.pk).exists()
