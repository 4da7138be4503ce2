"""Composing the prompt of one reply: system prompt, profile, scenarios, examples, history, fitted to the context.

Message order (docs/PROMPTS.md). The first message never changes between turns of a chat, so the
engine's prefix cache reuses it; whatever varies comes after it:

1. system: the system prompt (the character's named one, else the default) and the character's
   profile (description, personality, setting);
2. system: example dialogue, then the scenarios that fired, then the request's own system text;
3. the conversation so far, then the user's new message;
4. system: the character's post-history instructions.

Message 1 is the site's own content up to the first text of a user's in it (the user's name for {{user}}, a
group's setting, a scenario that fired on what someone wrote; a client's system message is a user's from the
start): another tenant's prompt may reuse the evaluated cells of that part (`shared_until`, docs/ARCHITECTURE.md
"Tenants and the prefix cache"), as when a burst of users opens one character.

Scenarios whose position is "before_char" go into message 1, between the system prompt and the
profile, as lorebooks place them; this makes message 1 change when they come or go. "before_examples" and
"after_examples" ones go around the example dialogue in message 2, "after_char" ones after it, and
"at_depth" ones become messages of their role inside the conversation, N messages before its end. Within a
position, higher priority (SillyTavern's insertion order) goes later, closer to the reply. Which scenarios
fire follows World Info's rules (scenarios/world_info.py).

When the prompt and the reply (`max_tokens`) do not fit the model's context, parts are dropped in
this order: the example dialogue, the oldest turns, the lowest-ranked scenarios. The system prompt,
the profile and the new message are never dropped: if they alone do not fit, ContextOverflow.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from django.conf import settings

from characters.models import SystemPrompt
from chat.engine import ContextOverflow
from scenarios.models import Scenario
from scenarios.selectors import ScenarioMatch, relevance_matches, scenarios_available
from scenarios.world_info import world_info_select

from .placeholders import example_dialogue_blocks, placeholders_replace

ROLES = ("user", "assistant")
FORCED_REASON = "chosen by the request"
# Two user names no text holds: message 1 filled with each differs where the first text of a user's goes.
PROBE_NAMES = ("\ufdd5", "\ufdd6")


@dataclass
class ComposedPrompt:
    """The prompt of one reply and how it was made (shown in the admin preview, stored with replies)."""

    messages: list[dict]
    text: str
    prompt_tokens: int
    context_length: int
    max_tokens: int
    scenarios: list[Scenario] = field(default_factory=list)  # inserted, in rank order
    reasons: dict[int, str] = field(default_factory=dict)  # scenario id -> why it was inserted
    dropped: list[str] = field(default_factory=list)  # what was left out, e.g. "3 oldest turns"
    dropped_turns: int = 0  # how many of the oldest history messages were left out
    matches: list[ScenarioMatch] = field(default_factory=list)  # how each inserted scenario fired
    left_out: list[tuple[Scenario, str]] = field(default_factory=list)  # triggered or held back, and why
    world_info_state: dict = field(default_factory=dict)  # the branch's timed effects after this reply
    parts: list[tuple[str, str]] = field(default_factory=list)  # (what, text) of each part that went in

    @property
    def explained_scenarios(self) -> list[tuple[Scenario, str]]:
        """(scenario, why it was inserted) pairs in rank order."""
        return [(scenario, self.reasons.get(scenario.pk, "")) for scenario in self.scenarios]

    @property
    def scenarios_used(self) -> list[dict]:
        """The inserted scenarios as replies report them to clients: id, title and why, in rank order. The why
        is told from how each fired, not from the editors' reason (the admin preview's), which quotes words of
        other entries' hidden text (recursion), keys nobody typed (secondary keys) and regular expressions."""
        by_scenario = {match.scenario.pk: match for match in self.matches}
        return [{"id": scenario.pk, "title": scenario.title,
                 "reason": client_reason(by_scenario[scenario.pk]) if scenario.pk in by_scenario else reason}
                for scenario, reason in self.explained_scenarios]

    @property
    def available_tokens(self) -> int:
        """Room the prompt may use: the context minus the reply."""
        return self.context_length - self.max_tokens


CLIENT_TRIGGERS = {"constant": "always on", "keyword": "a keyword in the conversation", "sticky": "sticky",
                   "relevance": "text relevance", "forced": "forced"}


