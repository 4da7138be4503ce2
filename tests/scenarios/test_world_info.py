"""scenarios/world_info.py: SillyTavern's World Info rules as pure functions over unsaved scenarios."""

import random
from collections import Counter

import pytest

from chat.prompting.compose import depth_inserted
from scenarios.models import Scenario
from scenarios.world_info import character_filter_allows, world_info_select


def entry(pk, title, keywords="", **fields):
    values = {"content": f"{title} text.", "always_on": False, "priority": 100}
    return Scenario(pk=pk, title=title, keywords=keywords, **{**values, **fields})


def select(scenarios, *texts, **options):
    options.setdefault("scan_depth", 1)
    return world_info_select(scenarios=scenarios, texts=list(texts), **options)


def test_recursion_follows_texts_up_to_the_cap():
    chain = [entry(1, "A", "alpha", content="see beta"), entry(2, "B", "beta", content="see gamma"),
             entry(3, "C", "gamma", content="see delta"), entry(4, "D", "delta")]
    assert select(chain, "alpha", max_recursion=3).titles == ["A", "B", "C", "D"]
    assert select(chain, "alpha", max_recursion=1).titles == ["A", "B"]
    assert select(chain, "alpha", max_recursion=0).titles == ["A"]
    match = select(chain, "alpha").matches[1]
    assert (match.trigger, match.recursion_from) == ("recursion", "A")


def test_never_triggers_others_and_cannot_be_triggered_by_others():
    quiet = [entry(1, "A", "alpha", content="see beta", prevent_recursion=True), entry(2, "B", "beta")]
    assert select(quiet, "alpha").titles == ["A"]
    shy = [entry(1, "A", "alpha", content="see beta"), entry(2, "B", "beta", exclude_recursion=True)]
    assert select(shy, "alpha").titles == ["A"]
    assert select(shy, "alpha and beta").titles == ["A", "B"]  # the chat itself still fires it


def test_budget_takes_constant_entries_first_then_higher_order_and_stops_when_spent():
    scenarios = [entry(1, "Low", "x", priority=10), entry(2, "High", "x", priority=90),
                 entry(3, "Const", always_on=True, priority=1), entry(4, "Mid", "x", priority=50)]
    chosen = select(scenarios, "x", budget=30, cost=lambda scenario: 10)
    assert chosen.titles == ["Const", "High", "Mid"]
    assert [(s.title, why.rsplit(", but ", 1)[1]) for s, why in chosen.left_out] == [("Low", "over the token budget")]
    # Once one does not fit, nothing more fires, not even a smaller one.
    sizes = {"Const": 10, "High": 25, "Mid": 1, "Low": 1}
    chosen = select(scenarios, "x", budget=30, cost=lambda scenario: sizes[scenario.title])
    assert chosen.titles == ["Const"]


def test_probability_rolls_with_the_seeded_generator():
    rare = [entry(1, "Rare", "x", probability=30)]
    fired = sum(bool(select(rare, "x", rng=random.Random(seed)).titles) for seed in range(400))
    assert 80 < fired < 160  # about 30 %
    assert select(rare, "x", rng=random.Random(1)).titles == select(rare, "x", rng=random.Random(1)).titles
    assert select([entry(1, "Never", "x", probability=0)], "x").titles == []


def test_inclusion_group_by_weight_by_priority_and_one_per_group():
    group = [entry(1, "Heavy", "x", inclusion_group="g", group_weight=300), entry(2, "Light", "x", inclusion_group="g")]
    wins = Counter(select(group, "x", rng=random.Random(seed)).titles[0] for seed in range(400))
    assert set(wins) == {"Heavy", "Light"} and 250 < wins["Heavy"] < 350
    ranked = [entry(1, "A", "x", inclusion_group="g", group_prioritize=True, priority=10),
              entry(2, "B", "x", inclusion_group="g", group_prioritize=True, priority=20),
              entry(3, "C", "x", inclusion_group="g", group_weight=1000, priority=99)]
    assert select(ranked, "x").titles == ["B"]
    # A group that already has an entry from the chat takes none from recursion.
    later = [entry(1, "A", "x", inclusion_group="g", content="see y"), entry(2, "B", "y", inclusion_group="g")]
    assert select(later, "x").titles == ["A"]


def test_sticky_holds_then_cooldown_blocks_then_it_may_fire_again():
    storm = [entry(1, "Storm", "storm", sticky=2, cooldown=1)]
    state, fired = {}, []
    for count, text in [(1, "storm"), (2, "calm"), (3, "calm"), (4, "storm"), (5, "storm")]:
        chosen = select(storm, text, message_count=count, state=state)
        state = chosen.state
        fired.append(bool(chosen.titles))
    assert fired == [True, True, True, False, True]


def test_a_sticky_entry_wins_its_group_and_skips_its_roll():
    state = {"1": {"at": 1, "sticky_until": 3, "cooldown_until": 3}}
    group = [entry(1, "Old", "x", inclusion_group="g", probability=1),
             entry(2, "New", "x", inclusion_group="g", group_prioritize=True, priority=999)]
    assert select(group, "x", message_count=2, state=state).titles == ["Old"]


