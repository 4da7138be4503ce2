"""A SillyTavern World Info file over a scripted six-turn conversation: the entries that fire each turn
are those of a table written by hand from SillyTavern's documented rules (docs/PROMPTS.md), and the file
round-trips through import and export unchanged.

The file (tests/fixtures/world_info/saltmere.json), its entries' orders in brackets:
- Sea [1]: constant.
- Harbor [100]: "harbor"; its text names the lighthouse (recursion).
- Lighthouse [50]: "lighthouse"; at depth 2 as a system message; its text names Orla.
- Orla [10]: "Orla", case-sensitive, cannot be triggered by others.
- Storm [80]: "storm", before the profile, sticky 2, cooldown 2, never triggers others (its text says "tavern").
- Fog [60], Rain [40]: "weather", inclusion group "weather", prioritized; Calm [90]: "weather", same group,
  by weight (300) only.
- Rumor [30]: "tavern", probability 50.
- Ghost ship [70]: "ship", delay 7.
- Coins [20]: the regex key /gold(en)? coins?/i, after the example dialogue.

The scan depth is 1 (the user's new message only); turn k is evaluated at message 2k-1. Probability rolls
come from random.Random(f"lore:{message}") (the `seed` argument): 58.58 at message 3, 41.79 at message 9.
"""

import json
import random
from pathlib import Path

import pytest

from characters.world_info_services import world_info_export, world_info_import
from chat.prompting import prompt_compose
from scenarios.models import Scenario

pytestmark = [pytest.mark.django_db, pytest.mark.smollm2]

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "world_info" / "saltmere.json"

TURNS = [
    "We sail into the harbor as a storm rises.",
    "Tell me about the weather and the tavern.",
    "The storm again! Is Orla here? I found golden coins on a ship.",
    "Another storm, a ship on the horizon, and orla waves.",
    "We rest in the tavern.",
    "The storm is over; we look at the lighthouse.",
]

# Turn -> (entries inserted, entries triggered but held back), derived by hand:
EXPECTED = [
    # message 1: Sea is constant; harbor, storm by key; Harbor's text fires Lighthouse (recursion);
    # Lighthouse's text names Orla, who cannot be triggered by others; Storm's "tavern" never triggers.
    ({"Sea", "Harbor", "Storm", "Lighthouse"}, set()),
    # message 3: Storm is sticky (fired at 1, held through 1+2=3); "weather" fires Fog, Rain and Calm:
    # the prioritized ones win over Calm, and of those Fog has the higher order; Rumor rolls 58.58 >= 50.
    ({"Sea", "Storm", "Fog"}, {"Rain", "Calm", "Rumor"}),
    # message 5: Storm cools down (messages 4..5); "Orla" matches case-sensitively; the regex finds
    # "golden coins"; Ghost ship is delayed until message 7.
    ({"Sea", "Orla", "Coins"}, {"Storm", "Ghost ship"}),
    # message 7: Storm fires again by key (its cooldown is over), Ghost ship's delay is over; "orla" in
    # lower case does not match the case-sensitive key.
    ({"Sea", "Storm", "Ghost ship"}, set()),
    # message 9: Storm is sticky (fired at 7, held through 9); Rumor rolls 41.79 < 50.
    ({"Sea", "Storm", "Rumor"}, set()),
    # message 11: Storm cools down (messages 10..11); "lighthouse" fires Lighthouse by key.
    ({"Sea", "Lighthouse"}, {"Storm"}),
]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from chat.engines import get_engine

    return get_engine()


def test_the_seed_gives_the_rolls_the_table_assumes():
    assert [round(random.Random(f"lore:{n}").random() * 100, 2) for n in (3, 9)] == [58.58, 41.79]