def client_reason(match) -> str:
    """Why a scenario fired, in what a client may know: the trigger, the entry that fired it (its title is
    listed too), a probability roll, an inclusion group."""
    reason = (f"recursion from '{match.recursion_from}'" if match.trigger == "recursion"
              else CLIENT_TRIGGERS.get(match.trigger, "triggered"))
    if match.roll is not None:
        reason += f", probability roll {match.roll:.0f} < {match.scenario.probability}"
    if match.group:
        reason += f", won inclusion group '{match.group}'"
    return reason


def world_info_inputs(conversation_id, *, path, message_count: int) -> dict:
    """prompt_compose's World Info arguments for a reply (scenarios/world_info.py): the timed effects of its
    branch, which the nearest reply on `path` (the stored messages before it) holds, and a seed of the
    conversation's id (a new conversation's too, so first messages differ between chats) and the message
    count, so a regenerated reply rolls and draws as the one it replaces did."""
    state = next((message.world_info_state for message in reversed(path) if message.role == "assistant"), None)
    return {"world_info_state": state or {}, "message_count": message_count, "seed": f"{conversation_id}:{message_count}"}


def system_prompt_default() -> str:
    """The default system prompt: the DB's default SystemPrompt, else config.yaml's system_prompt."""
    default = SystemPrompt.objects.filter(is_default=True).values_list("content", flat=True).first()
    return default if default and default.strip() else settings.LLMSITE.system_prompt


def prompt_greeting(*, character, user_name: str = "User") -> str:
    """The character's greeting with its placeholders replaced (the first message of a new chat)."""
    return placeholders_replace(character.greeting, char_name=character.name, user_name=user_name)


def prompt_greetings(*, character, user_name: str = "User") -> list[str]:
    """Every first message a chat may open with, placeholders replaced: the greeting, then the
    alternates, by position (what the request's `greeting` index counts); an empty one stays ""."""
    texts = [character.greeting, *(character.alternate_greetings or [])]
    return [placeholders_replace(text, char_name=character.name, user_name=user_name).strip()
            if isinstance(text, str) else "" for text in texts]


def system_prompt_of(character) -> str:
    """The system prompt a character builds on: its named one, else the default."""
    named = character.named_system_prompt if character.named_system_prompt_id else None
    return named.content if named is not None and named.content.strip() else system_prompt_default()


def prompt_compose(
    *,
    engine,
    character,
    turns: Sequence[dict],
    user_name: str = "User",
    max_tokens: int,
    forced_scenarios: Iterable[Scenario] | None = None,
    extra_system: str = "",
    system_override: str = "",
    tools: list[dict] | None = None,
    world_info_state: dict | None = None,
    message_count: int | None = None,
    seed: int | str | None = None,
    setting: str | None = None,
    continue_final: bool = False,
) -> ComposedPrompt:
    """Build and render the prompt for the reply to `turns` (the chat so far, the user's new message last).

    `character` None composes with the default system prompt and global scenarios only.
    `forced_scenarios` replaces scenario matching (and its token budget) with the given scenarios.
    `system_override` replaces the default system prompt when there is no character (API clients'
    own system messages).
    `tools` (OpenAI function tools) are handed to the chat template (engines whose template supports them).
    `setting` replaces the character's own setting (a group chat's shared scenario).
    `world_info_state` is the branch's timed-effect state (the nearest reply's Message.world_info_state),
    `message_count` the number of its messages with the new one (default: the turns'), `seed` seeds the
    probability rolls and group draws (default: the message count); the new state is in the result.
    `continue_final`: the last turn is an assistant reply to extend; its turn is left open (no generation
    prompt, no end-of-turn) and the post-history instructions go before it.
    Raises ContextOverflow when even the minimum prompt leaves no room for `max_tokens`, and
    ValueError for malformed turns.
    """
    turns = _checked_turns(turns, last_role="assistant" if continue_final else "user")
    _check_new_message_fits(engine, turns[-1]["content"], room=engine.context_length - max_tokens)
    count = message_count if message_count is not None else len(turns)
    parts = _Parts.build(engine=engine, character=character, turns=turns, user_name=user_name,
                         forced_scenarios=forced_scenarios, extra_system=extra_system,
                         system_override=system_override, world_info_state=world_info_state or {},
                         message_count=count, seed=count if seed is None else seed, setting=setting)
    parts.continue_final = continue_final
    return _fit(engine=engine, parts=parts, max_tokens=max_tokens, tools=tools)


