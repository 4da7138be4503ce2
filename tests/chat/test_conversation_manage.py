"""A whole conversation over the API: rename (PATCH), delete (DELETE), and the cap on the conversations a user
stores (USER_MAX_CONVERSATIONS). Owner-only; a delete waits for no reply (409 while one runs). A tiny
random-weight model: the texts do not matter."""

import pytest

from chat.models import Conversation, Invitation, Message
from tests.chat.test_conversation_tree import NO_CACHE, chat, endless_site, slow_conversation, tiny_models, tiny_site  # noqa: F401
from tests.chat.test_conversation_tree import long_chain_conversation, sse_events, url
from tests.factories import make_api_client, make_character

pytestmark = pytest.mark.django_db(transaction=True)


def detail(conversation) -> str:
    return f"/v1/conversations/{conversation.pk}/"


def new_chat(client, text: str = "Hello", **extra):
    return client.post("/v1/chat/completions", {"character": "mira", "max_tokens": 2, **extra,
                                                "messages": [{"role": "user", "content": text}]},
                       format="json", **NO_CACHE)


def test_the_owner_renames_a_conversation_without_moving_its_version(chat):
    client, conversation = chat
    version = Conversation.objects.get(pk=conversation.pk).updated_at
    renamed = client.patch(detail(conversation), {"title": "  The storm  "}, format="json")
    assert renamed.status_code == 200, renamed.content
    assert renamed.json()["title"] == "The storm" and renamed.json()["message_count"] == 4
    stored = Conversation.objects.get(pk=conversation.pk)
    # updated_at is the version a running reply is stored against: a rename is no exchange.
    assert stored.title == "The storm" and stored.updated_at == version
    assert client.get("/v1/conversations/").json()["results"][0]["title"] == "The storm"
    for bad in ({"title": "x" * 201}, {}, {"title": None}, {"title": ["a"]}):
        refused = client.patch(detail(conversation), bad, format="json")
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "title", bad
    assert client.patch(detail(conversation), {"title": "a\x00b"}, format="json").status_code == 400  # strict JSON
    assert Conversation.objects.get(pk=conversation.pk).title == "The storm"


def test_the_owner_deletes_a_whole_conversation(chat):
    client, conversation = chat
    Invitation.objects.create(conversation=conversation, username="guest", invitee=make_api_client("guest").user)
    kept = Conversation.objects.get(pk=new_chat(client).json()["conversation"])
    deleted = client.delete(detail(conversation))
    assert deleted.status_code == 204 and not deleted.content
    assert not Conversation.objects.filter(pk=conversation.pk).exists()
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()
    assert not Invitation.objects.filter(conversation_id=conversation.pk).exists()
    again = client.delete(detail(conversation))
    assert again.status_code == 404 and again.json()["error"]["code"] == "conversation_not_found"
    assert client.get(detail(conversation)).status_code == 404
    assert [c["id"] for c in client.get("/v1/conversations/").json()["results"]] == [str(kept.pk)]
    assert kept.messages.count() == 2  # another conversation of the owner is untouched


def test_another_user_can_neither_delete_nor_rename_a_conversation(chat):
    client, conversation = chat
    stranger = make_api_client("mallory")
    for response in (stranger.delete(detail(conversation)),
                     stranger.patch(detail(conversation), {"title": "mine"}, format="json")):
        assert response.status_code == 404 and response.json()["error"]["code"] == "conversation_not_found"
    stored = Conversation.objects.get(pk=conversation.pk)
    assert stored.messages.count() == 4 and stored.title != "mine"


def test_deleting_a_long_conversation_deletes_its_whole_chain(tiny_site):
    client, conversation = long_chain_conversation()
    response = client.delete(detail(conversation))
    assert response.status_code == 204, response.content[:300]
    assert not Message.objects.exists() and not Conversation.objects.exists()


def test_a_conversation_with_a_reply_on_its_way_is_not_deleted(endless_site, monkeypatch):
    client = make_api_client("racer")
    conversation, leaf = slow_conversation(client, monkeypatch)
    running = client.post(url(conversation, f"messages/{leaf.pk}/regenerate/"),
                          {"max_tokens": 40, "stream": True}, format="json")
    assert running.status_code == 200
    busy = client.delete(detail(conversation))
    assert busy.status_code == 409 and busy.json()["error"]["code"] == "conversation_busy"
    events = sse_events(running)
    assert events[-1]["type"] == "end"
    assert Message.objects.filter(pk=events[-1]["messages"][0]["id"], conversation=conversation).exists()
    assert client.delete(detail(conversation)).status_code == 204  # once the reply is stored
    assert not Message.objects.filter(conversation_id=conversation.pk).exists()


