"""Character Cards: import and export (JSON and PNG), round trips, bad cards, commands and admin."""

import base64
import io
import json
import zipfile
from pathlib import Path

import pytest
from django.core.management import CommandError, call_command
from django.urls import reverse
from PIL import Image, PngImagePlugin

from characters.card_format import CardError, card_read
from characters.models import Character
from characters.card_services import character_card_data, character_card_export, character_card_import
from scenarios.models import Scenario

pytestmark = pytest.mark.django_db

CARDS = Path(__file__).resolve().parent.parent / "fixtures" / "cards"
V2_JSON = CARDS / "lighthouse_keeper_v2.json"
V2_PNG = CARDS / "lighthouse_keeper_v2.png"  # the same card in a 'chara' chunk after IDAT (written without Pillow)


@pytest.fixture(autouse=True)
def media_root(settings, tmp_path):
    settings.MEDIA_ROOT = tmp_path / "media"


def canonical(value) -> str:
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


def original_data() -> dict:
    return json.loads(V2_JSON.read_text(encoding="utf-8"))["data"]


def assert_same_card_data(exported: dict, original: dict):
    assert exported.keys() == original.keys()
    for name in original:
        if name == "character_book":
            continue
        assert canonical(exported[name]) == canonical(original[name]), name
    book, original_book = exported["character_book"], original["character_book"]
    assert canonical({k: v for k, v in book.items() if k != "entries"}) == \
        canonical({k: v for k, v in original_book.items() if k != "entries"})
    assert len(book["entries"]) == len(original_book["entries"])
    for entry, original_entry in zip(book["entries"], original_book["entries"]):
        assert canonical(entry) == canonical(original_entry)


# --- import mapping ---------------------------------------------------------------------------------


def test_v2_json_import_maps_every_field():
    result = character_card_import(raw=V2_JSON.read_bytes())
    ada = result.character
    assert result.created and result.scenarios_created == 4
    assert (ada.name, ada.slug) == ("Ada Quint", "ada-quint")
    assert ada.description.startswith("{{char}} keeps the lighthouse")  # placeholders kept raw
    assert ada.personality == "Dry humour, patient, superstitious about the sea."
    assert ada.setting.startswith("A winter night in the lamp room")
    assert ada.greeting.startswith("Mind the last step")
    assert ada.example_dialogue.startswith("<START>")
    assert ada.system_prompt.startswith("You are {{char}}.")
    assert ada.post_history_instructions.startswith("Remember:")
    assert ada.alternate_greetings == ["Storm's coming, {{user}}. Best stay the night.", "Tea's on the stove."]
    assert ada.tags == "sea, lighthouse, slice of life"
    assert (ada.creator, ada.character_version, ada.creator_notes) == \
        ("fixture-author", "1.2", "Works best with short messages.")
    assert ada.extensions["depth_prompt"] == {"prompt": "She smells of lamp oil.", "depth": 4, "role": "system"}
    assert not ada.avatar

    storm, wreck, household, smugglers = Scenario.objects.filter(character=ada).order_by("id")
    assert (storm.title, storm.keywords, storm.secondary_keywords, storm.priority) == \
        ("The storm", "storm, gale", "", 200)
    assert storm.content.startswith("A storm is rolling in")
    assert storm.extensions["useProbability"] is True
    assert (wreck.title, wreck.secondary_keywords, wreck.case_sensitive, wreck.priority) == \
        ("The Mary Bell", "bell, Mary", True, 50)
    assert household.always_on and household.keywords == ""
    assert not smugglers.enabled and not smugglers.whole_words
    assert smugglers.secondary_keywords == ""  # secondary keys only count when the entry is selective


def test_v2_json_round_trip_is_field_by_field_equal():
    ada = character_card_import(raw=V2_JSON.read_bytes()).character
    exported = json.loads(character_card_export(character=ada, fmt="json").content)
    assert exported["spec"] == "chara_card_v2" and exported["spec_version"] == "2.0"
    assert_same_card_data(exported["data"], original_data())


