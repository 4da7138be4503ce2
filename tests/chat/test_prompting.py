"""chat/prompting: composing the prompt with the real SmolLM2 model's tokenizer and chat template."""

import pytest

from characters.models import SystemPrompt
from chat.engine import ContextOverflow, SamplingParams
from chat.prompting import (
    placeholders_replace,
    prompt_compose,
    prompt_greeting,
    prompt_greetings,
    system_prompt_default,
)
from chat.prompting.placeholders import example_dialogue_blocks
from tests.factories import make_character, make_scenario

pytestmark = [pytest.mark.django_db, pytest.mark.smollm2]


@pytest.fixture(scope="module")
def engine(smollm2_path):
    from chat.engines import get_engine

    return get_engine()


ADA = {
    "name": "Ada", "slug": "ada",
    "description": "{{char}} keeps the lighthouse on Gannet Rock and calls {{user}} 'love'.",
    "personality": "Dry, patient.",
    "setting": "The lamp room at night; <USER> has climbed the stairs.",
    "greeting": "Mind the step, {{USER}}. <bot> has tea.",
    "example_dialogue": "<START>\n{{user}}: Is the lamp ever off?\n{{char}}: Never, love.\n"
                        "<START>\n{{user}}: Cold?\n{{char}}: Always.",
    "post_history_instructions": "Answer as {{char}} in one sentence.",
}


def make_ada(**fields):
    return make_character(**{**ADA, **fields})


def user(text):
    return {"role": "user", "content": text}


def assistant(text):
    return {"role": "assistant", "content": text}


def compose(engine, character, turns, **options):
    options.setdefault("max_tokens", 64)
    return prompt_compose(engine=engine, character=character, turns=turns, user_name="Sam", **options)


# --- composition -----------------------------------------------------------------------------------


def test_parts_in_order_and_rendered_with_the_models_template(engine):
    ada = make_ada()
    storm = make_scenario("Storm", character=ada, keywords="storm", content="A storm hits {{char}}'s rock.")
    composed = compose(engine, ada, [assistant("Hello."), user("Is a storm coming?")])

    roles = [message["role"] for message in composed.messages]
    assert roles == ["system", "system", "assistant", "user", "system"]
    stable, context = composed.messages[0]["content"], composed.messages[1]["content"]
    assert stable.startswith(system_prompt_default())
    assert "Ada keeps the lighthouse on Gannet Rock" in stable
    assert "Ada's personality: Dry, patient." in stable
    assert "Scenario: The lamp room at night; Sam has climbed the stairs." in stable
    assert context.index("Sam: Is the lamp ever off?") < context.index("A storm hits Ada's rock.")
    assert "<START>" not in context
    assert composed.messages[-2] == user("Is a storm coming?")
    assert composed.messages[-1]["content"] == "Answer as Ada in one sentence."

    assert composed.text == engine.render_chat(composed.messages, add_generation_prompt=True)
    assert composed.text.startswith("<|im_start|>system\n")
    assert composed.prompt_tokens == len(engine.prompt_tokens(composed.text))
    assert composed.context_length == engine.context_length == 2048
    assert composed.scenarios == [storm]
    assert composed.reasons == {storm.pk: "keyword 'storm' in the user's message"}
    assert composed.dropped == []


def test_the_stable_part_comes_first_and_is_byte_identical_between_turns(engine):
    ada = make_ada()
    make_scenario("Storm", character=ada, keywords="storm")
    make_scenario("Ship", character=ada, keywords="ship")
    first = compose(engine, ada, [user("Is a storm coming?")])
    second = compose(engine, ada, [user("Is a storm coming?"), assistant("Aye."), user("And that ship?")])
    assert first.messages[0] == second.messages[0]
    assert [s.title for s in first.scenarios] != [s.title for s in second.scenarios]
    stable_prefix = first.text[: first.text.index("<|im_end|>") + len("<|im_end|>")]
    assert second.text.startswith(stable_prefix)
    assert "Storm content." not in stable_prefix and "Ship content." not in stable_prefix


def test_system_prompt_precedence(engine, settings):
    ada = make_ada()
    config_prompt = settings.LLMSITE.system_prompt
    assert compose(engine, ada, [user("hi")]).messages[0]["content"].startswith(config_prompt)

    SystemPrompt.objects.create(name="House", content="House rules for {{char}}.", is_default=True)
    assert compose(engine, ada, [user("hi")]).messages[0]["content"].startswith("House rules for Ada.")

    ada.system_prompt = "You are {{char}}. {{original}}"
    assert compose(engine, ada, [user("hi")]).messages[0]["content"].startswith("You are Ada. House rules for Ada.")


