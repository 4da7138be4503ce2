"""Chat's admin pages for staff who are not superusers: who may issue keys acting as whom, and who sees chats."""

import pytest
from django.contrib.auth.models import Group, Permission
from django.urls import reverse

from chat.api.keys import api_key_create
from chat.models import ApiKey, Conversation, Message
from tests.factories import make_character, make_superuser, make_user

pytestmark = pytest.mark.django_db


def staff_with(client, username: str, *codenames: str, group: str | None = None):
    user = make_user(username, is_staff=True)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="chat", codename__in=codenames))
    if group:
        user.groups.add(Group.objects.get(name=group))
    client.force_login(user)
    return user


def key_add(client, user, name="k"):
    return client.post(reverse("admin:chat_apikey_add"), {"name": name, "user": user.pk})


@pytest.fixture
def chat():
    owner = make_user("owner")
    conversation = Conversation.objects.create(character=make_character("mira"), owner=owner, title="Secrets")
    Message.objects.create(conversation=conversation, role="user", content="my password is hunter2")
    Message.objects.create(conversation=conversation, role="assistant", content="noted")
    return conversation


def test_staff_with_key_permissions_cannot_issue_a_key_acting_as_staff_or_a_superuser(client):
    staff_with(client, "key-admin", "add_apikey", "change_apikey", "view_apikey")
    root, colleague, plain = make_superuser("root"), make_user("colleague", is_staff=True), make_user("plain")
    for target in (root, colleague):
        response = key_add(client, target)
        assert response.status_code == 200 and response.context["adminform"].form.errors["user"]
    assert not ApiKey.objects.exists()
    assert key_add(client, plain).status_code == 302
    assert list(ApiKey.objects.values_list("user__username", flat=True)) == ["plain"]


def test_staff_with_key_permissions_cannot_see_or_change_keys_acting_as_staff(client):
    staff_with(client, "key-admin", "add_apikey", "change_apikey", "view_apikey")
    root_key, _ = api_key_create(user=make_superuser("root"), name="root's")
    plain_key, _ = api_key_create(user=make_user("plain"), name="plain's")
    listed = client.get(reverse("admin:chat_apikey_changelist")).content.decode()
    assert "plain&#x27;s" in listed and "root&#x27;s" not in listed
    assert client.get(reverse("admin:chat_apikey_change", args=[root_key.pk])).status_code == 302  # "doesn't exist"
    # The key's user cannot be changed afterwards (another user gets a key of their own).
    change = reverse("admin:chat_apikey_change", args=[plain_key.pk])
    assert client.post(change, {"name": "renamed", "user": make_superuser("root2").pk}).status_code == 302
    plain_key.refresh_from_db()
    assert plain_key.name == "renamed" and plain_key.user.username == "plain"


def test_a_superuser_issues_keys_acting_as_staff(client):
    client.force_login(make_superuser("root"))
    assert key_add(client, make_user("colleague", is_staff=True)).status_code == 302
    assert ApiKey.objects.get().user.username == "colleague"


def test_conversations_need_the_view_permission_explicitly(client, chat):
    # change and delete would imply viewing for any other model: not for chats.
    staff_with(client, "nosy", "change_conversation", "delete_conversation", "view_message", "change_message")
    for url in (reverse("admin:chat_conversation_changelist"), reverse("admin:chat_conversation_change", args=[chat.pk]),
                reverse("admin:chat_conversation_delete", args=[chat.pk]), reverse("admin:chat_message_changelist"),
                reverse("admin:chat_message_change", args=[chat.messages.first().pk])):
        response = client.get(url)
        assert response.status_code in (302, 403), url
        assert "hunter2" not in response.content.decode()


def test_editors_do_not_see_conversations(client, chat):
    staff_with(client, "editor", group="Content editors")
    assert client.get(reverse("admin:chat_conversation_changelist")).status_code == 403
    assert client.get(reverse("admin:chat_message_changelist")).status_code == 403


@pytest.mark.parametrize("superuser", [False, True])
def test_messages_are_read_only_in_the_admin(client, chat, superuser):
    if superuser:
        client.force_login(make_superuser("root"))
    else:
        staff_with(client, "support", "view_conversation", "change_conversation", "add_message", "change_message")
    page = client.get(reverse("admin:chat_conversation_change", args=[chat.pk]))
    assert page.status_code == 200 and "hunter2" in page.content.decode()
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
