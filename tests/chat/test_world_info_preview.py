"""The character admin's prompt preview (chat/prompting/preview.py, chat/admin.py): the token cost of every part
of the prompt (system prompt, persona, each World Info entry, examples, ...), and a preview that continues a
stored conversation, with its branch's sticky entries and why they fired. A tiny random-weight model."""

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from chat.engines import get_engine
from chat.models import Conversation
from tests.chat.test_conversation_tree import NO_CACHE, tiny_models, tiny_site  # noqa: F401 (fixtures)
from tests.factories import make_api_client, make_character, make_scenario, make_user

pytestmark = pytest.mark.django_db


def preview(client, character, message, **params):
    response = client.get(reverse("admin:characters_character_change", args=[character.pk]),
                          {"preview_message": message, **params})
    assert response.status_code == 200
    return response, response.context["prompt_preview"]


def test_the_preview_costs_every_part_of_the_prompt(admin_client, tiny_site):
    ada = make_character("ada", name="Ada", description="Ada keeps the lighthouse.", system_prompt="Be Ada.",
                         example_dialogue="<START>\n{{user}}: Cold?\n{{char}}: Always.")
    make_scenario("Harbor", character=ada, always_on=True, content="The harbor is quiet.")
    make_scenario("Deep", character=ada, always_on=True, position="at_depth", depth=0, content="Deep lore.")
    response, shown = preview(admin_client, ada, "Hello")
    parts = {what: tokens for what, _opening, tokens in shown.parts}
    assert sorted(parts) == sorted(["System prompt", "Persona", "World Info: Harbor", "World Info: Deep",
                                    "Example dialogue", "New message", "Chat template and separators"])
    engine = get_engine()
    assert parts["World Info: Harbor"] == engine.count_tokens("The harbor is quiet.")
    assert parts["System prompt"] == engine.count_tokens("Be Ada.")
    assert sum(parts.values()) == shown.composed.prompt_tokens and parts["Chat template and separators"] > 0
    assert "Token cost of every part" in response.content.decode()


@pytest.mark.django_db(transaction=True)
def test_the_preview_continues_a_conversation_with_its_sticky_entries(client, admin_client, tiny_site, settings):
    settings.SCENARIO_BM25_THRESHOLD = 2.0
    settings.SCENARIO_SCAN_DEPTH = 1
    ada = make_character("ada", name="Ada")
    make_scenario("Storm", character=ada, keywords="storm", sticky=3, content="A storm rages.")
    api = make_api_client("sam")
    body = api.post("/v1/chat/completions", {"character": "ada", "max_tokens": 3,
                                             "messages": [{"role": "user", "content": "A storm!"}]},
                    format="json", **NO_CACHE).json()
    conversation = Conversation.objects.get(pk=body["conversation"])

    _, fresh = preview(admin_client, ada, "Tea?")
    assert fresh.composed.scenarios == []  # a new chat: no storm
    _, continued = preview(admin_client, ada, "Tea?", preview_conversation=str(conversation.pk))
    [(storm, reason, _tokens)] = continued.explained_matches
    assert storm.title == "Storm" and reason.startswith("sticky (fired at message 1")
    assert continued.composed.messages[-1]["content"] == "Tea?"
    assert any(m["content"] == "A storm!" for m in continued.composed.messages)  # its history

    for conversation_id in ["not-a-uuid", "00000000-0000-0000-0000-000000000000"]:
        _, refused = preview(admin_client, ada, "Tea?", preview_conversation=conversation_id)
        assert refused.error.startswith("No conversation") and refused.composed is None
    # An editor who may not view chats gets the same answer for a conversation that exists.
    editor = make_user("editor", is_staff=True)
    editor.user_permissions.set(Permission.objects.filter(codename__in=["view_character", "change_character"]))
    client.force_login(editor)
    _, refused = preview(client, ada, "Tea?", preview_conversation=str(conversation.pk))
    assert refused.error.startswith("No conversation") and refused.composed is None
