"""scenarios/selectors.py: which scenarios fire for a chat, in which order, and why."""

import pytest

from scenarios.selectors import (
    ScenarioMatch,
    get_relevant_scenario,
    scenario_relevance,
    scenarios_available,
    scenarios_matching,
    scenarios_within_budget,
)
from tests.factories import make_character, make_scenario

pytestmark = pytest.mark.django_db


def titles(matches):
    return [match.scenario.title for match in matches]


def match_for(character, *texts, **options):
    return scenarios_matching(character=character, texts=list(texts), **options)


# --- keyword rules ---------------------------------------------------------------------------------


def test_keyword_in_the_users_message_fires_with_a_reason():
    mira = make_character()
    make_scenario("Storm", character=mira, keywords="storm, hurricane")
    [match] = match_for(mira, "Is a storm coming?")
    assert match.scenario.title == "Storm"
    assert match.reason == "keyword 'storm' in the user's message"
    assert match.keyword_hits == 1


def test_whole_words_by_default_and_substrings_when_whole_words_is_off():
    mira = make_character()
    make_scenario("Whole", character=mira, keywords="storm")
    make_scenario("Part", character=mira, keywords="storm", whole_words=False)
    assert titles(match_for(mira, "Let us brainstorm, it is stormy")) == ["Part"]
    assert sorted(titles(match_for(mira, "A storm!"))) == ["Part", "Whole"]


def test_keywords_with_punctuation_match_as_whole_words():
    mira = make_character()
    make_scenario("Cpp", character=mira, keywords="c++")
    assert titles(match_for(mira, "I write c++ daily")) == ["Cpp"]
    assert titles(match_for(mira, "I write c++x daily")) == []


def test_case_insensitive_unless_case_sensitive():
    mira = make_character()
    make_scenario("Loose", character=mira, keywords="Storm")
    make_scenario("Strict", character=mira, keywords="Storm", case_sensitive=True)
    assert titles(match_for(mira, "a STORM")) == ["Loose"]
    assert sorted(titles(match_for(mira, "a Storm"))) == ["Loose", "Strict"]


def test_secondary_keywords_must_match_too():
    byte = make_character("byte")
    make_scenario("Printer", character=byte, keywords="printer, print", secondary_keywords="broken, jammed")
    assert match_for(byte, "Where is the printer?", bm25_threshold=1.1) == []
    [match] = match_for(byte, "The printer is jammed")
    assert match.reason == "keyword 'printer' in the user's message, with secondary keyword 'jammed'"
    # A secondary keyword in an earlier scanned message counts as well.
    assert titles(match_for(byte, "It's broken again.", "Can you look at the printer?")) == ["Printer"]


def test_a_scenario_rejected_by_its_secondary_keywords_stays_out_of_the_text_fallback():
    byte = make_character("byte")
    make_scenario("Printer", character=byte, keywords="printer", secondary_keywords="broken",
                  content="The printer on floor two jams; press the green button.")
    assert match_for(byte, "printer on floor two", bm25_threshold=0.01) == []


def test_scan_depth_limits_which_recent_messages_count(settings):
    mira = make_character()
    make_scenario("Treasure", character=mira, keywords="treasure")
    history = ["Tell me about the treasure.", "It is buried.", "Where?", "On the island.", "And then?"]
    settings.SCENARIO_SCAN_DEPTH = 5
    [match] = match_for(mira, *history)
    assert match.reason == "keyword 'treasure' in a recent message"
    settings.SCENARIO_SCAN_DEPTH = 4
    assert match_for(mira, *history, bm25_threshold=1.1) == []
    # An explicit argument wins over the setting; depth 0 still scans the user's own message.
    assert titles(match_for(mira, *history, "treasure!", scan_depth=0)) == ["Treasure"]


def test_always_on_fires_whatever_the_chat_says():
    mira = make_character()
    make_scenario("Ship", character=mira, always_on=True)
    [match] = match_for(mira, "Good morning")
    assert match.reason == "always on"


def test_only_enabled_scenarios_of_the_character_and_global_ones():
    mira, other = make_character("mira"), make_character("other")
    make_scenario("Mine", character=mira, keywords="storm")
    make_scenario("Global", keywords="storm")
    make_scenario("Theirs", character=other, keywords="storm")
    make_scenario("Off", character=mira, keywords="storm", enabled=False)
    assert titles(match_for(mira, "storm")) == ["Mine", "Global"]
    assert titles(match_for(None, "storm")) == ["Global"]
    assert [s.title for s in scenarios_available(character=mira)] == ["Mine", "Global"]


