"""The import_resources command: idempotent, reports what it did, survives malformed blocks."""

from io import StringIO

import pytest
from django.conf import settings
from django.core.management import call_command

from characters.models import Character
from scenarios.models import Scenario

pytestmark = pytest.mark.django_db


def run_import(tmp_path, profiles: str | None = None, scenarios: str | None = None):
    profiles_path = tmp_path / "profiles.txt"
    scenarios_path = tmp_path / "scenarios.txt"
    profiles_path.write_text(profiles if profiles is not None else "")
    scenarios_path.write_text(scenarios if scenarios is not None else "")
    out, err = StringIO(), StringIO()
    call_command("import_resources", profiles=str(profiles_path), scenarios=str(scenarios_path), stdout=out, stderr=err)
    return out.getvalue(), err.getvalue()


def test_demo_resources_import_and_second_run_changes_nothing():
    out = StringIO()
    call_command("import_resources", stdout=out, stderr=StringIO())
    assert Character.objects.count() >= 3
    assert Scenario.objects.filter(character__isnull=False).exists()
    assert Scenario.objects.filter(character__isnull=True).exists()
    counts = (Character.objects.count(), Scenario.objects.count())
    out = StringIO()
    call_command("import_resources", stdout=out, stderr=StringIO())
    assert (Character.objects.count(), Scenario.objects.count()) == counts
    assert "0 created, 0 updated" in out.getvalue()
    assert settings.RESOURCES_DIR.joinpath("character_profiles.txt").exists()


PROFILE = """\
# a comment
=== Captain Mira
slug: mira
tags: pirate, sea
temperature: 0.8
--- description
A bold captain.

She sails the isles.
--- greeting
Ahoy, {{user}}!
"""


def test_profile_fields_and_multiline_sections(tmp_path):
    out, err = run_import(tmp_path, PROFILE)
    mira = Character.objects.get(slug="mira")
    assert mira.name == "Captain Mira"
    assert mira.description == "A bold captain.\n\nShe sails the isles."
    assert mira.greeting == "Ahoy, {{user}}!"
    assert mira.tag_list == ["pirate", "sea"]
    assert mira.temperature == 0.8
    assert "1 created" in out and err == ""


def test_alternate_greeting_sections_become_the_alternate_greetings_in_file_order(tmp_path):
    text = PROFILE + "--- alternate_greeting\nBack again, {{user}}?\n--- alternate_greeting\n\n--- alternate_greeting\nFair winds!\n"
    out, err = run_import(tmp_path, text)
    mira = Character.objects.get(slug="mira")
    assert mira.alternate_greetings == ["Back again, {{user}}?", "Fair winds!"]  # the empty one is left out
    assert mira.greeting == "Ahoy, {{user}}!" and "1 created" in out and err == ""
    out, _ = run_import(tmp_path, text)
    assert "1 unchanged" in out


def test_other_sections_still_may_appear_only_once(tmp_path):
    out, err = run_import(tmp_path, PROFILE + "--- greeting\nAhoy again!\n")
    assert not Character.objects.filter(slug="mira").exists()
    assert "section 'greeting' appears twice" in out + err


def test_edited_profile_updates_the_character_not_duplicates(tmp_path):
    run_import(tmp_path, PROFILE)
    out, _ = run_import(tmp_path, PROFILE.replace("A bold captain.", "A fearless captain."))
    assert Character.objects.filter(slug="mira").count() == 1
    assert Character.objects.get(slug="mira").description.startswith("A fearless captain.")
    assert "1 updated" in out and "updated: Captain Mira" in out


def test_malformed_block_is_reported_with_its_line_and_the_rest_imports(tmp_path):
    text = PROFILE + """
=== Broken Bob
slug: bob
temperature: very hot
--- description
Bob.

=== Nameless
--- personality
No description here.

=== Good Gail
--- description
Gail is fine.
"""
    out, err = run_import(tmp_path, text)
    assert set(Character.objects.values_list("slug", flat=True)) == {"mira", "good-gail"}
    assert "Broken Bob (line 15: temperature must be a float, got 'very hot')" in err
    assert "Nameless" in err and "description" in err
    assert "2 created" in out and "2 skipped with errors" in out


def test_unknown_field_and_text_outside_a_block(tmp_path):
    text = "stray text\n=== Ann\nslug: ann\nmood: happy\n--- description\nAnn.\n"
    _, err = run_import(tmp_path, text)
    assert "line 1: text outside a block" in err
    assert "line 4: unknown field 'mood'" in err
    assert not Character.objects.exists()


SCENARIOS = """\
=== A storm
character: mira
keywords: storm, squall
priority: 200
--- content
Clouds gather.

=== Fire safety
keywords: fire
--- content
Keep a lid nearby.

=== Ghost
character: nobody
keywords: ghost
--- content
Boo.

=== Empty keywords
--- content
Never fires.
"""


def test_scenarios_link_to_characters_and_report_problems(tmp_path):
    out, err = run_import(tmp_path, PROFILE, SCENARIOS)
    storm = Scenario.objects.get(title="A storm")
    assert storm.character.slug == "mira" and storm.priority == 200 and storm.keyword_list == ["storm", "squall"]
    assert Scenario.objects.get(title="Fire safety").character is None
    assert "no character with slug 'nobody'" in err
    assert "Empty keywords" in err and "never fires" in err
    out, _ = run_import(tmp_path, PROFILE, SCENARIOS.replace("Clouds gather.", "Thunder rolls."))
    assert Scenario.objects.filter(title="A storm").count() == 1
    assert Scenario.objects.get(title="A storm").content == "Thunder rolls."
    assert "Scenarios: 0 created, 1 updated, 1 unchanged" in out


def test_scan_depth_and_position_fields(tmp_path):
    profiles = PROFILE.replace("temperature: 0.8\n", "temperature: 0.8\nscan_depth: 6\n")
    scenarios = ("=== Deep\ncharacter: mira\nkeywords: reef\nscan_depth: 2\nposition: before_char\n"
                 "--- content\nA reef.\n\n=== Bad place\nkeywords: x\nposition: middle\n--- content\nX.\n")
    _, err = run_import(tmp_path, profiles, scenarios)
    assert Character.objects.get(slug="mira").scan_depth == 6
    deep = Scenario.objects.get(title="Deep")
    assert (deep.scan_depth, deep.position) == (2, "before_char")
    assert "Bad place" in err and "position" in err