def test_six_turns_fire_the_entries_of_the_hand_written_table(engine, settings):
    settings.SCENARIO_SCAN_DEPTH = 1
    result = world_info_import(raw=FIXTURE.read_bytes())
    assert len(result.created) == 11 and not result.skipped

    turns, state, fired, held_back, prompts = [], {}, [], [], []
    for number, text in enumerate(TURNS):
        turns.append({"role": "user", "content": text})
        count = len(turns)
        prompt = prompt_compose(engine=engine, character=None, turns=turns, max_tokens=32,
                                world_info_state=state, message_count=count, seed=f"lore:{count}")
        state = prompt.world_info_state
        fired.append({scenario.title for scenario in prompt.scenarios})
        held_back.append({scenario.title for scenario, _why in prompt.left_out})
        prompts.append(prompt)
        turns.append({"role": "assistant", "content": f"Reply {number + 1}."})

    assert list(zip(fired, held_back)) == EXPECTED


def test_the_reasons_name_key_recursion_roll_group_and_sticky(engine, settings):
    settings.SCENARIO_SCAN_DEPTH = 1
    world_info_import(raw=FIXTURE.read_bytes())
    first = prompt_compose(engine=engine, character=None, turns=[{"role": "user", "content": TURNS[0]}],
                           max_tokens=32, seed="lore:1")
    reasons = {scenario.title: why for scenario, why in first.explained_scenarios}
    assert reasons["Harbor"] == "keyword 'harbor' in the user's message"
    assert reasons["Lighthouse"] == "keyword 'lighthouse' in the text of 'Harbor' (recursion)"
    second_turns = [{"role": "user", "content": TURNS[0]}, {"role": "assistant", "content": "Reply 1."},
                    {"role": "user", "content": TURNS[1]}]
    second = prompt_compose(engine=engine, character=None, turns=second_turns, max_tokens=32,
                            world_info_state=first.world_info_state, seed="lore:3")
    reasons = {scenario.title: why for scenario, why in second.explained_scenarios}
    assert reasons["Storm"] == "sticky (fired at message 1, held until message 3)"
    assert reasons["Fog"].endswith("won inclusion group 'weather'")
    why_not = dict((scenario.title, why) for scenario, why in second.left_out)
    assert why_not["Rumor"].endswith("but the probability roll 59 ≥ 50")
    assert why_not["Calm"].endswith("but inclusion group 'weather' went to 'Fog'")


def test_depth_insertion_and_positions_in_the_composed_prompt(engine, settings):
    settings.SCENARIO_SCAN_DEPTH = 1
    world_info_import(raw=FIXTURE.read_bytes())
    turns = []
    for number, text in enumerate(TURNS):
        turns += [{"role": "user", "content": text}, {"role": "assistant", "content": f"Reply {number + 1}."}]
    turns = turns[:-1]  # ends with the sixth user message: "... the lighthouse."
    prompt = prompt_compose(engine=engine, character=None, turns=turns, max_tokens=32, seed="x")
    lighthouse = Scenario.objects.get(title="Lighthouse").content
    # At depth 2 as system: two chat messages (the fifth reply and the new message) follow it.
    assert prompt.messages[-3] == {"role": "system", "content": lighthouse}
    assert prompt.messages[-2] == {"role": "assistant", "content": "Reply 5."}
    assert prompt.messages[-1]["content"] == TURNS[-1]
    first = prompt_compose(engine=engine, character=None, turns=turns[:1], max_tokens=32, seed="x")
    storm = Scenario.objects.get(title="Storm").content
    assert storm in first.messages[0]["content"]  # before the profile: in the first, stable message
    # Deeper than the conversation: before its first message.
    assert first.messages[-2] == {"role": "system", "content": lighthouse}


def test_import_then_export_gives_back_the_file():
    original = json.loads(FIXTURE.read_bytes())
    world_info_import(raw=FIXTURE.read_bytes())
    exported = json.loads(world_info_export(scenarios=Scenario.objects.order_by("id")))
    assert exported == original  # the entries and the file's name


def test_an_edit_in_the_admin_reaches_the_export():
    world_info_import(raw=FIXTURE.read_bytes())
    Scenario.objects.filter(title="Storm").update(sticky=5, depth_role="user", probability=75)
    exported = json.loads(world_info_export(scenarios=Scenario.objects.order_by("id")))
    storm = exported["entries"]["3"]
    assert (storm["sticky"], storm["role"], storm["probability"], storm["useProbability"]) == (5, 1, 75, True)
    assert storm["cooldown"] == 2 and storm["preventRecursion"] is True
