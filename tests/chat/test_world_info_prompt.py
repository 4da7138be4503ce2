"""World Info in composed prompts (chat/prompting/compose.py) and group chats: the order within a position,
the example-dialogue positions, the character filter for one character and for each speaker of a group, a
group's "all in turn" and an ad hoc `characters` list through the API. A tiny random-weight model."""

import pytest

from characters.models import CharacterGroup, GroupMember
from chat.models import Conversation
from chat.plans import chat_request_prepare
from chat.prompting import prompt_compose
from tests.chat.test_client_text import tiny_engines  # noqa: F401 (fixture)
from tests.chat.test_conversation_tree import NO_CACHE, tiny_models, tiny_site  # noqa: F401 (fixtures)
from tests.factories import make_api_client, make_character, make_scenario

pytestmark = pytest.mark.django_db

URL = "/v1/chat/completions"


def compose(engine, character, text="Hello"):
    return prompt_compose(engine=engine, character=character, turns=[{"role": "user", "content": text}],
                          max_tokens=16)


def test_within_a_position_lower_order_comes_first(tiny_engines):
    ada = make_character("ada", name="Ada")
    make_scenario("Late", character=ada, always_on=True, priority=90, content="LATE-NINETY")
    make_scenario("Early", character=ada, always_on=True, priority=10, content="EARLY-TEN")
    make_scenario("Top late", character=ada, always_on=True, priority=90, position="before_char", content="TOP-90")
    make_scenario("Top early", character=ada, always_on=True, priority=10, position="before_char", content="TOP-10")
    text = "\n".join(message["content"] for message in compose(tiny_engines.get("tiny-llama"), ada).messages)
    assert text.index("EARLY-TEN") < text.index("LATE-NINETY")
    assert text.index("TOP-10") < text.index("TOP-90")


def test_before_and_after_the_example_dialogue(tiny_engines):
    ada = make_character("ada", name="Ada", example_dialogue="<START>\n{{user}}: Cold?\n{{char}}: Always.")
    make_scenario("After", character=ada, always_on=True, position="after_examples", content="AFTER-EXAMPLES")
    make_scenario("Before", character=ada, always_on=True, position="before_examples", content="BEFORE-EXAMPLES")
    composed = compose(tiny_engines.get("tiny-llama"), ada)
    text = "\n".join(message["content"] for message in composed.messages)
    assert text.index("BEFORE-EXAMPLES") < text.index("Ada: Always.") < text.index("AFTER-EXAMPLES")


def test_the_character_filter_in_composed_prompts(tiny_engines):
    engine = tiny_engines.get("tiny-llama")
    ada, bob = make_character("ada", name="Ada"), make_character("bob", name="Bob")
    make_scenario("Only Ada", always_on=True, character_filter="ada", content="ONLY-FOR-ADA")
    make_scenario("Not Ada", always_on=True, character_filter="Ada", character_filter_exclude=True,
                  content="NOT-FOR-ADA")

    def texts(character):
        return "\n".join(message["content"] for message in compose(engine, character).messages)

    assert "ONLY-FOR-ADA" in texts(ada) and "NOT-FOR-ADA" not in texts(ada)
    assert "ONLY-FOR-ADA" not in texts(bob) and "NOT-FOR-ADA" in texts(bob)
    assert "ONLY-FOR-ADA" not in texts(None) and "NOT-FOR-ADA" in texts(None)  # no character: not Ada


@pytest.fixture
def crew(tiny_site):
    ada, bob = make_character("ada", name="Ada"), make_character("bob", name="Bob")
    group = CharacterGroup.objects.create(name="Crew", slug="crew", turn_mode=CharacterGroup.TurnMode.ROUND_ROBIN)
    GroupMember.objects.create(group=group, character=ada, position=0)
    GroupMember.objects.create(group=group, character=bob, position=1)
    return group, ada, bob


def ask(client, text, **fields):
    response = client.post(URL, {"messages": [{"role": "user", "content": text}], "max_tokens": 3, **fields},
                           format="json", **NO_CACHE)
    assert response.status_code == 200, response.content
    return response.json()


def test_the_character_filter_follows_the_speaker_of_a_group(crew):
    group, ada, bob = crew
    make_scenario("Only Bob", always_on=True, character_filter="bob", content="ONLY-FOR-BOB")
    user = make_api_client("sam").user
    for speaker, expected in (("ada", False), ("bob", True)):
        plan = chat_request_prepare(user=user, data={"messages": [{"role": "user", "content": "Hi"}],
                                                     "character": "crew", "speaker": speaker})
        try:
            assert ("ONLY-FOR-BOB" in "\n".join(m["content"] for m in plan.prompt.messages)) is expected
        finally:
            plan.release_conversation()


@pytest.mark.django_db(transaction=True)
def test_all_in_turn_through_the_api_whoever_is_named(crew):
    client = make_api_client("sam")
    first = ask(client, "Bob, you first.", character="crew")  # named, but it is Ada's turn
    conversation = first["conversation"]
    speakers = [first["speaker"]["slug"]]
    for text in ["Bob again?", "Ada?", "Bob!"]:
        speakers.append(ask(client, text, conversation=conversation)["speaker"]["slug"])
    assert speakers == ["ada", "bob", "ada", "bob"]


@pytest.mark.django_db(transaction=True)
def test_an_ad_hoc_characters_list_makes_a_group_conversation(tiny_site):
    ada, bob = make_character("ada", name="Ada"), make_character("bob", name="Bob")
    client = make_api_client("sam")
    body = ask(client, "Bob, what do you say?", characters=["ada", "bob"])
    assert body["speaker"]["slug"] == "bob"  # named in the message
    conversation = Conversation.objects.get(pk=body["conversation"])
    assert conversation.group is None and set(conversation.members.all()) == {ada, bob}
    assert ask(client, "And Ada?", conversation=str(conversation.pk))["speaker"]["slug"] == "ada"
    missing = client.post(URL, {"messages": [{"role": "user", "content": "Hi"}], "characters": ["ada", "nobody"]},
                          format="json")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "character_not_found"