def _check_new_message_fits(engine, text: str, *, room: int) -> None:
    """ContextOverflow for a new message that alone leaves no room for the reply, before the scenarios are
    matched against it (a megabyte of words costs seconds there). Counted only when it has more characters than
    the room has tokens: a shorter one may not fit either, but costs nothing to match."""
    if len(text) > room and (tokens := engine.count_tokens(text)) > room:
        raise ContextOverflow(tokens, engine.context_length)


def _checked_turns(turns: Sequence[dict], *, last_role: str = "user") -> list[dict]:
    if not turns:
        raise ValueError("turns must hold at least the user's new message.")
    checked = []
    for turn in turns:
        if not isinstance(turn, dict) or turn.get("role") not in ROLES or not isinstance(turn.get("content"), str):
            raise ValueError("each turn must be a dict with role 'user' or 'assistant' and string content.")
        checked.append({"role": turn["role"], "content": turn["content"]})
    if checked[-1]["role"] != last_role:
        raise ValueError(f"the last turn must be the {last_role}'s message.")
    return checked


@dataclass
class _Parts:
    """Everything that may go into the prompt, placeholders already replaced."""

    stable: Callable[[list[str]], str]  # message 1, given the texts of the "before_char" scenarios
    head: str  # the system prompt
    profile: str  # the persona: description, personality, setting
    examples: list[str]
    matches: list[ScenarioMatch]
    scenario_texts: dict[int, str]  # id(match) -> inserted text
    extra_system: str
    history: list[dict]
    new_message: dict
    post_history: str
    dropped: list[str]
    left_out: list[tuple[Scenario, str]] = field(default_factory=list)
    world_info_state: dict = field(default_factory=dict)
    continue_final: bool = False  # the last turn is an assistant reply left open to be extended
    # Message 1 as a user named `name` would get it, with `name` for every text of a user's (a scenario that
    # fired on what someone wrote, a group's setting); None: the client wrote the system prompt.
    probed: Callable[[str, list[ScenarioMatch]], str] | None = None

    @classmethod
    def build(cls, *, engine, character, turns, user_name, forced_scenarios, extra_system,
              system_override="", world_info_state=None, message_count=0, seed=0, setting=None) -> _Parts:
        char_name = character.name if character is not None else "Assistant"

        def fill(text: str) -> str:
            return placeholders_replace(text, char_name=char_name, user_name=user_name).strip()

        dropped: list[str] = []
        left_out: list[tuple[Scenario, str]] = []
        state = dict(world_info_state or {})
        if forced_scenarios is not None:
            matches = [ScenarioMatch(scenario=scenario, reason=FORCED_REASON, trigger="forced")
                       for scenario in forced_scenarios]
        else:
            selection = world_info_select(
                scenarios=scenarios_available(character=character), texts=[turn["content"] for turn in turns],
                message_count=message_count, state=state, rng=random.Random(str(seed)), character=character,
                cost=lambda scenario: engine.count_tokens(fill(scenario.content)),
                fallback=lambda unmatched, text: relevance_matches(unmatched, user_message=text))
            matches, left_out, state = selection.matches, selection.left_out, selection.state
            dropped += [f"scenario '{scenario.title}' (over the scenario token budget)"
                        for scenario, why in left_out if why.endswith(("over the token budget", "budget is spent"))]
        override = system_override.strip() if character is None else ""
        source = _system_source(character)
        head, profile = override or (fill(source) if character is not None else source), _profile_text(
            character, fill, setting=setting)

        def stable(before: list[str]) -> str:
            return "\n\n".join(section for section in (head, *before, profile) if section)

        def probed(name: str, before: list[ScenarioMatch]) -> str:
            def fill_as(text: str) -> str:
                return placeholders_replace(text, char_name=char_name, user_name=name).strip()

            texts = [fill_as(match.scenario.content) if match.trigger == "constant" else name for match in before]
            probed_profile = _profile_text(character, fill_as, setting=None if setting is None else name)
            return "\n\n".join(section for section in (fill_as(source) if character is not None else source,
                                                         *texts, probed_profile) if section)

        return cls(
            stable=stable,
            head=head,
            profile=profile,
            examples=[fill(block) for block in example_dialogue_blocks(character.example_dialogue)]
            if character is not None else [],
            matches=matches,
            scenario_texts={id(match): fill(match.scenario.content) for match in matches},
            extra_system=(extra_system or "").strip(),
            history=turns[:-1],
            new_message=turns[-1],
            post_history=fill(character.post_history_instructions) if character is not None else "",
            dropped=dropped,
            left_out=left_out,
            world_info_state=state,
            probed=None if override else probed,
        )

    def shared_until(self, matches: list[ScenarioMatch]) -> tuple[int, int] | None:
        """Where the site's own content ends: (0, characters of message 1), None when it has none."""
        if self.probed is None:
            return None
        before = [match for match in _placed(matches) if match.scenario.position == Scenario.Position.BEFORE_CHAR]
        chars = len(os.path.commonprefix([self.probed(name, before) for name in PROBE_NAMES]))
        return (0, chars) if chars else None

    def parts_in(self, *, with_examples: bool, cut: int, matches: list[ScenarioMatch]) -> list[tuple[str, str]]:
        """(what, text) of each part of the prompt that goes in, for the preview's cost of every part."""
        history = self.history[cut:]
        rows = [("System prompt", self.head), ("Persona", self.profile),
                *((f"World Info: {match.scenario.title}", self.scenario_texts[id(match)]) for match in matches),
                ("Example dialogue", "\n\n".join(self.examples) if with_examples else ""),
                ("Instructions", self.extra_system),
                (f"History ({len(history)} messages)", "\n\n".join(turn["content"] for turn in history)),
                ("Post-history instructions", self.post_history),
                ("New message", self.new_message["content"])]
        return [(what, text) for what, text in rows if text]

    def messages(self, *, with_examples: bool, cut: int, matches: list[ScenarioMatch]) -> list[dict]:
        Position = Scenario.Position
        placed = _placed(matches)

        def texts(position: str) -> list[str]:
            return [self.scenario_texts[id(m)] for m in placed if m.scenario.position == position]

        before, after = texts(Position.BEFORE_CHAR), texts(Position.AFTER_CHAR)
        before_examples, after_examples = texts(Position.BEFORE_EXAMPLES), texts(Position.AFTER_EXAMPLES)
        messages = [{"role": "system", "content": self.stable(before)}]
        context = [*before_examples]
        if with_examples and self.examples:
            context.append("Example dialogue (how the character speaks; not part of this chat):\n\n"
                           + "\n\n".join(self.examples))
        context += after_examples
        if after:
            context.append("Context for this reply:\n\n" + "\n\n".join(after))
        if self.extra_system:
            context.append(self.extra_system)
        if context:
            messages.append({"role": "system", "content": "\n\n".join(context)})
        history, final = [dict(turn) for turn in self.history[cut:]], dict(self.new_message)
        at_depth = [(m.scenario.depth, m.scenario.depth_role, self.scenario_texts[id(m)])
                    for m in placed if m.scenario.position == Position.AT_DEPTH]
        post_history = [{"role": "system", "content": self.post_history}] if self.post_history else []
        if self.continue_final:  # the reply being extended stays last, its turn open
            return messages + depth_inserted(history, at_depth) + post_history + [final]
        return messages + depth_inserted(history + [final], at_depth) + post_history


