"""Chat's admin pages for staff who are not superusers, logged in as a member of the migration's "Content
editors" group plus the permissions a rule is about: who may issue keys acting as whom, and who sees chats."""

import pytest
from django.urls import reverse

from chat.api.keys import api_key_create
from chat.models import ApiKey, Conversation, Message
from tests.factories import make_character, make_superuser, make_user

pytestmark = pytest.mark.django_db

KEY_PERMISSIONS = ("add_apikey", "change_apikey", "view_apikey")


def key_add(client, user, name="k"):
    return client.post(reverse("admin:chat_apikey_add"), {"name": name, "user": user.pk})


@pytest.fixture
def chat():
    owner = make_user("owner")
    conversation = Conversation.objects.create(character=make_character("mira"), owner=owner, title="Secrets")
    Message.objects.create(conversation=conversation, role="user", content="my password is hunter2")
    Message.objects.create(conversation=conversation, role="assistant", content="noted")
    conversation.invitations.create(username="guest-lee")
    return conversation


def test_an_editor_with_key_permissions_issues_keys_only_with_users_of_their_own(editor_client, chat):
    """A key acting as chat's owner would read the owner's conversations through the API: without the
    conversation permission, a new key always gets a fresh user, whatever the form was sent with."""
    editor_client.grant(*KEY_PERMISSIONS)
    page = editor_client.get(reverse("admin:chat_apikey_add")).content.decode()
    assert 'name="name"' in page and 'name="user"' not in page
    for target in (chat.owner, make_superuser("root")):
        assert key_add(editor_client, target, name=f"for {target.username}").status_code == 302
    for key in ApiKey.objects.select_related("user"):
        assert key.user.username.startswith("key-") and key.prefix[len("llms-"):] not in key.user.username
        assert not (key.user.is_staff or key.user.is_superuser)
        assert not key.user.has_usable_password()
    assert ApiKey.objects.filter(user__in=[chat.owner]).count() == 0


def test_an_editor_who_may_read_conversations_chooses_whom_a_key_acts_as_but_never_staff(editor_client):
    editor_client.grant(*KEY_PERMISSIONS, "view_conversation")
    root, colleague, plain = make_superuser("root"), make_user("colleague", is_staff=True), make_user("plain")
    assert 'name="user"' in editor_client.get(reverse("admin:chat_apikey_add")).content.decode()
    for target in (root, colleague):
        response = key_add(editor_client, target)
        assert response.status_code == 200 and response.context["adminform"].form.errors["user"]
    assert not ApiKey.objects.exists()
    assert key_add(editor_client, plain).status_code == 302
    assert list(ApiKey.objects.values_list("user__username", flat=True)) == ["plain"]


def test_an_editor_with_key_permissions_cannot_see_or_change_keys_acting_as_staff(editor_client):
    editor_client.grant(*KEY_PERMISSIONS)
    root_key, _ = api_key_create(user=make_superuser("root"), name="root's")
    plain_key, _ = api_key_create(user=make_user("plain"), name="plain's")
    listed = editor_client.get(reverse("admin:chat_apikey_changelist")).content.decode()
    assert "plain&#x27;s" in listed and "root&#x27;s" not in listed
    assert editor_client.get(reverse("admin:chat_apikey_change", args=[root_key.pk])).status_code == 302
    # The key's user cannot be changed afterwards (another user gets a key of their own).
    change = reverse("admin:chat_apikey_change", args=[plain_key.pk])
    assert editor_client.post(change, {"name": "renamed", "user": make_superuser("root2").pk}).status_code == 302
    plain_key.refresh_from_db()
    assert plain_key.name == "renamed" and plain_key.user.username == "plain"


def test_a_superuser_issues_keys_acting_as_staff(client):
    client.force_login(make_superuser("root"))
    assert key_add(client, make_user("colleague", is_staff=True)).status_code == 302
    assert ApiKey.objects.get().user.username == "colleague"


def test_conversations_need_the_view_permission_explicitly(editor_client, chat):
    # change and delete would imply viewing for any other model: not for chats.
    editor_client.grant("change_conversation", "delete_conversation", "view_message", "change_message")
    for url in (reverse("admin:chat_conversation_changelist"), reverse("admin:chat_conversation_change", args=[chat.pk]),
                reverse("admin:chat_conversation_delete", args=[chat.pk]), reverse("admin:chat_message_changelist"),
                reverse("admin:chat_message_change", args=[chat.messages.first().pk])):
        response = editor_client.get(url)
        assert response.status_code in (302, 403), url
        assert "hunter2" not in response.content.decode() and "guest-lee" not in response.content.decode()