def test_a_user_stores_at_most_the_cap_of_conversations(tiny_site, settings):
    settings.USER_MAX_CONVERSATIONS = 2
    make_character("mira")
    client, other = make_api_client("keeper"), make_api_client("neighbour")
    first, second = (Conversation.objects.get(pk=new_chat(client, text).json()["conversation"])
                     for text in ("One", "Two"))
    refused = new_chat(client, "Three")
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "too_many_conversations"
    assert Conversation.objects.filter(owner=client.user).count() == 2
    assert not Message.objects.filter(content="Three").exists()
    # What stores no new conversation still works: an unstored chat, a stored conversation continued.
    unstored = new_chat(client, "Three", store=False)
    assert unstored.status_code == 200 and unstored.json()["conversation"] is None
    more = client.post("/v1/chat/completions", {"conversation": str(first.pk), "max_tokens": 2,
                                                "messages": [{"role": "user", "content": "More"}]},
                       format="json", **NO_CACHE)
    assert more.status_code == 200 and first.messages.count() == 4
    assert new_chat(other, "Mine").status_code == 200  # the cap is the user's own
    assert client.delete(detail(second)).status_code == 204
    assert new_chat(client, "Three").status_code == 200  # room again


def test_a_conversation_deleted_between_its_reads_is_a_404_not_a_500(chat, monkeypatch):
    from chat import selectors

    client, conversation = chat
    listed = selectors.conversations_of

    def deleted_first(*, user):  # a DELETE that lands between the ownership check and the listed read
        Conversation.objects.filter(pk=conversation.pk).delete()
        return listed(user=user)

    monkeypatch.setattr(selectors, "conversations_of", deleted_first)
    response = client.patch(detail(conversation), {"title": "late"}, format="json")
    assert response.status_code == 404 and response.json()["error"]["code"] == "conversation_not_found"


@pytest.mark.parametrize("operation", ["delete", "select", "delete_message", "message", "regenerate"])
def test_a_conversation_deleted_before_an_operation_takes_its_lease_is_a_404_not_a_500(chat, monkeypatch, operation):
    """Two deletes at once (two pages, a socket and a request), or a tree operation beside a delete: the second
    passed the ownership check, then waited for the lease while the first deleted the conversation."""
    from chat import plans
    from chat.tenancy import conversation_lock

    client, conversation = chat
    reply = conversation.messages.filter(role="assistant").order_by("id").last()
    take = conversation_lock.conversation_lease_take

    def deleted_first(*, conversation, holder=None):  # the other delete landed between the check and the lease
        Conversation.objects.filter(pk=conversation.pk).delete()
        return take(conversation=conversation, holder=holder)

    monkeypatch.setattr(conversation_lock, "conversation_lease_take", deleted_first)  # tree operations, delete
    monkeypatch.setattr(plans, "conversation_lease_take", deleted_first)  # a reply continuing it
    response = {"delete": lambda: client.delete(detail(conversation)),
                "select": lambda: client.post(url(conversation, f"messages/{reply.pk}/select/")),
                "delete_message": lambda: client.delete(url(conversation, f"messages/{reply.pk}/")),
                "message": lambda: client.post("/v1/chat/completions", {
                    "conversation": str(conversation.pk), "max_tokens": 2,
                    "messages": [{"role": "user", "content": "Still there?"}]}, format="json", **NO_CACHE),
                "regenerate": lambda: client.post(url(conversation, f"messages/{reply.pk}/regenerate/"),
                                                  {"max_tokens": 2}, format="json")}[operation]()
    assert response.status_code == 404, response.content
    assert response.json()["error"]["code"] == "conversation_not_found"


def test_a_stop_through_another_process_whose_conversation_is_deleted_meanwhile_is_no_500(chat, monkeypatch):
    """POST stop/ reaching a reply in another process: once that reply is stored (no longer announced) the owner's
    other page deletes the conversation before the stop reads its active leaf. The stop answers, nothing stored."""
    from chat.trees import operations

    client, conversation = chat
    announced = iter([f"run:{client.user.pk}"])
    monkeypatch.setattr(operations, "reply_run_of", lambda conversation_id: None)
    monkeypatch.setattr(operations, "reply_run_announced", lambda conversation_id: next(announced, None))

    def stop_request(conversation_id):  # the other process stops and stores it; then the delete lands
        Conversation.objects.filter(pk=conversation_id).delete()
        return True

    monkeypatch.setattr(operations, "reply_stop_request", stop_request)
    response = client.post(url(conversation, "stop/"))
    assert response.status_code == 200, response.content
    assert response.json()["messages"] == []