def test_a_character_uses_its_named_system_prompt_else_the_default(engine):
    ada, tom = make_ada(), make_ada(name="Tom", slug="tom")
    SystemPrompt.objects.create(name="House", content="House rules.", is_default=True)
    terse = SystemPrompt.objects.create(name="Terse", content="Answer {{user}} in five words.")
    ada.named_system_prompt = terse
    ada.save()
    assert compose(engine, ada, [user("hi")]).messages[0]["content"].startswith("Answer Sam in five words.")
    assert compose(engine, tom, [user("hi")]).messages[0]["content"].startswith("House rules.")
    # The character's own system prompt still wins, and {{original}} is the named one.
    ada.system_prompt = "You are {{char}}. {{original}}"
    assert compose(engine, ada, [user("hi")]).messages[0]["content"].startswith(
        "You are Ada. Answer Sam in five words.")


def test_before_char_scenarios_go_between_the_system_prompt_and_the_profile(engine):
    ada = make_ada()
    make_scenario("Storm", character=ada, keywords="storm", content="STORM LORE.", position="before_char")
    make_scenario("Ship", character=ada, keywords="ship", content="SHIP LORE.")
    composed = compose(engine, ada, [user("A storm and a ship?")])
    stable, context = composed.messages[0]["content"], composed.messages[1]["content"]
    assert stable.index(system_prompt_default()) < stable.index("STORM LORE.") < stable.index("Ada keeps the")
    assert "SHIP LORE." in context and "STORM LORE." not in context
    assert {s.title for s in composed.scenarios} == {"Storm", "Ship"}


def test_scan_depth_of_the_entry_then_the_character_then_the_setting(engine, settings):
    settings.SCENARIO_SCAN_DEPTH = 1
    ada = make_ada(scan_depth=3)
    make_scenario("Storm", character=ada, keywords="storm", content="STORM LORE.")
    make_scenario("Ship", character=ada, keywords="ship", content="SHIP LORE.", scan_depth=1)
    make_scenario("Fog", keywords="fog", content="FOG LORE.")  # global: the setting's depth
    turns = [user("A storm, a ship, fog."), assistant("Aye."), user("Tea?")]
    composed = compose(engine, ada, turns)
    assert [s.title for s in composed.scenarios] == ["Storm"]
    settings.SCENARIO_SCAN_DEPTH = 3
    assert {s.title for s in compose(engine, ada, turns).scenarios} == {"Storm", "Fog"}


def test_without_a_character_only_the_system_prompt_and_global_scenarios(engine):
    ada = make_ada()
    make_scenario("Own", character=ada, keywords="storm")
    shared = make_scenario("Shared", keywords="storm")
    composed = compose(engine, None, [user("storm?")])
    assert composed.messages[0] == {"role": "system", "content": system_prompt_default()}
    assert composed.scenarios == [shared]
    assert [m["role"] for m in composed.messages] == ["system", "system", "user"]


def test_placeholders_everywhere_but_the_users_own_words(engine):
    ada = make_ada()
    make_scenario("Storm", character=ada, keywords="storm", content="<Bot> shelters {{ user }} from the storm.")
    composed = compose(engine, ada, [user("storm? {{char}}")])
    everything = "\n".join(m["content"] for m in composed.messages[:-2]) + composed.messages[-1]["content"]
    for placeholder in ("{{char}}", "{{user}}", "{{USER}}", "<BOT>", "<bot>", "<USER>", "{{ user }}"):
        assert placeholder not in everything
    assert "Ada shelters Sam from the storm." in everything
    assert composed.messages[-2] == user("storm? {{char}}")
    assert prompt_greeting(character=ada, user_name="Sam") == "Mind the step, Sam. Ada has tea."
    ada.alternate_greetings = ["", "Back again, {{user}}?"]
    assert prompt_greetings(character=ada, user_name="Sam") == [
        "Mind the step, Sam. Ada has tea.", "", "Back again, Sam?"]


def test_placeholder_spellings():
    text = "{{char}} {{CHAR}} {{ Char }} <BOT> <bot> {{user}} {{User}} <USER> <user> {{other}}"
    assert placeholders_replace(text, char_name="Ada", user_name="Sam") == \
        "Ada Ada Ada Ada Ada Sam Sam Sam Sam {{other}}"
    assert example_dialogue_blocks("<START>\na\n<start>\nb\n") == ["a", "b"]


def test_forced_scenarios_bypass_matching(engine):
    ada = make_ada()
    make_scenario("Storm", character=ada, keywords="storm")
    ship = make_scenario("Ship", character=ada, keywords="ship")
    composed = compose(engine, ada, [user("storm?")], forced_scenarios=[ship])
    assert composed.scenarios == [ship]
    assert composed.reasons == {ship.pk: "chosen by the request"}