def test_editors_do_not_see_conversations(editor_client, chat):
    assert editor_client.get(reverse("admin:chat_conversation_changelist")).status_code == 403
    assert editor_client.get(reverse("admin:chat_message_changelist")).status_code == 403


@pytest.mark.parametrize("superuser", [False, True])
def test_messages_are_read_only_in_the_admin(client, editor_client, chat, superuser):
    if superuser:
        client.force_login(make_superuser("root"))
    else:
        editor_client.grant("view_conversation", "change_conversation", "add_message", "change_message")
    page = client.get(reverse("admin:chat_conversation_change", args=[chat.pk]))
    assert page.status_code == 200 and "hunter2" in page.content.decode()
    assert "guest-lee" in page.content.decode()  # the pending invitation, read-only
    assert 'name="invitations-0-username"' not in page.content.decode()
    assert 'name="messages-0-content"' not in page.content.decode()
    message = chat.messages.first()
    change = reverse("admin:chat_message_change", args=[message.pk])
    assert client.get(change).status_code == 200
    client.post(change, {"conversation": chat.pk, "role": "user", "content": "rewritten"})
    assert client.post(reverse("admin:chat_message_add"), {"conversation": chat.pk, "role": "user",
                                                            "content": "forged"}).status_code == 403
    # The conversation page's inline cannot rewrite the history either.
    client.post(reverse("admin:chat_conversation_change", args=[chat.pk]),
                {"title": "t", "user_name": "User", "messages-TOTAL_FORMS": "2", "messages-INITIAL_FORMS": "2",
                 "messages-0-id": message.pk, "messages-0-content": "rewritten too", "messages-0-role": "user"})
    assert list(chat.messages.values_list("content", flat=True)) == ["my password is hunter2", "noted"]


# --- deleting chats, and content that chats refer to -------------------------------------------------------------


def test_a_message_is_not_deleted_in_the_admin_which_would_skip_the_trees_delete(client, chat):
    """The tree's delete (chat/trees/operations.py) takes the message's subtree under the conversation's lease and
    moves the active leaf on; the admin's would leave the conversation without one."""
    client.force_login(make_superuser("root"))
    Conversation.objects.filter(pk=chat.pk).update(active=chat.messages.last())
    leaf = chat.messages.last()
    assert client.get(reverse("admin:chat_message_delete", args=[leaf.pk])).status_code == 403
    listing = client.get(reverse("admin:chat_message_changelist"))
    assert listing.status_code == 200 and "delete_selected" not in listing.content.decode()
    client.post(reverse("admin:chat_message_changelist"), {"action": "delete_selected", "post": "yes",
                                                           "_selected_action": [leaf.pk]})
    chat.refresh_from_db()
    assert chat.messages.count() == 2 and chat.active == leaf


def test_a_conversation_of_a_long_chain_of_replies_is_deleted_in_the_admin(client, chat):
    """Django's confirmation would list the chain one nested level per reply, past Python's recursion limit."""
    from chat.models import new_message_id

    ids = [new_message_id() for _ in range(1500)]
    Message.objects.bulk_create(Message(id=pk, conversation=chat, parent_id=parent, role="user", content=f"m{n}")
                                for n, (pk, parent) in enumerate(zip(ids, [None, *ids[:-1]])))
    Conversation.objects.filter(pk=chat.pk).update(active_id=ids[-1])
    client.force_login(make_superuser("root"))
    delete = reverse("admin:chat_conversation_delete", args=[chat.pk])
    page = client.get(delete)
    assert page.status_code == 200 and "1502 message(s)" in page.content.decode()
    assert page.context["perms_lacking"] == set() and not page.context["protected"]
    assert client.post(delete, {"post": "yes"}).status_code == 302
    assert not Conversation.objects.filter(pk=chat.pk).exists() and not Message.objects.exists()


def test_saving_a_conversation_in_the_admin_keeps_the_active_leaf_a_reply_stored_meanwhile(client, chat,
                                                                                          monkeypatch):
    from chat.admin import ConversationAdmin

    client.force_login(make_superuser("root"))
    reply = chat.messages.last()
    save_form = ConversationAdmin.save_form

    def reply_stored_meanwhile(self, request, form, change):  # after the page's row was read, before it is saved
        Conversation.objects.filter(pk=chat.pk).update(active=reply)
        return save_form(self, request, form, change)

    monkeypatch.setattr(ConversationAdmin, "save_form", reply_stored_meanwhile)
    response = client.post(reverse("admin:chat_conversation_change", args=[chat.pk]),
                           {"title": "Renamed", "user_name": "User", "invitations-TOTAL_FORMS": "0",
                            "invitations-INITIAL_FORMS": "0", "messages-TOTAL_FORMS": "0",
                            "messages-INITIAL_FORMS": "0"})
    assert response.status_code == 302, response.context and response.context["adminform"].form.errors
    chat.refresh_from_db()
    assert (chat.title, chat.active) == ("Renamed", reply)


