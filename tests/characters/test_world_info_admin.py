"""World Info in the admin: import and export of SillyTavern files (with scenario permissions), and the
preview's account of which scenarios fired and why, with the token cost of every block."""

import json
from pathlib import Path

import pytest
from django.contrib.auth.models import Permission
from django.urls import reverse

from characters.models import Character
from scenarios.models import Scenario
from tests.factories import make_user

pytestmark = pytest.mark.django_db

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "world_info" / "saltmere.json"


def test_import_for_a_character_then_export_gives_back_the_entries(staff_client):
    ada = Character.objects.create(name="Ada", slug="ada")
    url = reverse("admin:characters_character_import_world_info")
    assert url in staff_client.get(reverse("admin:characters_character_changelist")).content.decode()
    with FIXTURE.open("rb") as upload:
        response = staff_client.post(url, {"file": upload, "character": ada.pk})
    assert response.status_code == 302 and response.url == reverse("admin:characters_character_change", args=[ada.pk])
    assert ada.scenarios.count() == 11
    exported = staff_client.get(reverse("admin:characters_character_export_world_info", args=[ada.pk]))
    assert json.loads(exported.content)["entries"] == json.loads(FIXTURE.read_bytes())["entries"]


def test_a_file_that_is_not_world_info_imports_nothing(staff_client):
    from django.core.files.uploadedfile import SimpleUploadedFile

    upload = SimpleUploadedFile("x.json", b'{"name": "no entries"}')
    response = staff_client.post(reverse("admin:characters_character_import_world_info"), {"file": upload})
    assert response.status_code == 200 and "Nothing was imported" in response.content.decode()
    assert not Scenario.objects.exists()


def test_import_needs_the_scenario_permissions(client):
    editor = make_user("charonly", is_staff=True)
    editor.user_permissions.set(Permission.objects.filter(codename__in=["view_character", "add_character",
                                                                        "change_character"]))
    client.force_login(editor)
    url = reverse("admin:characters_character_import_world_info")
    assert url not in client.get(reverse("admin:characters_character_changelist")).content.decode()
    with FIXTURE.open("rb") as upload:
        assert client.post(url, {"file": upload}).status_code == 403
    assert not Scenario.objects.exists()


@pytest.mark.smollm2
def test_preview_explains_recursion_and_what_was_left_out_and_costs_every_block(staff_client, smollm2_path):
    mira = Character.objects.create(name="Mira", slug="mira", description="Mira captains the Gull.")
    Scenario.objects.create(character=mira, title="Harbor", keywords="harbor", content="The harbor has a lighthouse.")
    Scenario.objects.create(character=mira, title="Lighthouse", keywords="lighthouse", content="Orla keeps it.",
                            position="at_depth", depth=0, depth_role="system")
    Scenario.objects.create(character=mira, title="Rumor", keywords="harbor", content="Gold!", probability=0)
    url = reverse("admin:characters_character_change", args=[mira.pk])
    response = staff_client.get(url, {"preview_message": "Take us to the harbor."})
    page = response.content.decode()
    assert "keyword &#x27;lighthouse&#x27; in the text of &#x27;Harbor&#x27; (recursion)" in page
    assert "Triggered but not inserted" in page and "probability roll" in page
    preview = response.context["prompt_preview"]
    assert [role for role, _opening, _tokens in preview.blocks][-1] == "system"  # the depth-0 insertion, last
    assert all(tokens > 0 for _role, _opening, tokens in preview.blocks)
    assert "Token cost of every block" in page