def test_v2_png_round_trip_keeps_the_card_and_the_picture():
    ada = character_card_import(raw=V2_PNG.read_bytes()).character
    assert ada.avatar.name.endswith(".png")
    with Image.open(ada.avatar.path) as avatar:
        assert avatar.size == (8, 12)
        assert "chara" not in avatar.text  # the avatar is the picture alone

    exported = character_card_export(character=ada, fmt="png")
    assert exported.content_type == "image/png" and exported.filename == "ada-quint.png"
    with Image.open(io.BytesIO(exported.content)) as image:
        assert image.size == (8, 12)
        card = json.loads(base64.b64decode(image.text["chara"]))
    assert card["spec"] == "chara_card_v2"
    assert_same_card_data(card["data"], original_data())
    # And the exported PNG imports again as an equal character.
    again = character_card_import(raw=exported.content).character
    assert again.slug == "ada-quint-2"
    assert_same_card_data(character_card_data(character=again), original_data())


def test_edits_after_import_show_in_the_export_and_the_rest_is_kept():
    ada = character_card_import(raw=V2_JSON.read_bytes()).character
    ada.tags = "sea, ghosts"
    ada.save()
    storm = ada.scenarios.get(title="The storm")
    storm.keywords, storm.priority, storm.whole_words = "storm, tempest", 300, False
    storm.save()
    Scenario.objects.create(character=ada, title="New entry", keywords="lamp", content="The lamp is Fresnel's.")

    data = character_card_data(character=ada)
    assert data["tags"] == ["sea", "ghosts"]
    storm_entry, *_, new_entry = data["character_book"]["entries"]
    original_storm = original_data()["character_book"]["entries"][0]
    assert storm_entry["keys"] == ["storm", "tempest"]
    assert storm_entry["priority"] == 300 and storm_entry["insertion_order"] == 100
    assert storm_entry["extensions"]["match_whole_words"] is False
    assert storm_entry["id"] == 0 and storm_entry["position"] == "after_char"
    assert storm_entry["comment"] == original_storm["comment"]
    assert new_entry["keys"] == ["lamp"] and new_entry["name"] == "New entry" and new_entry["enabled"] is True


def test_v1_card_imports_and_exports_as_v2():
    old_tom = character_card_import(raw=(CARDS / "plain_v1.json").read_bytes()).character
    assert (old_tom.slug, old_tom.setting) == ("old-tom", "The harbour tavern.")
    assert old_tom.greeting.startswith("Sit down, {{user}}")
    assert old_tom.scenarios.count() == 0
    data = character_card_data(character=old_tom)
    assert data["talkativeness"] == "0.8"  # an unknown field survives
    assert "character_book" not in data
    assert data["mes_example"].startswith("{{user}}: Was it big?")


def test_a_character_made_in_the_admin_exports_as_a_card():
    mira = Character.objects.create(name="Mira", slug="mira", description="A captain.", tags="sea, ship")
    Scenario.objects.create(character=mira, title="Storm", keywords="storm", secondary_keywords="night",
                            content="Storm!", priority=7)
    Scenario.objects.create(title="Global", keywords="x", content="Not exported with Mira.")
    data = json.loads(character_card_export(character=mira, fmt="json").content)["data"]
    assert data["tags"] == ["sea", "ship"]
    [entry] = data["character_book"]["entries"]
    assert entry["keys"] == ["storm"] and entry["secondary_keys"] == ["night"] and entry["selective"] is True
    assert entry["priority"] == 7 and entry["content"] == "Storm!"
    with Image.open(io.BytesIO(character_card_export(character=mira, fmt="png").content)) as image:
        assert json.loads(base64.b64decode(image.text["chara"]))["data"]["name"] == "Mira"


# --- slugs and updates -------------------------------------------------------------------------------


