"""A card's character_book with SillyTavern's World Info settings in its entries' extensions: imported into
the scenario fields, exported back unchanged, and editors' changes reach the export."""

import json

import pytest

from characters.card_services import character_card_data, character_card_import
from scenarios.models import Scenario

pytestmark = pytest.mark.django_db

WORLD_INFO_EXTENSIONS = {
    "position": 4, "depth": 2, "role": 1, "probability": 40, "useProbability": True, "group": "weather",
    "group_weight": 50, "group_override": True, "sticky": 3, "cooldown": 1, "delay": 2,
    "exclude_recursion": True, "prevent_recursion": True, "match_whole_words": False, "case_sensitive": True,
    "character_filter": {"isExclude": True, "names": ["Bob"], "tags": []}, "automation_id": "", "selectiveLogic": 2,
}


def card() -> dict:
    entries = [
        {"keys": ["fog"], "content": "Fog hides the rocks.", "extensions": dict(WORLD_INFO_EXTENSIONS),
         "enabled": True, "insertion_order": 60, "case_sensitive": True, "name": "Fog", "priority": 60,
         "id": 1, "comment": "Fog", "selective": False, "secondary_keys": [], "constant": False,
         "position": "after_char"},
        {"keys": ["examples"], "content": "Before the examples.", "extensions": {"position": 5, "probability": 100,
                                                                               "useProbability": False},
         "enabled": True, "insertion_order": 10, "name": "Early", "id": 2, "position": "after_char"},
    ]
    data = {"name": "Ada", "description": "Keeps the lighthouse.", "personality": "", "scenario": "",
            "first_mes": "", "mes_example": "", "creator_notes": "", "system_prompt": "",
            "post_history_instructions": "", "alternate_greetings": [], "tags": [], "creator": "",
            "character_version": "", "extensions": {},
            "character_book": {"name": "Ada's book", "extensions": {}, "entries": entries}}
    return {"spec": "chara_card_v2", "spec_version": "2.0", "data": data}


def test_world_info_settings_of_a_character_book_import_into_the_scenario():
    character_card_import(raw=json.dumps(card()).encode())
    fog = Scenario.objects.get(title="Fog")
    assert (fog.position, fog.depth, fog.depth_role, fog.probability) == ("at_depth", 2, "user", 40)
    assert (fog.inclusion_group, fog.group_weight, fog.group_prioritize) == ("weather", 50, True)
    assert (fog.sticky, fog.cooldown, fog.delay) == (3, 1, 2)
    assert fog.exclude_recursion and fog.prevent_recursion and not fog.whole_words and fog.case_sensitive
    assert (fog.character_filter, fog.character_filter_exclude, fog.selective_logic) == ("Bob", True, 2)
    early = Scenario.objects.get(title="Early")
    assert (early.position, early.probability) == ("before_examples", 100)


def test_the_character_book_round_trips_unchanged():
    original = card()
    ada = character_card_import(raw=json.dumps(original).encode()).character
    exported = character_card_data(character=ada)
    assert exported["character_book"] == original["data"]["character_book"]


def test_edits_reach_the_exported_extensions():
    ada = character_card_import(raw=json.dumps(card()).encode()).character
    Scenario.objects.filter(title="Fog").update(sticky=0, depth_role="assistant", position="after_examples",
                                                character_filter="Bob, Cy")
    Scenario.objects.filter(title="Early").update(probability=25)
    fog, early = character_card_data(character=ada)["character_book"]["entries"]
    extensions = fog["extensions"]
    assert (extensions["sticky"], extensions["role"], extensions["position"]) == (0, 2, 6)
    assert extensions["character_filter"]["names"] == ["Bob", "Cy"] and extensions["cooldown"] == 1
    assert (early["extensions"]["probability"], early["extensions"]["useProbability"]) == (25, True)


def test_a_scenario_made_in_the_admin_exports_its_world_info_settings():
    ada = character_card_import(raw=json.dumps(card()).encode()).character
    Scenario.objects.create(title="New", character=ada, content="New text.", keywords="new", position="at_depth",
                            depth=0, depth_role="user", sticky=2, inclusion_group="g")
    entry = character_card_data(character=ada)["character_book"]["entries"][-1]
    assert entry["position"] == "after_char"
    assert {k: entry["extensions"][k] for k in ("position", "depth", "role", "sticky", "group")} == \
        {"position": 4, "depth": 0, "role": 1, "sticky": 2, "group": "g"}