def _placed(matches: list[ScenarioMatch]) -> list[ScenarioMatch]:
    # Within a position, higher priority goes later (closer to the reply), as SillyTavern's insertion order.
    return sorted(matches, key=lambda m: m.scenario.priority)


def depth_inserted(conversation: list[dict], insertions: list[tuple[int, str, str]]) -> list[dict]:
    """The conversation with each (depth, role, text) inserted as a message with `depth` messages of the
    conversation after it (0: after the newest; deeper than the conversation: before the first).
    Insertions of one depth and role become one message, their texts joined in the given order; at one
    depth, system comes before user before assistant."""
    merged: dict[tuple[int, str], list[str]] = {}
    for depth, role, text in insertions:
        merged.setdefault((min(depth, len(conversation)), role), []).append(text)
    order = {role: rank for rank, role in enumerate(Scenario.Role.values)}
    result: list[dict] = []
    for index in range(len(conversation) + 1):
        for (depth, role), parts in sorted(merged.items(), key=lambda item: order.get(item[0][1], 9)):
            if depth == len(conversation) - index:
                result.append({"role": role, "content": "\n\n".join(parts)})
        if index < len(conversation):
            result.append(conversation[index])
    return result


def _system_source(character) -> str:
    """The system prompt before its placeholders are filled (a character's; the default, used as written, without
    one)."""
    if character is None:
        return system_prompt_default().strip()
    base = system_prompt_of(character)
    own = character.system_prompt.strip()
    # As in Character Card V2, {{original}} in a character's own system prompt stands for the one it replaces.
    return own.replace("{{original}}", base) if own else base


