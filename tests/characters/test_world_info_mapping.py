"""World Info import and export (characters/world_info_services.py) field by field: what each SillyTavern field
becomes in the scenario, an admin-made scenario through export and import, entries matched by uid within
their file, uids renumbered where they collide, the file's name kept, and the cap on entries per import."""

import json

import pytest

from characters.world_info_services import WorldInfoError, world_info_export, world_info_import
from scenarios.models import Scenario
from tests.factories import make_character, make_scenario

pytestmark = pytest.mark.django_db

ENTRIES = {
    "3": {"uid": 3, "comment": "Fog", "key": ["fog", "/mist(s){0,1}/i"], "keysecondary": ["night", "cold"],
          "content": "Fog hides the rocks.", "constant": False, "selective": True, "selectiveLogic": 3,
          "order": 40, "position": 4, "depth": 2, "role": 2, "probability": 35, "useProbability": True,
          "group": "weather, sea", "groupWeight": 250, "groupOverride": True, "sticky": 2, "cooldown": 3, "delay": 4,
          "excludeRecursion": True, "preventRecursion": True, "caseSensitive": True, "matchWholeWords": False,
          "scanDepth": 6, "disable": True, "characterFilter": {"isExclude": True, "names": ["Bob", "Eve"], "tags": []}},
    "7": {"uid": 7, "comment": "Sea", "key": [], "keysecondary": ["ignored"], "content": "The sea.",
          "constant": True, "selective": False, "selectiveLogic": 2, "order": 5, "position": 6,
          "probability": 80, "useProbability": False},
}


def raw(entries=ENTRIES, **top) -> bytes:
    return json.dumps({**top, "entries": entries}).encode()


def fields(scenario) -> dict:
    return {name: getattr(scenario, name) for name in (
        "title", "content", "keyword_list", "secondary_keyword_list", "selective_logic", "always_on", "priority",
        "enabled", "case_sensitive", "whole_words", "scan_depth", "position", "depth", "depth_role", "probability",
        "group_list", "group_weight", "group_prioritize", "sticky", "cooldown", "delay", "exclude_recursion",
        "prevent_recursion", "character_filter_list", "character_filter_exclude")}


def test_each_world_info_field_lands_in_its_scenario_field():
    world_info_import(raw=raw(), file_name="coast.json")
    assert fields(Scenario.objects.get(title="Fog")) == {
        "title": "Fog", "content": "Fog hides the rocks.", "keyword_list": ["fog", "/mist(s){0,1}/i"],
        "secondary_keyword_list": ["night", "cold"], "selective_logic": 3, "always_on": False, "priority": 40,
        "enabled": False, "case_sensitive": True, "whole_words": False, "scan_depth": 6, "position": "at_depth",
        "depth": 2, "depth_role": "assistant", "probability": 35, "group_list": ["weather", "sea"],
        "group_weight": 250, "group_prioritize": True, "sticky": 2, "cooldown": 3, "delay": 4,
        "exclude_recursion": True, "prevent_recursion": True, "character_filter_list": ["Bob", "Eve"],
        "character_filter_exclude": True}
    sea = fields(Scenario.objects.get(title="Sea"))
    # Not selective: no secondary keys; no useProbability: always; the defaults where the entry says nothing.
    assert {name: sea[name] for name in ("secondary_keyword_list", "always_on", "priority", "position",
                                         "probability", "depth", "depth_role", "whole_words", "case_sensitive",
                                         "enabled", "character_filter_list")} == {
        "secondary_keyword_list": [], "always_on": True, "priority": 5, "position": "after_examples",
        "probability": 100, "depth": 4, "depth_role": "system", "whole_words": True, "case_sensitive": False,
        "enabled": True, "character_filter_list": []}


def test_an_admin_made_scenario_exports_and_imports_with_the_same_fields():
    ada = make_character("ada", name="Ada")
    made = make_scenario("Wreck", character=ada, keywords="wreck, /a{1,3}rgh/", secondary_keywords="storm",
                         selective_logic=1, priority=33, case_sensitive=True, whole_words=False, scan_depth=3,
                         position="before_examples", depth=7, depth_role="user", probability=45,
                         inclusion_group="ships", group_weight=20, group_prioritize=True, sticky=1, cooldown=2,
                         delay=3, exclude_recursion=True, prevent_recursion=True, character_filter="Ada",
                         character_filter_exclude=True, enabled=False)
    exported = world_info_export(scenarios=[made], name="Ada")
    assert json.loads(exported)["name"] == "Ada"
    bob = make_character("bob", name="Bob")
    [again] = world_info_import(raw=exported, character=bob).created
    assert fields(again) == fields(made)


def test_entries_are_matched_by_uid_within_their_file_not_by_title():
    twins = {"0": {"uid": 0, "comment": "Twin", "key": ["a"], "content": "first"},
             "1": {"uid": 1, "comment": "Twin", "key": ["b"], "content": "second"}}
    assert len(world_info_import(raw=raw(twins, name="Book")).created) == 2  # same comment: still two
    twins["1"]["content"] = "second, edited"
    result = world_info_import(raw=raw(twins, name="Book"))
    assert (len(result.created), len(result.updated)) == (0, 2)
    assert sorted(Scenario.objects.values_list("content", flat=True)) == ["first", "second, edited"]
    # Another file with the same uids makes its own scenarios.
    assert len(world_info_import(raw=raw(twins), file_name="other.json").created) == 2


def test_colliding_uids_are_renumbered_on_export_and_the_name_is_kept():
    world_info_import(raw=raw({"0": {"uid": 0, "key": ["a"], "content": "A"}}, name="First"))
    world_info_import(raw=raw({"0": {"uid": 0, "key": ["b"], "content": "B"}}, name="Second"))
    make_scenario("Made here", keywords="c")
    exported = json.loads(world_info_export(scenarios=Scenario.objects.order_by("id"), name="Global"))
    assert exported["name"] == "Global"  # two files' scenarios: the name given
    assert {key: entry["content"] for key, entry in exported["entries"].items()} == {
        "0": "A", "1": "B", "2": "Made here content."}
    assert all(int(key) == entry["uid"] for key, entry in exported["entries"].items())
    one_book = json.loads(world_info_export(scenarios=Scenario.objects.filter(content="A"), name="Global"))
    assert one_book["name"] == "First"


def test_a_file_with_too_many_entries_is_refused_whole(settings):
    settings.WORLD_INFO_MAX_ENTRIES = 3
    entries = {str(n): {"uid": n, "key": [f"k{n}"], "content": "x"} for n in range(4)}
    with pytest.raises(WorldInfoError, match="4 entries; at most 3"):
        world_info_import(raw=raw(entries))
    assert not Scenario.objects.exists()
    assert len(world_info_import(raw=raw(dict(list(entries.items())[:3]))).created) == 3