def test_a_character_that_spoke_in_a_group_is_not_deleted_in_the_admin(client, chat):
    """Deleting it would have re-attributed its lines to the conversation's character."""
    bob = make_character("bob")
    chat.members.set([chat.character, bob])
    Message.objects.create(conversation=chat, role="assistant", content="Aye.", speaker=bob)
    client.force_login(make_superuser("root"))
    delete = reverse("admin:characters_character_delete", args=[bob.pk])
    page = client.get(delete)
    assert page.status_code == 200 and page.context["protected"], "Django's 'cannot delete' page"
    assert client.post(delete, {"post": "yes"}).status_code == 200
    assert Message.objects.get(content="Aye.").speaker == bob


# --- API keys ------------------------------------------------------------------------------------------------------


def test_staff_who_may_only_view_keys_cannot_revoke_them(editor_client):
    from tests.factories import make_api_client

    victim = make_api_client("victim")
    editor_client.grant("view_apikey")
    listing = editor_client.get(reverse("admin:chat_apikey_changelist"))
    assert listing.status_code == 200 and "Revoke selected keys" not in listing.content.decode()
    editor_client.post(reverse("admin:chat_apikey_changelist"), {"action": "revoke", "index": 0,
                                                                 "_selected_action": [victim.key.pk]})
    victim.key.refresh_from_db()
    assert victim.key.revoked_at is None and victim.get("/v1/models").status_code == 200
    editor_client.grant("change_apikey")
    editor_client.post(reverse("admin:chat_apikey_changelist"), {"action": "revoke", "index": 0,
                                                                 "_selected_action": [victim.key.pk]})
    assert victim.get("/v1/models").status_code == 401


def test_a_user_with_conversations_is_still_deleted_in_the_admin(client, chat):
    """Their messages go with their conversations, although MessageAdmin deletes none on its own."""
    client.force_login(make_superuser("root"))
    delete = reverse("admin:auth_user_delete", args=[chat.owner.pk])
    assert client.get(delete).context["perms_lacking"] == set()
    assert client.post(delete, {"post": "yes"}).status_code == 302
    assert not Conversation.objects.exists() and not Message.objects.exists()


def test_a_user_with_a_long_chain_of_replies_is_deleted_in_the_admin(client, editor_client, chat):
    """Django's confirmation lists a user's messages one nested level per reply, past Python's recursion limit (a
    500): the user's conversations are listed with their messages counted, and each is still permission-checked."""
    from chat.models import new_message_id

    ids = [new_message_id() for _ in range(1500)]
    Message.objects.bulk_create(Message(id=pk, conversation=chat, parent_id=parent, role="user", content=f"m{n}")
                                for n, (pk, parent) in enumerate(zip(ids, [None, *ids[:-1]])))
    Conversation.objects.filter(pk=chat.pk).update(active_id=ids[-1])
    other = Conversation.objects.create(character=chat.character, owner=chat.owner, title="Other")
    delete = reverse("admin:auth_user_delete", args=[chat.owner.pk])

    editor_client.grant("view_user", "delete_user", "view_conversation")  # no delete_conversation
    refused = editor_client.get(delete)
    assert refused.status_code == 200 and refused.context["perms_lacking"] == {"conversation"}
    assert editor_client.post(delete, {"post": "yes"}).status_code == 403

    client.force_login(make_superuser("root"))
    page = client.get(delete)
    assert page.status_code == 200 and page.context["perms_lacking"] == set() and not page.context["protected"]
    text = page.content.decode()
    assert "1502 message(s) and 1 invitation(s)" in text and "0 message(s) and 0 invitation(s)" in text
    assert reverse("admin:chat_conversation_change", args=[other.pk]) in text
    summary = dict(page.context["model_count"])
    assert (summary["conversations"], summary["messages"], summary["invitations"]) == (2, 1502, 1)
    assert client.post(delete, {"post": "yes"}).status_code == 302
    assert not Conversation.objects.exists() and not Message.objects.exists()
    assert not type(chat.owner).objects.filter(pk=chat.owner.pk).exists()
