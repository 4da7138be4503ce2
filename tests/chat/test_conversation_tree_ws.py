"""The tree operations over the WebSocket (chat/api/consumers.py), and replies that outlive their socket
(chat/trees/running.py). A tiny random-weight model: the texts do not matter."""

import asyncio
import time

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from chat.engine.faults import Faults
from chat.engines import get_engine
from chat.models import Conversation, Message
from chat.trees.running import reply_run_of
from llmsite.asgi import application
from tests.factories import make_api_client, make_character

pytestmark = pytest.mark.django_db(transaction=True)
ORIGIN = (b"origin", b"http://127.0.0.1:8000")


@pytest.fixture
def site(endless_site):
    """A model that never ends a reply by itself: every reply runs to max_tokens (or a stop)."""
    endless_site(context_length=4096)
    make_character("mira", greeting="Ahoy!")


async def socket_of(key: str) -> WebsocketCommunicator:
    comm = WebsocketCommunicator(application, "/ws/chat/mira/",
                                 headers=[ORIGIN, (b"authorization", f"Bearer {key}".encode())])
    assert (await comm.connect())[0]
    return comm


async def until(comm, *types, timeout=60) -> list[dict]:
    events = []
    while True:
        event = await comm.receive_json_from(timeout=timeout)
        events.append(event)
        if event["type"] in (*types, "error"):
            return events


async def user_key(name: str) -> str:
    return (await sync_to_async(make_api_client)(name)).raw_key


async def messages_of(conversation_id) -> list[Message]:
    return await sync_to_async(lambda: list(Message.objects.filter(conversation_id=conversation_id).order_by("id")))()


async def slow_engine_steps(monkeypatch):
    """Every engine step from now on takes 50 ms more: a reply started next is still running when the test
    acts on it (a stop, a closed socket), however fast the machine."""
    engine = await sync_to_async(get_engine)()
    monkeypatch.setattr(engine, "faults", Faults(step=lambda step: time.sleep(0.05)))


async def run_finished(conversation_id, timeout=60):
    """Wait for the conversation's reply run to end (stored or failed). Not by polling the database: the
    tests' SQLite locks a table against the run's writer while a reader holds it ("table is locked")."""
    run = reply_run_of(conversation_id)
    if run is not None:
        assert await sync_to_async(run.finished.wait, thread_sensitive=False)(timeout)


async def test_every_operation_over_the_websocket(site):
    comm = await socket_of(await user_key("ws-alice"))
    await comm.send_json_to({"type": "message", "content": "Hello", "max_tokens": 4})
    end = (await until(comm, "end"))[-1]
    assert end["type"] == "end" and end["kind"] == "reply"
    conversation, reply = end["conversation"], end["messages"][0]

    await comm.send_json_to({"type": "regenerate", "message": reply["id"], "max_tokens": 4, "n": 2})
    events = await until(comm, "end")
    assert events[0]["type"] == "start" and events[0]["choices"] == 2
    regenerated = events[-1]["messages"]
    assert len(regenerated) == 2 and {m["parent"] for m in regenerated} == {reply["parent"]}

    await comm.send_json_to({"type": "select", "message": reply["id"]})
    path = (await until(comm, "path"))[-1]
    assert path["active"] == reply["id"] and path["messages"][-1]["alternatives"]["count"] == 3

    await comm.send_json_to({"type": "edit", "message": reply["parent"], "content": "Hello again", "max_tokens": 4})
    edited = (await until(comm, "end"))[-1]["messages"][0]
    question = await sync_to_async(Message.objects.get)(pk=edited["parent"])
    assert question.content == "Hello again" and question.pk != reply["parent"]

    await comm.send_json_to({"type": "continue", "message": edited["id"], "max_tokens": 3})
    continued = (await until(comm, "end"))[-1]
    assert continued["messages"][0]["id"] == edited["id"]
    assert continued["messages"][0]["content"] == edited["content"] + continued["text"]

    await comm.send_json_to({"type": "delete", "message": question.pk})
    path = (await until(comm, "path"))[-1]
    assert path["messages"][-1]["id"] == reply["id"] or path["messages"][-1]["parent"] == reply["parent"]
    assert not await sync_to_async(Message.objects.filter(pk=edited["id"]).exists)()
    assert len(await messages_of(conversation)) == 5  # greeting, question, three alternatives
    await comm.disconnect()