def _profile_text(character, fill, *, setting: str | None = None) -> str:
    if character is None:
        return ""
    sections = [fill(character.description)]
    if character.personality.strip():
        sections.append(f"{character.name}'s personality: {fill(character.personality)}")
    setting = character.setting if setting is None else setting
    if setting.strip():
        sections.append(f"Scenario: {fill(setting)}")
    return "\n\n".join(section for section in sections if section)


def _fit(*, engine, parts: _Parts, max_tokens: int, tools: list[dict] | None = None) -> ComposedPrompt:
    context_length = engine.context_length
    room = context_length - max_tokens
    dropped = list(parts.dropped)
    with_examples, cut, matches = bool(parts.examples), 0, list(parts.matches)

    def measure() -> tuple[list[dict], str, int]:
        messages = parts.messages(with_examples=with_examples, cut=cut, matches=matches)
        options = {"continue_final": True} if parts.continue_final else {}
        shared_until = parts.shared_until(matches)
        if shared_until is not None:
            options["shared_until"] = shared_until
        if tools:
            options["tools"] = tools
        text = engine.render_chat(messages, add_generation_prompt=not parts.continue_final, **options)
        return messages, text, len(engine.prompt_tokens(text))

    cuts = _cut_points(parts.history)
    # Turns older than this cannot fit whatever else is dropped: their text alone is too long.
    least_cut = _least_cut(engine, parts.history, room)
    if least_cut == 0:
        messages, text, tokens = measure()
    else:
        tokens = room + 1
    if tokens > room and with_examples:
        with_examples = False
        dropped.append("example dialogue")
        if least_cut == 0:
            messages, text, tokens = measure()
    if tokens > room and parts.history:
        candidates = [point for point in cuts if point >= least_cut]
        low, high = 0, len(candidates) - 1  # find the first candidate cut that fits (or drop all turns)
        while low < high:
            middle = (low + high) // 2
            cut = candidates[middle]
            if measure()[2] <= room:
                high = middle
            else:
                low = middle + 1
        cut = candidates[low]
        messages, text, tokens = measure()
        dropped.append("1 oldest turn" if cut == 1 else f"{cut} oldest turns")
    while tokens > room and matches:
        left_out = matches.pop()
        dropped.append(f"scenario '{left_out.scenario.title}' (context full)")
        messages, text, tokens = measure()
    if tokens > room:
        raise ContextOverflow(tokens, context_length)
    return ComposedPrompt(
        messages=messages, text=text, prompt_tokens=tokens, context_length=context_length, max_tokens=max_tokens,
        scenarios=[match.scenario for match in matches],
        reasons={match.scenario.pk: match.reason for match in matches},
        dropped=dropped, dropped_turns=cut, matches=matches, left_out=parts.left_out,
        world_info_state=parts.world_info_state,
        parts=parts.parts_in(with_examples=with_examples, cut=cut, matches=matches),
    )


def _cut_points(history: list[dict]) -> list[int]:
    """Where the kept history may start: at a user message (or nothing kept), so roles still alternate."""
    if not history:
        return [0]
    return [0, *(index for index in range(1, len(history)) if history[index]["role"] == "user"), len(history)]


def _least_cut(engine, history: list[dict], room: int) -> int:
    """The first history index whose turns' texts, newest back to it, still fit in `room` tokens."""
    total = 0
    for index in range(len(history) - 1, -1, -1):
        total += engine.count_tokens(history[index]["content"])
        if total > room:
            return index + 1
    return 0