def test_slugs_are_unique_unless_updating():
    first = character_card_import(raw=V2_JSON.read_bytes())
    second = character_card_import(raw=V2_JSON.read_bytes())
    assert (first.character.slug, second.character.slug) == ("ada-quint", "ada-quint-2")

    card = json.loads(V2_JSON.read_text())
    card["data"]["personality"] = "Changed."
    card["data"]["character_book"]["entries"][0]["content"] = "Changed storm."
    updated = character_card_import(raw=json.dumps(card).encode(), update=True)
    assert not updated.created and updated.character.pk == first.character.pk
    assert (updated.scenarios_created, updated.scenarios_updated) == (0, 4)
    assert Character.objects.count() == 2
    first.character.refresh_from_db()
    assert first.character.personality == "Changed."
    assert first.character.scenarios.get(title="The storm").content == "Changed storm."
    assert Scenario.objects.filter(character=first.character).count() == 4


def test_update_without_an_existing_character_creates_it():
    assert character_card_import(raw=V2_JSON.read_bytes(), update=True).created


# --- bad cards ------------------------------------------------------------------------------------------


def broken_entry_card() -> bytes:
    card = json.loads(V2_JSON.read_text())
    card["data"]["character_book"]["entries"][3]["keys"] = []  # neither keywords nor constant
    return json.dumps(card).encode()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json at all", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON list"),
        (json.dumps({"spec": "chara_card_v3", "spec_version": "3.0", "data": {}}).encode(),
         "Unsupported card spec 'chara_card_v3'"),
        (json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": "x"}).encode(), "'data'"),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": "X", "description": 5}}).encode(),
         "'description' must be text"),
        (json.dumps({"hello": "world"}).encode(), "Not a character card"),
        ((CARDS / "no_card.png").read_bytes(), "no 'chara' text chunk"),
        (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, "PNG image cannot be read"),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": "N" * 140, "description": "x"}}).encode(),
         "The card cannot be imported: name: Ensure this value has at most 100 characters (it has 140)."),
    ],
)
def test_bad_cards_are_refused_with_a_clear_message_and_nothing_is_imported(raw, message):
    with pytest.raises(CardError) as caught:
        character_card_import(raw=raw)
    assert message in str(caught.value)
    assert Character.objects.count() == 0 and Scenario.objects.count() == 0


def test_png_chunk_that_is_not_a_card():
    image = Image.new("RGB", (2, 2))
    info = PngImagePlugin.PngInfo()
    info.add_text("chara", "%%% not base64 %%%")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    with pytest.raises(CardError, match="not base64-encoded card JSON"):
        card_read(buffer.getvalue(), max_bytes=10_000)


def test_png_bombs_are_refused_before_decoding():
    buffer = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buffer, format="PNG")  # a few kB, 36 million pixels
    with pytest.raises(CardError, match="6000×6000 pixels"):
        card_read(buffer.getvalue(), max_bytes=10**7)


def test_oversized_cards_are_refused(settings):
    settings.CARD_MAX_BYTES = 1000
    with pytest.raises(CardError, match="at most 1,000 bytes"):
        character_card_import(raw=V2_JSON.read_bytes())
    assert Character.objects.count() == 0


def test_a_failed_update_changes_nothing():
    ada = character_card_import(raw=V2_JSON.read_bytes()).character
    card = json.loads(V2_JSON.read_text())
    card["data"]["personality"] = "Changed."
    card["data"]["alternate_greetings"] = "not a list"
    with pytest.raises(CardError):
        character_card_import(raw=json.dumps(card).encode(), update=True)
    ada.refresh_from_db()
    assert ada.personality == "Dry humour, patient, superstitious about the sea."
    assert Scenario.objects.filter(character=ada).count() == 4


# --- what import keeps from imperfect cards ---------------------------------------------------------------


def test_a_card_with_one_broken_lorebook_entry_imports_with_a_warning_naming_it():
    card = json.loads(broken_entry_card())
    card["data"]["character_book"]["entries"][2]["content"] = "   "  # "Household": no content
    result = character_card_import(raw=json.dumps(card).encode())
    assert result.created and result.scenarios_created == 2 and result.scenarios_skipped == 2
    assert sorted(result.character.scenarios.values_list("title", flat=True)) == ["The Mary Bell", "The storm"]
    assert "Lorebook entry 4 (“Smugglers”) skipped: it has no keys and is not constant" in " ".join(result.warnings)
    assert "Lorebook entry 3 (“Household”) skipped: it has no content." in result.warnings
    assert "2 lorebook entry(ies) skipped" in result.summary()


