"""Validation rules editors meet in the admin."""

import pytest
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from characters.models import Character, SystemPrompt
from chat.models import Conversation, Message
from scenarios.models import Scenario
from tests.factories import make_character

pytestmark = pytest.mark.django_db


def test_second_default_system_prompt_is_refused_with_a_clear_message():
    SystemPrompt.objects.create(name="House", content="Be kind.", is_default=True)
    second = SystemPrompt(name="Other", content="Be brief.", is_default=True)
    with pytest.raises(ValidationError) as error:
        second.full_clean()
    assert "already the default" in str(error.value.message_dict["is_default"])
    # The database refuses it too, whatever path the write takes.
    with pytest.raises(IntegrityError), transaction.atomic():
        second.save()


def test_default_prompt_can_be_edited_and_a_non_default_added():
    house = SystemPrompt.objects.create(name="House", content="Be kind.", is_default=True)
    house.content = "Be very kind."
    house.full_clean()
    SystemPrompt(name="Other", content="Be brief.").full_clean()


def test_empty_slug_gets_a_clear_message():
    character = Character(name="Mira", slug="", description="A captain.")
    with pytest.raises(ValidationError) as error:
        character.full_clean()
    assert "slug is required" in " ".join(error.value.message_dict["slug"])


def test_duplicate_slug_and_bad_sampling_values_are_refused():
    make_character()
    clash = Character(name="Other", slug="mira", description="x", temperature=3.5, top_p=1.5)
    with pytest.raises(ValidationError) as error:
        clash.full_clean()
    assert set(error.value.message_dict) >= {"slug", "temperature", "top_p"}


def test_extensions_must_be_an_object_and_greetings_a_list_of_strings():
    character = Character(name="A", slug="a", description="x", extensions=[1], alternate_greetings="hi")
    with pytest.raises(ValidationError) as error:
        character.full_clean()
    assert set(error.value.message_dict) >= {"extensions", "alternate_greetings"}


def test_scenario_without_keywords_must_be_always_on():
    scenario = Scenario(title="Storm", content="A storm.", keywords=" , ")
    with pytest.raises(ValidationError) as error:
        scenario.full_clean()
    assert "never fires" in " ".join(error.value.message_dict["keywords"])
    Scenario(title="Storm", content="A storm.", always_on=True).full_clean()


def test_scenario_keyword_lists_and_str():
    character = make_character()
    scenario = Scenario.objects.create(title="Storm", content="x", keywords="storm, Squall ,,", character=character,
                                       secondary_keywords="night")
    assert scenario.keyword_list == ["storm", "Squall"]
    assert scenario.secondary_keyword_list == ["night"]
    assert str(scenario) == "Storm (Mira)"
    assert str(Scenario(title="Fire", content="x", always_on=True)) == "Fire (global)"


def test_conversation_messages_keep_order_tokens_and_scenarios(django_user_model):
    owner = django_user_model.objects.create_user("ann")
    character = make_character()
    scenario = Scenario.objects.create(title="Storm", content="x", keywords="storm")
    conversation = Conversation.objects.create(character=character, owner=owner)
    Message.objects.create(conversation=conversation, role="user", content="storm?")
    reply = Message.objects.create(conversation=conversation, role="assistant", content="Aye.",
                                   prompt_tokens=50, completion_tokens=3, finish_reason="stop")
    reply.scenarios.add(scenario)
    assert [m.role for m in conversation.messages.all()] == ["user", "assistant"]
    assert list(reply.scenarios.all()) == [scenario]
    assert str(reply) == "Assistant: Aye."
    assert "Chat with Mira" in str(conversation)


def test_character_with_conversations_cannot_be_deleted(django_user_model):
    from django.db.models import ProtectedError

    character = make_character()
    Conversation.objects.create(character=character, owner=django_user_model.objects.create_user("bob"))
    with pytest.raises(ProtectedError):
        character.delete()