def test_scenario_budget_leaves_out_what_does_not_fit(engine, settings):
    ada = make_ada()
    make_scenario("Short", character=ada, keywords="storm", priority=9, content="A storm.")
    make_scenario("Long", character=ada, keywords="storm", priority=1, content="Rain and wind. " * 40)
    settings.SCENARIO_TOKEN_BUDGET = 20
    composed = compose(engine, ada, [user("storm?")])
    assert [s.title for s in composed.scenarios] == ["Short"]
    assert composed.dropped == ["scenario 'Long' (over the scenario token budget)"]


def test_extra_system_text_follows_the_scenarios(engine):
    ada = make_ada()
    make_scenario("Storm", character=ada, keywords="storm")
    composed = compose(engine, ada, [user("storm?")], extra_system="Reply in French.")
    context = composed.messages[1]["content"]
    assert context.index("Storm content.") < context.index("Reply in French.")


def test_malformed_turns_are_refused(engine):
    ada = make_ada()
    for turns in ([], [assistant("hi")], [{"role": "system", "content": "x"}, user("hi")], [{"role": "user"}]):
        with pytest.raises(ValueError):
            compose(engine, ada, turns)


# --- fitting the context --------------------------------------------------------------------------


def history(exchanges):
    turns = []
    for number in range(exchanges):
        turns += [user(f"Question {number} about the lamp and the sea?"), assistant(f"Answer {number}, love.")]
    return turns


def room_for(engine, tokens):
    """max_tokens that leaves exactly `tokens` for the prompt."""
    return engine.context_length - tokens


def fit_setup(engine):
    ada = make_ada(example_dialogue="<START>\n" + "{{user}}: Tell me.\n{{char}}: Listen well. " * 30)
    make_scenario("High", character=ada, keywords="storm", priority=9, content="The storm is here. " * 10)
    make_scenario("Low", character=ada, keywords="storm", priority=1, content="Gulls cry in the storm. " * 10)
    turns = history(6) + [user("Is the storm here?")]
    return ada, turns


def test_everything_fits_nothing_dropped(engine):
    ada, turns = fit_setup(engine)
    composed = compose(engine, ada, turns, max_tokens=256)
    assert composed.dropped == [] and composed.dropped_turns == 0
    assert composed.prompt_tokens <= composed.available_tokens


def test_example_dialogue_goes_first(engine):
    ada, turns = fit_setup(engine)
    full = compose(engine, ada, turns)
    ada.example_dialogue = ""
    without_examples = compose(engine, ada, turns)
    ada.refresh_from_db()
    composed = compose(engine, ada, turns, max_tokens=room_for(engine, without_examples.prompt_tokens))
    assert full.prompt_tokens > without_examples.prompt_tokens
    assert composed.dropped == ["example dialogue"]
    assert composed.messages == without_examples.messages
    assert composed.prompt_tokens == without_examples.prompt_tokens


def test_then_the_oldest_turns_never_the_new_message(engine):
    ada, turns = fit_setup(engine)
    ada.example_dialogue = ""
    room = compose(engine, ada, turns).prompt_tokens - 20
    ada.refresh_from_db()
    composed = compose(engine, ada, turns, max_tokens=room_for(engine, room))
    cut = composed.dropped_turns
    assert composed.dropped == ["example dialogue", f"{cut} oldest turns"]
    assert cut % 2 == 0 and 0 < cut < len(turns) - 1
    kept = [m for m in composed.messages if m["role"] != "system"]
    assert kept == turns[cut:]  # the newest turns, starting with a user message, the new message last
    assert [s.title for s in composed.scenarios] == ["High", "Low"]
    assert composed.prompt_tokens <= room
    # No more was dropped than needed: keeping one more exchange would not fit.
    ada.example_dialogue = ""
    assert compose(engine, ada, turns[cut - 2:]).prompt_tokens > room


def test_then_the_lowest_ranked_scenarios(engine):
    ada, turns = fit_setup(engine)
    ada.example_dialogue = ""
    bare = compose(engine, ada, turns[-1:])
    ada.refresh_from_db()
    composed = compose(engine, ada, turns, max_tokens=room_for(engine, bare.prompt_tokens - 5))
    assert composed.dropped == ["example dialogue", f"{len(turns) - 1} oldest turns", "scenario 'Low' (context full)"]
    assert [s.title for s in composed.scenarios] == ["High"]
    assert [m for m in composed.messages if m["role"] != "system"] == turns[-1:]


def test_context_overflow_when_the_essentials_do_not_fit(engine):
    ada, turns = fit_setup(engine)
    ada.description = "The rock is old. " * 600
    with pytest.raises(ContextOverflow) as caught:
        compose(engine, ada, turns, max_tokens=256)
    assert caught.value.context_length == engine.context_length
    assert caught.value.prompt_tokens > engine.context_length - 256