def test_empty_description_imports_with_a_warning():
    raw = json.dumps({"spec": "chara_card_v2", "data": {"name": "Blank", "description": "",
                                                        "personality": "Quiet."}}).encode()
    result = character_card_import(raw=raw)
    assert result.character.description == "" and result.character.personality == "Quiet."
    assert any("no description" in warning for warning in result.warnings)


def test_over_long_tags_and_keys_are_left_out_with_warnings():
    card = json.loads(V2_JSON.read_text())
    card["data"]["tags"] = ["sea", "t" * 60, *(f"tag{n:03}" for n in range(100))]
    card["data"]["creator"] = "c" * 250
    storm = card["data"]["character_book"]["entries"][0]
    storm["keys"] = ["storm", "k" * 150, *(f"word{n:04}" for n in range(200))]
    result = character_card_import(raw=json.dumps(card).encode())
    ada = result.character
    assert len(ada.tags) <= 500 and ada.tag_list[:2] == ["sea", "tag000"]
    assert len(ada.creator) == 200
    scenario = ada.scenarios.get(title="The storm")
    assert len(scenario.keywords) <= 1000 and scenario.keyword_list[:2] == ["storm", "word0000"]
    text = " ".join(result.warnings)
    assert "Tags: " in text and "tag(s) left out: “tttttttttttttttttttttttttttttttttttttttt…”" in text
    assert "Lorebook entry 1 (“The storm”): " in text and "key(s) left out" in text
    assert "creator cut to 200 characters (it had 250)." in text


def test_scan_depth_and_position_come_from_the_book_and_its_entries():
    card = json.loads(V2_JSON.read_text())
    card["data"]["character_book"]["entries"][2]["extensions"]["scan_depth"] = 9  # SillyTavern's place
    card["data"]["character_book"]["entries"][3]["extensions"]["position"] = 0  # numbered: before_char
    ada = character_card_import(raw=json.dumps(card).encode()).character
    assert ada.scan_depth == 4
    storm, wreck, household, smugglers = ada.scenarios.order_by("id")
    assert (storm.position, wreck.position, smugglers.position) == ("after_char", "before_char", "before_char")
    assert household.scan_depth == 9 and storm.scan_depth is None
    # Edits go back where the card had them.
    ada.scan_depth = 6
    ada.save()
    household.scan_depth, storm.position = 3, "before_char"
    household.save()
    storm.save()
    book = character_card_data(character=ada)["character_book"]
    assert book["scan_depth"] == 6
    assert book["entries"][2]["extensions"]["scan_depth"] == 3 and "scan_depth" not in book["entries"][2]
    assert book["entries"][0]["position"] == "before_char" and book["entries"][0]["extensions"]["position"] == 0


# --- management commands ----------------------------------------------------------------------------


def test_import_and_export_commands(tmp_path, capsys):
    call_command("import_card", str(V2_PNG))
    assert "Imported “Ada Quint” (ada-quint): 4 scenario(s) created." in capsys.readouterr().out
    call_command("import_card", str(V2_JSON), "--update")
    assert "Updated “Ada Quint” (ada-quint): 4 updated." in capsys.readouterr().out

    call_command("export_card", "ada-quint", "--format", "json", "-o", str(tmp_path / "ada.json"))
    assert_same_card_data(json.loads((tmp_path / "ada.json").read_text())["data"], original_data())
    call_command("export_card", "ada-quint", "--format", "png", "-o", str(tmp_path / "ada.png"))
    assert card_read((tmp_path / "ada.png").read_bytes(), max_bytes=10**7).data["name"] == "Ada Quint"


def test_import_command_prints_each_warning(tmp_path, capsys):
    (tmp_path / "broken.json").write_bytes(broken_entry_card())
    call_command("import_card", str(tmp_path / "broken.json"))
    out, err = capsys.readouterr()
    assert "3 scenario(s) created, 1 lorebook entry(ies) skipped." in out
    assert "warning: Lorebook entry 4 (“Smugglers”) skipped" in err