def test_rank_character_first_then_keyword_hits_then_priority():
    mira = make_character()
    make_scenario("Global, high priority, many hits", keywords="storm, wind, rain", priority=999)
    make_scenario("Own, low priority", character=mira, keywords="storm", priority=1)
    make_scenario("Own, two hits", character=mira, keywords="storm, wind", priority=1)
    make_scenario("Own, high priority", character=mira, keywords="storm", priority=500)
    assert titles(match_for(mira, "storm, wind and rain")) == [
        "Own, two hits", "Own, high priority", "Own, low priority", "Global, high priority, many hits"]


def test_budget_keeps_rank_order_and_skips_what_does_not_fit():
    mira = make_character()
    big = make_scenario("Big", character=mira, content="x" * 300)
    small = make_scenario("Small", content="x" * 50)
    first = make_scenario("First", character=mira, content="x" * 100)
    matches = [ScenarioMatch(scenario=s, reason="test") for s in (first, big, small)]
    inserted, left_out = scenarios_within_budget(matches=matches, cost=lambda s: len(s.content), budget=200)
    assert [m.scenario for m in inserted] == [first, small]
    assert [m.scenario for m in left_out] == [big]


def test_budget_defaults_to_the_setting(settings):
    scenario = make_scenario("One", content="x" * 10)
    matches = [ScenarioMatch(scenario=scenario, reason="test")]
    settings.SCENARIO_TOKEN_BUDGET = 9
    assert scenarios_within_budget(matches=matches, cost=lambda s: len(s.content)) == ([], matches)


# --- BM25 fallback --------------------------------------------------------------------------------


def seaside(mira):
    make_scenario("A storm is coming", character=mira, keywords="storm, hurricane",
                  content="Black clouds are gathering; Mira orders the sails reefed and the hatches battened.")
    make_scenario("Treasure", character=mira, keywords="treasure, gold",
                  content="Mira keeps half of an old map in her coat; her rival Brisk stole the other half.")
    make_scenario("Kitchen safety", keywords="knife, fire",
                  content="Keep knives pointed down and a lid nearby to smother a grease fire.")


def test_without_any_keyword_text_relevance_finds_the_scenario():
    mira = make_character()
    seaside(mira)
    [match] = match_for(mira, "The clouds look dark, should we reef the sails?")
    assert match.scenario.title == "A storm is coming"
    assert match.reason.startswith("text relevance ") and match.reason.endswith("(no keyword matched)")
    assert 0.3 <= match.relevance <= 1.0
    assert get_relevant_scenario(character=mira, user_prompt="Who stole the other half of the map?").title == \
        "Treasure"


def test_text_relevance_threshold(settings):
    mira = make_character()
    seaside(mira)
    message = "The clouds look dark, should we reef the sails?"
    [score, *_] = scenario_relevance(scenarios=scenarios_available(character=mira), text=message)
    settings.SCENARIO_BM25_THRESHOLD = score + 0.01
    assert match_for(mira, message) == []
    settings.SCENARIO_BM25_THRESHOLD = score - 0.01
    assert titles(match_for(mira, message)) == ["A storm is coming"]


def test_small_talk_finds_nothing():
    mira = make_character()
    seaside(mira)
    for message in ("Hello there!", "What's your favourite food?", "I love you", ""):
        assert match_for(mira, message) == [], message


def test_text_relevance_is_only_a_fallback_when_no_keyword_matched():
    mira = make_character()
    seaside(mira)
    # "gold" fires Treasure by keyword; the storm words do not add the storm scenario by relevance.
    assert titles(match_for(mira, "Dark clouds gather over the sails, and the gold?")) == ["Treasure"]


def test_always_on_does_not_prevent_the_fallback():
    mira = make_character()
    seaside(mira)
    make_scenario("Ship", character=mira, always_on=True)
    assert titles(match_for(mira, "The clouds look dark, should we reef the sails?")) == ["A storm is coming", "Ship"]


def test_get_relevant_scenario_is_the_top_match_or_none():
    mira = make_character()
    make_scenario("Low", character=mira, keywords="storm", priority=1)
    make_scenario("High", character=mira, keywords="storm", priority=9)
    assert get_relevant_scenario(character=mira, user_prompt="storm").title == "High"
    assert get_relevant_scenario(character=mira, user_prompt="calm", history=["hi"]) is None