async def test_stop_keeps_the_text_marked_stopped(site, monkeypatch):
    await slow_engine_steps(monkeypatch)
    comm = await socket_of(await user_key("ws-stopper"))
    await comm.send_json_to({"type": "message", "content": "Tell me everything", "max_tokens": 2000})
    assert (await comm.receive_json_from(timeout=60))["type"] == "start"
    assert (await until(comm, "token"))[-1]["type"] == "token"
    await comm.send_json_to({"type": "stop"})  # a new conversation's first reply: the socket's own run
    first = (await until(comm, "end"))[-1]
    assert first["stopped"] is True and first["conversation"]
    conversation = first["conversation"]
    await comm.send_json_to({"type": "message", "content": "Go on", "max_tokens": 2000})
    await until(comm, "token")
    await comm.send_json_to({"type": "stop"})
    end = (await until(comm, "end"))[-1]
    assert end["type"] == "end" and end["stopped"] is True and end["finish_reason"] == "cancelled"
    stored = (await messages_of(conversation))[-1]
    assert stored.stopped and stored.content == end["text"] and 0 < stored.completion_tokens < 2000
    await comm.disconnect()


async def test_a_reply_goes_on_after_its_socket_closed_and_a_new_socket_resumes_it(site, monkeypatch):
    key = await user_key("ws-walker")
    comm = await socket_of(key)
    await comm.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    conversation = (await until(comm, "end"))[-1]["conversation"]
    await slow_engine_steps(monkeypatch)  # still running when the new socket attaches, however fast the machine
    await comm.send_json_to({"type": "message", "content": "A long one please", "max_tokens": 200})
    await until(comm, "token")
    await comm.disconnect()  # the page is closed mid-reply

    again = await socket_of(key)
    await again.send_json_to({"type": "attach", "conversation": conversation})
    events = await until(again, "end", "idle", timeout=120)
    assert events[0]["type"] == "start" and events[0]["resumed"] is True and events[0]["text"][0]
    assert events[-1]["type"] == "end"
    await run_finished(conversation)
    stored = await messages_of(conversation)
    assert stored[-1].role == "assistant" and not stored[-1].stopped and stored[-1].completion_tokens == 200
    assert stored[-1].content == events[0]["text"][0] + "".join(e["text"] for e in events if e["type"] == "token")
    await again.disconnect()


async def test_a_reply_left_alone_too_long_is_stopped_and_kept(site, settings, monkeypatch):
    settings.REPLY_DETACHED_SECONDS = 0.2
    comm = await socket_of(await user_key("ws-leaver"))
    await comm.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    conversation = (await until(comm, "end"))[-1]["conversation"]
    await slow_engine_steps(monkeypatch)
    await comm.send_json_to({"type": "message", "content": "Go on and on", "max_tokens": 2000})
    await until(comm, "token")
    await comm.disconnect()
    await run_finished(conversation)
    stored = (await messages_of(conversation))[-1]
    assert stored.stopped and stored.content and stored.completion_tokens < 2000


async def test_another_user_cannot_touch_the_conversation(site):
    comm = await socket_of(await user_key("ws-owner"))
    await comm.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    end = (await until(comm, "end"))[-1]
    other = await socket_of(await user_key("ws-mallory"))
    reply = end["messages"][0]["id"]
    for message in ({"type": "regenerate", "message": reply}, {"type": "select", "message": reply},
                    {"type": "delete", "message": reply}, {"type": "continue", "message": reply},
                    {"type": "edit", "message": end["messages"][0]["parent"], "content": "mine now"},
                    {"type": "stop"}, {"type": "attach"}, {"type": "delete_conversation"}):
        await other.send_json_to({**message, "conversation": end["conversation"]})
        event = await other.receive_json_from(timeout=30)
        assert event["type"] == "error" and event["status"] == 404, (message, event)
    assert len(await messages_of(end["conversation"])) == 3
    await comm.disconnect()
    await other.disconnect()


