"""World Info timed effects and rolls per branch of a conversation (Message.world_info_state, chat/prompting's
`world_info_inputs`): each reply holds the state after it, the next reply on its path reads it, a regenerated
reply rolls as the one it replaces, a new conversation's first roll is seeded by its own id, and existing
conversations' state moves onto their active leaf (migration 0008). A tiny random-weight model."""

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor

from chat.models import Conversation, Message
from tests.chat.test_conversation_tree import NO_CACHE, tiny_models, tiny_site, url  # noqa: F401 (fixtures)
from tests.factories import make_api_client, make_character, make_scenario

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def lore(tiny_site, settings):
    settings.SCENARIO_SCAN_DEPTH = 1
    settings.SCENARIO_BM25_THRESHOLD = 2.0  # no text-relevance fallback: only keys and timed effects
    return make_character("mira")


def say(client, text, conversation=None):
    body = {"messages": [{"role": "user", "content": text}], "max_tokens": 3,
            **({"conversation": str(conversation.pk)} if conversation else {"character": "mira"})}
    response = client.post("/v1/chat/completions", body, format="json", **NO_CACHE)
    assert response.status_code == 200, response.content
    return response.json()


def titles(body) -> list[str]:
    return [scenario["title"] for scenario in body["scenarios"]]


def test_two_branches_keep_their_own_sticky_state(lore):
    make_scenario("Storm", character=lore, keywords="storm", sticky=4)
    client = make_api_client("alice")
    conversation = Conversation.objects.get(pk=say(client, "Hello there")["conversation"])   # messages 1, 2
    assert titles(say(client, "A storm comes", conversation)) == ["Storm"]                   # 3: fires, held to 7
    assert titles(say(client, "Tea?", conversation)) == ["Storm"]                            # 5: sticky
    storm_user = conversation.messages.get(content="A storm comes")
    old_leaf = Conversation.objects.get(pk=conversation.pk).active_id

    edited = client.post(url(conversation, f"messages/{storm_user.pk}/edit/"),
                         {"content": "A calm day", "max_tokens": 3}, format="json")
    assert edited.status_code == 200, edited.content
    assert titles(edited.json()) == []                                                       # 3': no storm here
    assert titles(say(client, "Tea?", conversation)) == []  # 5': the other branch's sticky record does not apply

    client.post(url(conversation, f"messages/{old_leaf}/select/"))
    assert titles(say(client, "More tea?", conversation)) == ["Storm"]  # 7 on the first branch: still sticky


def test_a_regenerated_reply_rolls_as_the_one_it_replaces(lore):
    make_scenario("Rumor", character=lore, keywords="rumor", probability=99)
    client = make_api_client("alice")
    first = say(client, "Hello there")
    conversation = Conversation.objects.get(pk=first["conversation"])
    original = say(client, "Any rumor today?", conversation)
    reply = Message.objects.get(pk=Conversation.objects.get(pk=conversation.pk).active_id)
    regenerated = client.post(url(conversation, f"messages/{reply.pk}/regenerate/"), {"max_tokens": 3},
                              format="json")
    assert regenerated.status_code == 200, regenerated.content
    [rolled] = original["scenarios"]
    assert "probability roll" in rolled["reason"]
    assert regenerated.json()["scenarios"] == original["scenarios"]  # the same roll, so the same reason


def test_new_conversations_roll_their_first_message_differently(lore):
    make_scenario("Rumor", character=lore, keywords="rumor", probability=99)
    client = make_api_client("alice")
    # A roll of 99 or more (1 in 100) leaves the entry out: that counts as another outcome too.
    reasons = {next((s["reason"] for s in say(client, "Any rumor today?")["scenarios"]), "left out")
               for _ in range(4)}
    assert len(reasons) > 1  # seeded by each new conversation's id, not only by the message count


def test_existing_conversation_state_moves_onto_the_active_leaf(transactional_db):
    before, after = ("chat", "0007_usagerecord_end_user"), ("chat", "0008_message_world_info_state")
    executor = MigrationExecutor(connection)
    executor.migrate([before])
    try:
        content = [node for node in executor.loader.graph.leaf_nodes() if node[0] != "chat"]
        old = executor.loader.project_state([before, *content]).apps
        user = old.get_model("auth", "User").objects.create(username="before")
        character = old.get_model("characters", "Character").objects.create(name="Old", slug="old", description="x")
        state = {"7": {"at": 3, "sticky_until": 5, "cooldown_until": 5}}
        conversation = old.get_model("chat", "Conversation").objects.create(character=character, owner=user,
                                                                           world_info_state=state)
        OldMessage = old.get_model("chat", "Message")
        parent = None
        for role in ["user", "assistant", "user"]:  # the active leaf is a user message: its parent reply holds it
            parent = OldMessage.objects.create(conversation=conversation, role=role, content=role, parent=parent)
        old.get_model("chat", "Conversation").objects.filter(pk=conversation.pk).update(active=parent)

        executor = MigrationExecutor(connection)
        executor.migrate([after])
        executor.loader.build_graph()
        new = executor.loader.project_state([after, *content]).apps
        assert list(new.get_model("chat", "Message").objects.filter(conversation_id=conversation.pk)
                    .order_by("id").values_list("world_info_state", flat=True)) == [{}, state, {}]
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())


def test_a_chat_that_is_not_stored_rolls_by_the_requests_seed(lore):
    make_scenario("Rumor", character=lore, keywords="rumor", probability=99)
    client = make_api_client("alice")
    body = {"messages": [{"role": "user", "content": "Any rumor today?"}], "max_tokens": 3, "character": "mira",
            "store": False}
    reasons = set()
    for _ in range(3):
        response = client.post("/v1/chat/completions", {**body, "seed": 7}, format="json", **NO_CACHE)
        assert response.status_code == 200, response.content
        reasons.add(response.json()["scenarios"][0]["reason"])
    assert len(reasons) == 1 and not Conversation.objects.exists()


def test_the_reasons_a_client_reads_quote_no_hidden_text(lore):
    """The editors' reasons quote the words of another entry's hidden text that fired a recursion, and
    secondary keys nobody typed; a client is told only how each entry fired."""
    from scenarios.models import Scenario

    make_scenario("Vault", character=lore, keywords="dragon", content="The vault code is swordfish.")
    make_scenario("Fish", character=lore, keywords="swordfish", content="Fish lore.")
    make_scenario("Gems", character=lore, keywords="dragon", secondary_keywords="emerald, ruby",
                  selective_logic=Scenario.SelectiveLogic.NOT_ALL, content="Gem lore.")
    client = make_api_client("alice")
    scenarios = {s["title"]: s["reason"] for s in say(client, "Tell me about the dragon.")["scenarios"]}
    assert set(scenarios) == {"Vault", "Fish", "Gems"}, scenarios
    assert scenarios["Fish"] == "recursion from 'Vault'" and scenarios["Vault"] == "a keyword in the conversation"
    text = " ".join(scenarios.values())
    assert not any(word in text for word in ("swordfish", "emerald", "ruby", "dragon")), scenarios