def test_a_new_message_too_long_for_the_context_is_refused_before_scenarios_are_matched(engine):
    """Matching a megabyte of words against the scenarios (BM25, keywords) cost seconds of CPU for a 400."""
    ada = make_ada()
    make_scenario("Storm", character=ada, keywords="storm", content="STORM LORE.")
    message = " ".join(f"storm{index}" for index in range(20_000))
    with pytest.raises(ContextOverflow) as caught:
        compose(engine, ada, [user(message)], max_tokens=64)
    assert caught.value.prompt_tokens == engine.count_tokens(message)  # the message alone was counted


def test_a_very_long_history_is_cut_without_rendering_all_of_it(engine):
    ada, _ = fit_setup(engine)
    turns = history(2000) + [user("storm?")]
    composed = compose(engine, ada, turns, max_tokens=256)
    assert composed.prompt_tokens <= composed.available_tokens
    assert composed.messages[-2] == user("storm?")
    assert composed.dropped_turns > 3000


# --- end to end -----------------------------------------------------------------------------------


def test_compose_and_generate_with_the_real_model(engine):
    ada = make_ada()
    storm = make_scenario("A storm is coming", character=ada, keywords="storm, gale",
                          content="A gale is rolling in from the west; {{char}} has lit the spare lamp.")
    make_scenario("Wreck", character=ada, keywords="wreck")
    turns = [assistant(prompt_greeting(character=ada, user_name="Sam")), user("Will the storm reach us tonight?")]
    composed = compose(engine, ada, turns, max_tokens=16)
    assert composed.scenarios == [storm]
    assert "keyword 'storm'" in composed.reasons[storm.pk]

    completion = engine.generate(composed.text, SamplingParams(max_tokens=16, temperature=0.0, seed=1))
    assert completion.prompt_tokens == composed.prompt_tokens
    assert 0 < completion.completion_tokens <= 16
    assert completion.finish_reason in ("stop", "length")
    assert completion.text.strip()


# --- what other tenants' prompts may reuse ---------------------------------------------------------------


def shared_text(composed) -> str:
    """The prompt text of the site's own content (the composed prompt's shared pieces and characters)."""
    prompt = composed.text
    within = prompt.pieces[prompt.shared_pieces].text[:prompt.shared_chars] if prompt.shared_chars else ""
    return "".join(piece.text for piece in prompt.pieces[:prompt.shared_pieces]) + within


def test_a_characters_first_message_is_the_sites_own_content(engine):
    """The system prompt and the persona: other tenants' prompts may reuse their cells (a burst of users opening
    one character); nothing after them (the user's words, the scenarios they set off)."""
    mara = make_character("mara", description="{{char}} keeps the lighthouse.", personality="Dry.")
    make_scenario("Lamp", character=mara, always_on=True, content="THE LAMP NEVER SLEEPS.", position="before_char")
    make_scenario("Ship", character=mara, keywords="ship", content="SHIP LORE.")
    composed = compose(engine, mara, [user("A ship? My code is 4711.")])
    shared = shared_text(composed)
    assert shared.endswith("Mara's personality: Dry.") and "THE LAMP NEVER SLEEPS." in shared
    assert "SHIP LORE." not in shared and "4711" not in shared
    assert engine.prompt_tokens(composed.text) == engine.prompt_tokens(
        engine.render_chat(composed.messages))  # the mark moved nothing


@pytest.mark.parametrize("case", ["user placeholder", "keyword scenario", "group setting"])
def test_the_sites_content_ends_where_the_first_text_of_a_users_goes(engine, case):
    mara = make_character("mara", description="{{char}} keeps the lighthouse.", personality="Calm.")
    options = {}
    if case == "user placeholder":  # a user's name
        mara.personality = "Calls {{user}} 'love'."
        mara.save()
    elif case == "keyword scenario":  # that it fired tells what someone wrote
        make_scenario("Storm", character=mara, keywords="storm", content="STORM LORE.", position="before_char")
    else:  # a group's scenario is its owner's text
        options["setting"] = "A raft, owned by the group's creator."
    composed = compose(engine, mara, [user("A storm?")], **options)
    site = shared_text(composed).removeprefix("<|im_start|>system\n")
    content = composed.messages[0]["content"]
    assert content.startswith(site) and "keeps the lighthouse" in content
    users_text = {"user placeholder": "Sam 'love'", "keyword scenario": "STORM LORE.", "group setting": "A raft"}[case]
    assert content[len(site):].startswith(users_text)


def test_a_clients_own_system_message_is_not_shared(engine):
    composed = compose(engine, None, [user("hello")], system_override="You are my assistant. My code is 4711.")
    assert (composed.text.shared_pieces, composed.text.shared_chars) == (0, 0)


def test_without_a_character_the_default_system_prompt_is_shared(engine):
    composed = compose(engine, None, [user("hello")])
    assert shared_text(composed).endswith(system_prompt_default())
