"""The composed-prompt preview on a character's admin page."""

import dataclasses

import pytest
from django.urls import reverse

from characters.models import Character
from scenarios.models import Scenario

pytestmark = pytest.mark.django_db


@pytest.fixture
def mira():
    mira = Character.objects.create(
        name="Mira", slug="mira", description="{{char}} captains the Gilded Gull.",
        greeting="Welcome aboard, {{user}}!", post_history_instructions="Stay salty.",
    )
    Scenario.objects.create(character=mira, title="A storm is coming", keywords="storm, squall",
                            content="Black clouds gather; {{char}} orders the sails reefed.")
    Scenario.objects.create(character=mira, title="Treasure", keywords="treasure", content="Half a map.")
    return mira


def change_page(client, character, message=None):
    url = reverse("admin:characters_character_change", args=[character.pk])
    return client.get(url, {"preview_message": message} if message is not None else {})


def test_the_change_page_offers_the_preview_form_without_composing(staff_client, mira):
    response = change_page(staff_client, mira)
    page = response.content.decode()
    assert response.status_code == 200
    assert "Prompt preview" in page and 'name="preview_message"' in page
    assert "Rendered prompt" not in page and "prompt_preview" not in response.context


@pytest.mark.smollm2
def test_preview_shows_the_prompt_the_scenarios_and_the_token_count(staff_client, mira, smollm2_path):
    response = change_page(staff_client, mira, "Is a storm coming, captain?")
    assert response.status_code == 200
    preview = response.context["prompt_preview"]
    assert preview.error == ""
    composed = preview.composed
    assert [s.title for s in composed.scenarios] == ["A storm is coming"]

    page = response.content.decode()
    assert "Rendered prompt" in page
    assert "Mira captains the Gilded Gull." in page
    assert "Black clouds gather; Mira orders the sails reefed." in page
    assert "Welcome aboard, User!" in page  # the chat opens with the greeting
    assert "<strong>A storm is coming</strong>: keyword &#x27;storm&#x27; in the user&#x27;s message" in page
    assert f"<strong>{composed.prompt_tokens} tokens</strong> of the {composed.available_tokens}" in page
    assert f"context window {composed.context_length} tokens" in page
    assert "Treasure" not in page.split("Scenarios inserted")[1].split("Rendered prompt")[0]


@pytest.mark.smollm2
def test_preview_reports_a_prompt_that_cannot_fit(staff_client, mira, smollm2_path):
    mira.description = "The Gilded Gull is a brigantine. " * 700
    mira.save()
    response = change_page(staff_client, mira, "Hello")
    assert response.status_code == 200
    assert "the model&#x27;s context holds 2048 tokens" in response.content.decode()


def test_preview_needs_staff(client, django_user_model, mira):
    client.force_login(django_user_model.objects.create_user("visitor", password="pw"))
    assert change_page(client, mira, "storm").status_code == 302


def test_preview_says_so_when_the_model_cannot_load(staff_client, mira, settings, tmp_path):
    config = settings.LLMSITE
    missing = [dataclasses.replace(model, path=str(tmp_path / "missing.gguf")) for model in config.models]
    settings.LLMSITE = dataclasses.replace(config, models=tuple(missing))  # resets the model registry
    response = change_page(staff_client, mira, "Is a storm coming?")
    assert response.status_code == 200
    page = response.content.decode()
    assert "The model cannot be loaded, so there is no preview" in page
    assert "missing.gguf" in page


# --- editing: greetings as a list, named system prompts ----------------------------------------------------


def add_character(client, **fields):
    data = {"name": "Tess", "slug": "tess", "description": "A tinker.", "is_active": "on",
            "scenarios-TOTAL_FORMS": "0", "scenarios-INITIAL_FORMS": "0",
            "scenarios-MIN_NUM_FORMS": "0", "scenarios-MAX_NUM_FORMS": "1000", **fields}
    return client.post(reverse("admin:characters_character_add"), data)


def test_alternate_greetings_are_edited_as_a_list_of_boxes_not_json(staff_client):
    response = add_character(staff_client, alternate_greetings=["Hi, {{user}}!", "  ", "Back\r\nagain?"])
    assert response.status_code == 302, response.content.decode()[:3000]
    tess = Character.objects.get(slug="tess")
    assert tess.alternate_greetings == ["Hi, {{user}}!", "Back\nagain?"]  # the empty box is ignored

    page = staff_client.get(reverse("admin:characters_character_change", args=[tess.pk])).content.decode()
    assert page.count('<textarea name="alternate_greetings"') == 3  # two greetings and one empty box
    assert "Add another greeting" in page and "characters/greetings.js" in page
    assert "[&quot;Hi" not in page  # no JSON in sight


def test_a_character_picks_a_named_system_prompt_and_one_in_use_cannot_be_deleted(staff_client):
    from characters.models import SystemPrompt

    terse = SystemPrompt.objects.create(name="Terse", content="Be brief.")
    assert add_character(staff_client, named_system_prompt=str(terse.pk)).status_code == 302
    assert Character.objects.get(slug="tess").named_system_prompt == terse
    listing = staff_client.get(reverse("admin:characters_systemprompt_changelist"))
    assert listing.status_code == 200 and '<td class="field-character_count">1</td>' in listing.content.decode()
    delete = staff_client.post(reverse("admin:characters_systemprompt_delete", args=[terse.pk]), {"post": "yes"})
    assert "Cannot delete system prompt" in delete.content.decode()
    assert SystemPrompt.objects.filter(pk=terse.pk).exists()