def test_delay_until_message_n():
    late = [entry(1, "Late", "x", delay=5)]
    assert select(late, "x", message_count=4).titles == []
    assert select(late, "x", message_count=5).titles == ["Late"]


def test_records_from_this_message_on_are_ignored():
    """A regenerated reply, or another branch at the same message count, does not see its own record."""
    storm = [entry(1, "Storm", "storm", cooldown=5)]
    state = {"1": {"at": 3, "sticky_until": 3, "cooldown_until": 8}}
    assert select(storm, "storm", message_count=3, state=state).titles == ["Storm"]
    assert select(storm, "storm", message_count=4, state=state).titles == []


def test_character_filter_only_for_and_not_for():
    class Character:
        name, slug = "Ada", "ada"

    only = entry(1, "Only", character_filter="ada, Bob")
    never = entry(2, "Never", character_filter="Ada", character_filter_exclude=True)
    assert character_filter_allows(only, Character) and not character_filter_allows(only, None)
    assert not character_filter_allows(never, Character) and character_filter_allows(never, None)


def test_whole_words_case_and_regex_keys():
    assert select([entry(1, "W", "cat")], "concatenate").titles == []
    assert select([entry(1, "W", "cat", whole_words=False)], "concatenate").titles == ["W"]
    assert select([entry(1, "C", "Orla", case_sensitive=True)], "orla").titles == []
    assert select([entry(1, "R", "/dragons? (eggs?|hoard)/i")], "A DRAGON HOARD").titles == ["R"]
    assert select([entry(1, "R", "/dragon/")], "Dragon").titles == []
    assert select([entry(1, "R", "/(unclosed/")], "(unclosed").titles == []


def test_depth_insertion_with_roles():
    chat = [{"role": "user", "content": "u1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "u2"}]
    result = depth_inserted(chat, [(0, "system", "end"), (1, "user", "one"), (1, "system", "sys"), (9, "assistant", "top"),
                                   (1, "system", "more")])
    assert [m["content"] for m in result] == ["top", "u1", "a1", "sys\n\nmore", "one", "u2", "end"]
    assert result[0]["role"] == "assistant" and result[4]["role"] == "user"


def test_a_malformed_regex_key_is_refused_when_saved():
    import pytest
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError) as error:
        entry(1, "Bad", "/(unclosed/").clean()
    assert "not a valid regular expression" in str(error.value)


def test_a_catastrophic_regex_key_runs_out_of_time_and_does_not_match(caplog):
    # /(a+)+$/ against "aaaa…!" backtracks exponentially under Python's re; the search must give up.
    evil = entry(1, "Evil", "/(a+)+$/")
    with caplog.at_level("WARNING", logger="llmsite.scenarios"):
        assert select([evil], "a" * 5000 + "!").titles == []
        assert select([evil], "a" * 5000 + "!").titles == []
    assert sum("ran out of time" in record.message for record in caplog.records) == 1  # logged once
    assert select([evil], "aaa").titles == ["Evil"]  # a short text still matches


def test_a_regex_key_keeps_its_commas_and_may_be_long():
    from characters.world_info_format import scenario_fields_from_world_info
    from scenarios.keys import split_keywords

    assert split_keywords("/a{1,3}/, cat, /x,y/i") == ["/a{1,3}/", "cat", "/x,y/i"]
    counted = entry(1, "Counted", "/^a{2,3}$/, cat")
    assert counted.keyword_list == ["/^a{2,3}$/", "cat"]
    assert select([counted], "aa").titles == ["Counted"] and select([counted], "aaaa").titles == []
    long_regex = "/" + "|".join(f"word{n}" for n in range(30)) + "/"
    fields = scenario_fields_from_world_info({"uid": 1, "key": ["/a{1,3}/", long_regex, "x" * 101],
                                              "content": "c"})
    assert split_keywords(fields["keywords"]) == ["/a{1,3}/", long_regex]  # a plain key over 100 is still left out


@pytest.mark.parametrize(("logic", "fires_with"), [
    (Scenario.SelectiveLogic.AND_ANY, {"one", "both"}),
    (Scenario.SelectiveLogic.NOT_ALL, {"none", "one"}),
    (Scenario.SelectiveLogic.NOT_ANY, {"none"}),
    (Scenario.SelectiveLogic.AND_ALL, {"both"}),
])
def test_selective_logic_decides_by_the_secondary_keywords(logic, fires_with):
    chats = {"none": "the ship", "one": "the ship at night", "both": "the ship at night in fog"}
    scenario = entry(1, "Ship", "ship", secondary_keywords="night, fog", selective_logic=logic)
    fired = {name for name, text in chats.items() if select([scenario], text).titles}
    assert fired == fires_with
    # The same logic in the recursion path: Harbor's text mentions the ship.
    harbor = entry(2, "Harbor", "harbor", content="A ship waits.")
    fired = {name for name, text in chats.items()
             if "Ship" in select([harbor, entry(1, "Ship", "ship", secondary_keywords="night, fog",
                                                selective_logic=logic)], text.replace("the ship", "harbor")).titles}
    assert fired == fires_with