async def test_two_sockets_regenerating_at_once_one_gets_409_and_nothing_is_lost(site):
    key = await user_key("ws-twins")
    first, second = await socket_of(key), await socket_of(key)
    await first.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    end = (await until(first, "end"))[-1]
    reply = end["messages"][0]
    target = {"type": "regenerate", "message": reply["id"], "conversation": end["conversation"], "max_tokens": 300}
    await first.send_json_to(target)
    await until(first, "start")
    await second.send_json_to(target)
    busy = await second.receive_json_from(timeout=30)
    assert busy["type"] == "error" and busy["status"] == 409 and busy["error"]["code"] == "conversation_busy"
    done = (await until(first, "end"))[-1]
    siblings = await sync_to_async(lambda: list(Message.objects.filter(parent_id=reply["parent"])))()
    assert {m.pk for m in siblings} == {reply["id"], done["messages"][0]["id"]}
    await first.disconnect()
    await second.disconnect()


async def test_a_new_conversations_first_reply_can_be_resumed_and_stopped_from_another_socket(site, monkeypatch):
    await slow_engine_steps(monkeypatch)
    key = await user_key("ws-roamer")
    comm = await socket_of(key)
    await comm.send_json_to({"type": "message", "content": "Tell me a long one", "max_tokens": 2000})
    start = await comm.receive_json_from(timeout=60)
    assert start["type"] == "start" and start["conversation"]  # its id before the conversation is stored
    conversation = start["conversation"]
    await until(comm, "token")

    mallory = await socket_of(await user_key("ws-mallory2"))
    for message in ({"type": "attach", "conversation": conversation}, {"type": "stop", "conversation": conversation}):
        await mallory.send_json_to(message)
        refused = await mallory.receive_json_from(timeout=30)
        assert refused["type"] == "error" and refused["status"] == 404, (message, refused)

    other = await socket_of(key)  # the same user on another page
    await other.send_json_to({"type": "attach", "conversation": conversation})
    resumed = await other.receive_json_from(timeout=60)
    assert resumed["type"] == "start" and resumed["resumed"] is True and resumed["conversation"] == conversation
    await other.send_json_to({"type": "stop", "conversation": conversation})
    end = (await until(other, "end"))[-1]
    assert end["stopped"] is True and end["conversation"] == conversation
    assert (await until(comm, "end"))[-1]["stopped"] is True
    stored = (await messages_of(conversation))[-1]
    assert stored.stopped and stored.content == end["text"]
    for socket in (comm, other, mallory):
        await socket.disconnect()


async def test_select_and_delete_while_a_reply_runs_get_409(site, monkeypatch):
    key = await user_key("ws-fidget")
    comm, other = await socket_of(key), await socket_of(key)
    await comm.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    end = (await until(comm, "end"))[-1]
    reply, conversation = end["messages"][0], end["conversation"]
    await slow_engine_steps(monkeypatch)
    await comm.send_json_to({"type": "regenerate", "message": reply["id"], "max_tokens": 2000})
    await until(comm, "token")
    for operation in ("select", "delete", "delete_conversation"):
        await other.send_json_to({"type": operation, "message": reply["id"], "conversation": conversation})
        busy = await other.receive_json_from(timeout=30)
        assert busy["type"] == "error" and busy["status"] == 409, (operation, busy)
        assert busy["error"]["code"] == "conversation_busy"
    await comm.send_json_to({"type": "stop"})
    done = (await until(comm, "end"))[-1]
    assert done["stopped"] is True
    stored = {m.pk for m in await messages_of(conversation)}
    assert {reply["id"], done["messages"][0]["id"]} <= stored
    await comm.disconnect()
    await other.disconnect()


async def test_the_owner_deletes_the_sockets_conversation_and_the_next_message_starts_a_new_one(site):
    comm = await socket_of(await user_key("ws-tidy"))
    await comm.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    first = (await until(comm, "end"))[-1]["conversation"]
    await comm.send_json_to({"type": "delete_conversation"})  # the socket's own
    assert await comm.receive_json_from(timeout=30) == {"type": "conversation_deleted", "conversation": first}
    assert not await sync_to_async(Conversation.objects.filter(pk=first).exists)()
    assert await messages_of(first) == []
    await comm.send_json_to({"type": "message", "content": "Again", "max_tokens": 3})
    second = (await until(comm, "end"))[-1]["conversation"]
    assert second and second != first and len(await messages_of(second)) == 3  # greeting, message, reply
    await comm.disconnect()