def test_commands_report_errors(tmp_path):
    with pytest.raises(CommandError, match="no 'chara' text chunk.*Nothing was imported"):
        call_command("import_card", str(CARDS / "no_card.png"))
    with pytest.raises(CommandError, match="cannot be read"):
        call_command("import_card", str(tmp_path / "missing.json"))
    with pytest.raises(CommandError, match="No character with slug 'nobody'"):
        call_command("export_card", "nobody", "-o", str(tmp_path / "x.json"))
    assert Character.objects.count() == 0


# --- admin ------------------------------------------------------------------------------------------------


def test_admin_import_upload(staff_client):
    changelist = staff_client.get(reverse("admin:characters_character_changelist"))
    url = reverse("admin:characters_character_import_card")
    assert url in changelist.content.decode()
    assert staff_client.get(url).status_code == 200
    with V2_PNG.open("rb") as card:
        response = staff_client.post(url, {"card": card})
    ada = Character.objects.get(slug="ada-quint")
    assert response.status_code == 302 and response.url == reverse("admin:characters_character_change",
                                                                    args=[ada.pk])
    assert ada.scenarios.count() == 4 and ada.avatar


def test_admin_import_shows_each_warning(staff_client):
    upload = io.BytesIO(broken_entry_card())
    upload.name = "broken.json"
    response = staff_client.post(reverse("admin:characters_character_import_card"), {"card": upload}, follow=True)
    page = response.content.decode()
    assert "Imported “Ada Quint” (ada-quint): 3 scenario(s) created, 1 lorebook entry(ies) skipped." in page
    assert "Lorebook entry 4 (“Smugglers”) skipped: it has no keys and is not constant" in page


def test_admin_import_of_a_bad_card_shows_why(staff_client):
    with (CARDS / "no_card.png").open("rb") as card:
        response = staff_client.post(reverse("admin:characters_character_import_card"), {"card": card})
    assert response.status_code == 200
    assert "no &#x27;chara&#x27; text chunk" in response.content.decode()
    assert "Nothing was imported" in response.content.decode()
    assert Character.objects.count() == 0


def test_admin_export_button_and_actions(staff_client):
    ada = character_card_import(raw=V2_JSON.read_bytes()).character
    Character.objects.create(name="Tom", slug="tom", description="A sailor.")
    page = staff_client.get(reverse("admin:characters_character_change", args=[ada.pk])).content.decode()
    json_url = reverse("admin:characters_character_export_card", args=[ada.pk, "json"])
    assert json_url in page

    response = staff_client.get(json_url)
    assert response["Content-Disposition"] == 'attachment; filename="ada-quint.json"'
    assert_same_card_data(json.loads(response.content)["data"], original_data())
    assert staff_client.get(reverse("admin:characters_character_export_card", args=[ada.pk, "gif"])).status_code == 404

    changelist = reverse("admin:characters_character_changelist")
    one = staff_client.post(changelist, {"action": "export_cards_png", "_selected_action": [ada.pk]})
    assert one["Content-Type"] == "image/png"
    both = staff_client.post(changelist, {"action": "export_cards_json",
                                          "_selected_action": list(Character.objects.values_list("pk", flat=True))})
    assert both["Content-Type"] == "application/zip"
    assert sorted(zipfile.ZipFile(io.BytesIO(both.content)).namelist()) == ["ada-quint.json", "tom.json"]


HOSTILE_JSON = [
    "[" * 100_000,  # nested past the stack
    '{"name": "a", "description": "x", "n": ' + "9" * 5000 + "}",  # an integer Python refuses to read
    '{"name": "a", "description": "x", "character_book": {"scan_depth": 1e400, "entries": []}}',  # inf
    '{"name": "a", "description": "x", "character_book": {"entries": [{"keys": ["k"], "content": "c", '
    '"priority": Infinity}]}}',
    '{"name": "a\\ud800", "description": "x"}',  # a lone surrogate no database encodes
    '{"name": "a", "description": "x\\u0000"}',  # NUL: PostgreSQL's text refuses it
]


