"""The admin as a content editor sees it: a staff member, not a superuser, in the "Content editors" group
that characters/migrations/0003 creates."""

import pytest
from django.contrib.auth.models import Group, Permission
from django.db.models.fields.files import FieldFile
from django.urls import reverse

from characters.models import Character
from scenarios.models import Scenario
from tests.factories import make_character

from .test_cards import V2_JSON, V2_PNG

pytestmark = pytest.mark.django_db

EDITOR_MODELS = {("characters", "systemprompt"), ("characters", "character"), ("scenarios", "scenario"),
                 ("characters", "charactergroup"), ("characters", "groupmember")}


def form_data(response, **changes) -> dict:
    """The POST data of an admin change or add page as it was rendered (its form and inline formsets)."""
    data = {}
    forms = [response.context["adminform"].form]
    for inline in response.context["inline_admin_formsets"]:
        management = inline.formset.management_form
        data.update({management.add_prefix(name): value for name, value in management.initial.items()})
        forms += list(inline.formset.forms)
    for form in forms:
        for name, field in form.fields.items():
            value = form[name].value()
            if value is None or value is False or isinstance(value, FieldFile):  # no new upload
                continue
            data[form.add_prefix(name)] = [str(v) for v in value] if isinstance(value, list) else value
    data.update(changes)
    return data


def test_the_group_holds_exactly_the_editor_permissions():
    group = Group.objects.get(name="Content editors")
    held = set(group.permissions.values_list("content_type__app_label", "content_type__model", "codename"))
    assert held == {(app, model, f"{action}_{model}") for app, model in EDITOR_MODELS
                    for action in ("add", "change", "delete", "view")}


def test_an_editor_edits_characters_and_scenarios(editor_client):
    mira = make_character("mira", personality="Gruff.")
    storm = Scenario.objects.create(character=mira, title="Storm", keywords="storm", content="Rain.")
    change = reverse("admin:characters_character_change", args=[mira.pk])
    page = editor_client.get(change)
    assert page.status_code == 200
    response = editor_client.post(change, form_data(page, personality="Kind."))
    assert response.status_code == 302, response.context["adminform"].form.errors if response.context else ""
    mira.refresh_from_db()
    assert mira.personality == "Kind."

    scenario_change = reverse("admin:scenarios_scenario_change", args=[storm.pk])
    page = editor_client.get(scenario_change)
    assert editor_client.post(scenario_change, form_data(page, content="Hail.")).status_code == 302
    storm.refresh_from_db()
    assert storm.content == "Hail."
    assert editor_client.get(reverse("admin:characters_systemprompt_add")).status_code == 200


def test_an_editor_imports_and_updates_a_card(editor_client):
    url = reverse("admin:characters_character_import_card")
    assert url in editor_client.get(reverse("admin:characters_character_changelist")).content.decode()
    with V2_PNG.open("rb") as card:
        response = editor_client.post(url, {"card": card})
    ada = Character.objects.get(slug="ada-quint")
    assert response.status_code == 302 and ada.scenarios.count() == 4
    with V2_JSON.open("rb") as card:
        assert editor_client.post(url, {"card": card, "update": "on"}).status_code == 302
    assert Character.objects.filter(slug__startswith="ada-quint").count() == 1


def test_card_import_needs_the_scenario_permissions(editor_client):
    """Character permissions alone do not import a card: it creates and updates scenarios. An editor whose group
    was given only the character permissions (the scenario ones taken away here) gets them back one by one."""
    group = Group.objects.get(name="Content editors")
    group.permissions.remove(*Permission.objects.filter(content_type__app_label="scenarios"))
    url = reverse("admin:characters_character_import_card")
    assert url not in editor_client.get(reverse("admin:characters_character_changelist")).content.decode()
    assert editor_client.get(url).status_code == 403
    with V2_PNG.open("rb") as card:
        assert editor_client.post(url, {"card": card}).status_code == 403
    assert not Character.objects.exists() and not Scenario.objects.exists()

    editor_client.grant("add_scenario")
    with V2_PNG.open("rb") as card:
        assert editor_client.post(url, {"card": card}).status_code == 302
    with V2_JSON.open("rb") as card:  # an update changes scenarios too
        assert editor_client.post(url, {"card": card, "update": "on"}).status_code == 403


def test_an_editor_sees_no_conversations_and_no_keys(editor_client):
    index = editor_client.get(reverse("admin:index")).content.decode()
    assert reverse("admin:characters_character_changelist") in index
    assert "/admin/chat/" not in index
    for name in ("chat_conversation_changelist", "chat_message_changelist", "chat_apikey_changelist",
                 "chat_apikey_add", "chat_job_changelist"):
        try:
            url = reverse(f"admin:{name}")
        except Exception:  # not registered in the admin at all
            continue
        assert editor_client.get(url).status_code == 403, name


def test_an_editor_manages_character_groups(editor_client):
    make_character("mira")
    assert editor_client.get(reverse("admin:characters_charactergroup_changelist")).status_code == 200
    assert editor_client.get(reverse("admin:characters_charactergroup_add")).status_code == 200


def _picture(width: int, height: int, kind: str = "PNG") -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format=kind)
    return buffer.getvalue()


def _animation(width: int, height: int, frames: int, kind: str) -> bytes:
    """Frames of different colours (identical ones would be merged into one on saving)."""
    import io

    from PIL import Image

    pictures = [Image.new("RGB", (width, height), (40 * number % 256, 0, 0)) for number in range(frames)]
    buffer = io.BytesIO()
    pictures[0].save(buffer, format=kind, save_all=True, append_images=pictures[1:], loop=0, duration=20)
    return buffer.getvalue()


@pytest.mark.parametrize(("name", "content", "accepted"), [
    ("face.png", _picture(64, 64), True),
    ("face.gif", _picture(64, 64, "GIF") + b"<html><script>alert(1)</script>", True),
    ("face.pdf", _picture(64, 64, "GIF") + b"<html><script>alert(1)</script>", False),  # a picture served as PDF
    ("huge.png", _picture(9000, 9000), False),  # 10 KB of file, 81 million pixels for every visitor to decode
    ("small.gif", _animation(64, 64, 3, "GIF"), True),
    # Each frame within the limit, all of them together over it: a browser decodes every frame, again and again
    ("frames.gif", _animation(2500, 2000, 6, "GIF"), False),
    ("frames.png", _animation(2500, 2000, 6, "PNG"), False),  # APNG
    ("frames.webp", _animation(2500, 2000, 6, "WEBP"), False),
])
def test_an_avatar_is_a_picture_of_a_kind_and_size_browsers_show(editor_client, tmp_path, settings, name, content,
                                                                   accepted):
    from django.core.files.uploadedfile import SimpleUploadedFile

    settings.MEDIA_ROOT = str(tmp_path)
    mira = make_character("mira")
    change = reverse("admin:characters_character_change", args=[mira.pk])
    data = form_data(editor_client.get(change))
    data["avatar"] = SimpleUploadedFile(name, content)
    response = editor_client.post(change, data)
    mira.refresh_from_db()
    assert (response.status_code == 302) is accepted and bool(mira.avatar) is accepted