async def test_deleting_the_sockets_conversation_does_not_abandon_the_reply_it_follows(site, monkeypatch):
    """The socket's conversation is deleted while the socket streams a new conversation's first reply (a message
    with "conversation": null): that reply is still streamed to its end, and the socket then follows it."""
    comm = await socket_of(await user_key("ws-tidier"))
    await comm.send_json_to({"type": "message", "content": "Hi", "max_tokens": 3})
    old = (await until(comm, "end"))[-1]["conversation"]
    await slow_engine_steps(monkeypatch)
    await comm.send_json_to({"type": "message", "content": "Anew", "conversation": None, "max_tokens": 40})
    start = (await until(comm, "start"))[-1]
    await comm.send_json_to({"type": "delete_conversation"})  # the socket's own: the old one
    events = await until(comm, "end")
    assert {"type": "conversation_deleted", "conversation": old} in events
    assert events[-1]["type"] == "end" and events[-1]["conversation"] == start["conversation"]
    await comm.send_json_to({"type": "message", "content": "More", "max_tokens": 3})
    assert (await until(comm, "end"))[-1]["conversation"] == start["conversation"]  # the new one, continued
    await comm.disconnect()


async def test_a_new_conversation_is_not_deleted_while_its_first_reply_runs(site, monkeypatch):
    """Its id is known before it is stored (the start event names it): a delete meanwhile is 409 like any
    conversation's with a reply on its way, not a 404 that the stored conversation then belies."""
    await slow_engine_steps(monkeypatch)
    key = await user_key("ws-hasty")
    comm, other = await socket_of(key), await socket_of(key)
    await comm.send_json_to({"type": "message", "content": "Tell me a long one", "max_tokens": 40})
    conversation = (await until(comm, "start"))[-1]["conversation"]
    mallory = await socket_of(await user_key("ws-mallory3"))
    await mallory.send_json_to({"type": "delete_conversation", "conversation": conversation})
    assert (await mallory.receive_json_from(timeout=30))["status"] == 404  # another user's: nothing to see
    await other.send_json_to({"type": "delete_conversation", "conversation": conversation})
    busy = await other.receive_json_from(timeout=30)
    assert busy["type"] == "error" and busy["status"] == 409 and busy["error"]["code"] == "conversation_busy"
    assert (await until(comm, "end"))[-1]["conversation"] == conversation
    await other.send_json_to({"type": "delete_conversation", "conversation": conversation})
    assert (await other.receive_json_from(timeout=30))["type"] == "conversation_deleted"  # once stored
    for socket in (comm, other, mallory):
        await socket.disconnect()


@pytest.mark.parametrize("elsewhere", [False, True], ids=["same-process", "removed-through-another-process"])
async def test_a_participant_taken_out_gets_no_more_of_the_reply_it_follows(site, monkeypatch, elsewhere):
    """A participant following the owner's running reply (attach) is taken out of the conversation: its socket gets
    a 404 error event at once and not one more token of that reply (the owner's socket streams it to its end).
    `elsewhere`: the DELETE lands on another instance, which does not run the reply (told through the cache)."""
    from chat.trees import running
    from characters.models import CharacterGroup, GroupMember
    from tests.chat.test_groups import join

    def crew():
        group = CharacterGroup.objects.create(name="Crew", slug="crew")
        GroupMember.objects.create(group=group, character=make_character("ada", name="Ada"), position=0)
        GroupMember.objects.create(group=group, character=make_character("bob", name="Bob"), position=1)
        return make_api_client("ws-sam"), make_api_client("ws-lee")

    sam, lee = await sync_to_async(crew)()
    owner = WebsocketCommunicator(application, "/ws/chat/crew/",
                                  headers=[ORIGIN, (b"authorization", f"Bearer {sam.raw_key}".encode())])
    assert (await owner.connect())[0]
    await owner.send_json_to({"type": "message", "content": "Ada?", "speaker": "ada", "max_tokens": 3})
    conversation = (await until(owner, "end"))[-1]["conversation"]
    await sync_to_async(join)(sam, lee, conversation)
    await slow_engine_steps(monkeypatch)
    await owner.send_json_to({"type": "message", "content": "Bob, a secret now.", "max_tokens": 200})
    await until(owner, "token")
    guest = WebsocketCommunicator(application, "/ws/chat/crew/",
                                  headers=[ORIGIN, (b"authorization", f"Bearer {lee.raw_key}".encode())])
    assert (await guest.connect())[0]
    await guest.send_json_to({"type": "attach", "conversation": conversation})
    await until(guest, "token")
    with monkeypatch.context() as patched:
        if elsewhere:
            patched.setattr(running, "reply_run_of", lambda conversation_id: None)
        removed = await sync_to_async(sam.delete)(f"/v1/conversations/{conversation}/participants/ws-lee/")
    assert removed.status_code == 200, removed.content
    events = await until(guest, "end")
    assert events[-1]["type"] == "error" and events[-1]["status"] == 404, events[-1]
    assert events[-1]["error"]["code"] == "conversation_not_found"
    run = reply_run_of(conversation)
    assert run is not None and not run.finished.is_set()  # cut off while the reply still runs
    assert await guest.receive_nothing(timeout=0.5)  # not one more token
    assert (await until(owner, "end"))[-1]["type"] == "end"  # the owner's socket streams it to its end
    assert await guest.receive_nothing(timeout=0.2)
    for socket in (owner, guest):
        await socket.disconnect()