@pytest.mark.parametrize("text", HOSTILE_JSON, ids=["deep", "long-int", "inf", "Infinity", "surrogate", "nul"])
def test_hostile_card_json_is_refused_as_a_bad_file_not_a_crash(text):
    """Each of these was a server error (RecursionError, ValueError, OverflowError, a database error)."""
    with pytest.raises(CardError):
        card_read(text.encode(), max_bytes=10_000_000)
    chunk = PngImagePlugin.PngInfo()
    chunk.add_text("chara", base64.b64encode(text.encode()).decode())
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG", pnginfo=chunk)
    with pytest.raises(CardError):
        card_read(png.getvalue(), max_bytes=10_000_000)


@pytest.mark.parametrize("text", [
    "[" * 100_000, '{"entries": {"0": {"uid": Infinity, "key": ["k"], "content": "c"}}}',
    '{"entries": {"0": {"uid": 0, "key": ["k"], "content": "c", "depth": NaN}}}',
    '{"entries": {"0": {"uid": 0, "key": ["k"], "content": "c", "comment": "\\ud800"}}}',
])
def test_hostile_world_info_json_is_refused_as_a_bad_file_not_a_crash(text):
    from characters.world_info_format import WorldInfoError, world_info_read

    with pytest.raises(WorldInfoError):
        world_info_read(text.encode(), max_entries=100)


def test_exporting_a_card_needs_the_scenario_permission_too(client):
    """A card carries the character's lorebook (its scenarios, with their World Info settings)."""
    from django.contrib.auth.models import Permission

    from tests.factories import make_user

    ada = character_card_import(raw=V2_JSON.read_bytes()).character
    editor = make_user("charonly", is_staff=True)
    editor.user_permissions.set(Permission.objects.filter(codename__in=["view_character", "change_character"]))
    client.force_login(editor)
    json_url = reverse("admin:characters_character_export_card", args=[ada.pk, "json"])
    changelist = reverse("admin:characters_character_changelist")
    assert json_url not in client.get(reverse("admin:characters_character_change", args=[ada.pk])).content.decode()
    assert "export_cards_json" not in client.get(changelist).content.decode()
    assert client.get(json_url).status_code == 403
    action = client.post(changelist, {"action": "export_cards_json", "_selected_action": [ada.pk]})
    assert action["Content-Type"].startswith("text/html")  # the list again ("No action selected"), no card
    editor.user_permissions.add(Permission.objects.get(codename="view_scenario"))
    assert json_url in client.get(reverse("admin:characters_character_change", args=[ada.pk])).content.decode()
    assert client.get(json_url)["Content-Type"] == "application/json"
    assert client.post(changelist, {"action": "export_cards_json",
                                    "_selected_action": [ada.pk]})["Content-Type"] == "application/json"


def _card_nested(depth: int) -> bytes:
    nested = "[" * depth + "]" * depth
    return ('{"spec": "chara_card_v2", "spec_version": "2.0", "data": {"name": "Deep", "description": "x", '
            '"extensions": {"deep": %s}}}' % nested).encode()


@pytest.mark.parametrize("depth", [900, 300])
def test_a_card_nested_deeper_than_can_be_stored_is_refused_as_a_bad_file(staff_client, depth):
    """Nested 900 deep, the card was read (json.loads had stack enough) but saving its extensions was a server
    error (json.dumps ran out of stack beneath the view)."""
    from django.core.files.uploadedfile import SimpleUploadedFile

    response = staff_client.post(reverse("admin:characters_character_import_card"),
                                 {"card": SimpleUploadedFile("deep.json", _card_nested(depth))})
    assert response.status_code == 200
    assert "nested too deeply" in response.content.decode()
    assert not Character.objects.filter(slug="deep").exists()


def test_a_card_nested_within_the_bound_imports_and_exports():
    character = character_card_import(raw=_card_nested(200)).character
    exported = json.loads(character_card_export(character=character, fmt="json").content)
    assert exported["data"]["extensions"]["deep"] == json.loads("[" * 200 + "]" * 200)