async def test_two_participants_taken_out_at_once_through_other_processes_both_get_no_more(site, monkeypatch):
    """lee and kim follow the owner's reply; each is taken out through another instance at the same moment (the
    second removal lands between the first one's cache read and write). Both sockets get their 404: a removal
    kept in one shared record per conversation, read and written back, lost one of the two."""
    from chat.trees import running
    from characters.models import CharacterGroup, GroupMember
    from tests.chat.test_groups import join

    def crew():
        group = CharacterGroup.objects.create(name="Crew", slug="crew")
        GroupMember.objects.create(group=group, character=make_character("ada", name="Ada"), position=0)
        GroupMember.objects.create(group=group, character=make_character("bob", name="Bob"), position=1)
        return make_api_client("ws-sam"), make_api_client("ws-lee"), make_api_client("ws-kim")

    sam, lee, kim = await sync_to_async(crew)()
    owner = WebsocketCommunicator(application, "/ws/chat/crew/",
                                  headers=[ORIGIN, (b"authorization", f"Bearer {sam.raw_key}".encode())])
    assert (await owner.connect())[0]
    await owner.send_json_to({"type": "message", "content": "Ada?", "speaker": "ada", "max_tokens": 3})
    conversation = (await until(owner, "end"))[-1]["conversation"]
    for guest in (lee, kim):
        await sync_to_async(join)(sam, guest, conversation)
    await slow_engine_steps(monkeypatch)
    await owner.send_json_to({"type": "message", "content": "Bob, a secret now.", "max_tokens": 200})
    await until(owner, "token")
    sockets = []
    for guest in (lee, kim):
        socket = WebsocketCommunicator(application, "/ws/chat/crew/",
                                       headers=[ORIGIN, (b"authorization", f"Bearer {guest.raw_key}".encode())])
        assert (await socket.connect())[0]
        await socket.send_json_to({"type": "attach", "conversation": conversation})
        await until(socket, "token")
        sockets.append(socket)
    cache_call, nested = running._cache_call, []

    def interleaved(method, *args, **kwargs):
        value = cache_call(method, *args, **kwargs)
        if method == running.cache.get and str(args[0]).startswith("reply-removed") and not nested:
            nested.append(True)
            running.reply_viewer_removed(conversation, kim.user.pk)  # between this read and its write
        return value

    def take_both_out():
        running.reply_viewer_removed(conversation, lee.user.pk)
        if not nested:
            running.reply_viewer_removed(conversation, kim.user.pk)

    with monkeypatch.context() as patched:
        patched.setattr(running, "reply_run_of", lambda conversation_id: None)  # both land on another instance
        patched.setattr(running, "_cache_call", interleaved)
        await sync_to_async(take_both_out)()
    for socket in sockets:
        events = await until(socket, "end")
        assert events[-1]["type"] == "error" and events[-1]["status"] == 404, events[-1]
    run = reply_run_of(conversation)
    assert run is not None and not run.finished.is_set()  # cut off while the reply still runs
    assert (await until(owner, "end"))[-1]["type"] == "end"
    for socket in (owner, *sockets):
        await socket.disconnect()
