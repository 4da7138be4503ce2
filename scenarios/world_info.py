"""World Info: which scenarios fire for one reply under SillyTavern's rules, as pure functions.

No database access: the caller hands in the candidate scenarios, the chat's texts, the number of messages
in the conversation, the conversation's timed-effect state (a JSON object) and a seeded random generator,
and gets back the matches, what was left out and why, and the new state. The rules (docs/PROMPTS.md):

1. Candidates: enabled scenarios passing their character filter. A delayed one (fewer messages than its
   `delay`) or one cooling down is out. A sticky one still within its sticky messages fires without keys,
   probability roll or group contest.
2. Pass 0: constant (always-on) scenarios and those whose keywords appear in the chat (selectors.py's
   rules: scan depth, secondary keys, whole words, case, /regex/ keys); the BM25 fallback when given and
   no keyword fired.
3. Of what fired in a pass, each inclusion group keeps one scenario (a sticky one, else the highest
   priority among those marked "prioritize", else one drawn by weight) and none when the group already
   has one from an earlier pass; then each scenario whose probability is below 100 rolls 0-100 and fires
   when the roll is below it; then the token budget, constant scenarios first, then higher priority
   first: once one does not fit, nothing more fires.
4. Recursion: the text of what fired (unless "never triggers others") is searched for the keywords of
   the rest (unless "cannot be triggered by others"), up to `max_recursion` passes.
5. State: a scenario that fires by itself (not held by sticky) at message n with sticky S and cooldown C
   is recorded as {"at": n, "sticky_until": n + S, "cooldown_until": n + S + C}: it fires for the messages
   n+1..n+S without keys and cannot fire for the messages n+S+1..n+S+C. Records made at message n or
   later are ignored when evaluating message n (a regenerated reply, or another branch of the same
   conversation), so state is keyed by conversation and message count.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

from django.conf import settings

from .models import Scenario
from .selectors import (
    DEFAULT_SCAN_DEPTH,
    DEFAULT_TOKEN_BUDGET,
    NO_KEYWORD,
    ScenarioMatch,
    keyword_match,
    keywords_found,
    secondary_keywords_decide,
)

DEFAULT_MAX_RECURSION = 3


@dataclass
class WorldInfoSelection:
    """What fired (in rank order: what goes first into the budget), what did not and why, and the new state."""

    matches: list[ScenarioMatch] = field(default_factory=list)
    left_out: list[tuple[Scenario, str]] = field(default_factory=list)  # triggered, but not inserted
    state: dict = field(default_factory=dict)

    @property
    def titles(self) -> list[str]:
        return [match.scenario.title for match in self.matches]


def character_filter_allows(scenario: Scenario, character) -> bool:
    """The scenario's character filter: only for (or, with exclude, never for) the characters named."""
    names = {name.lower() for name in scenario.character_filter_list}
    if not names:
        return True
    own = {(getattr(character, "name", "") or "").lower(), (getattr(character, "slug", "") or "").lower()} - {""}
    listed = bool(names & own)
    return not listed if scenario.character_filter_exclude else listed


def world_info_select(
    *,
    scenarios: Sequence[Scenario],
    texts: Sequence[str],
    message_count: int | None = None,
    state: dict | None = None,
    rng: random.Random | None = None,
    character=None,
    scan_depth: int | None = None,
    max_recursion: int | None = None,
    budget: int | None = None,
    cost: Callable[[Scenario], int] | None = None,
    fallback: Callable[[list[Scenario], str], list[ScenarioMatch]] | None = None,
) -> WorldInfoSelection:
    """Select the scenarios that fire for the reply to `texts` (oldest first, the user's new message last).

    `message_count` is the number of messages the conversation holds with the new one (default: len(texts)),
    the clock of the timed effects. `rng` draws probability rolls and group winners (seed it for
    reproducible choices). `cost(scenario)` is its token count; `budget` defaults to SCENARIO_TOKEN_BUDGET,
    `max_recursion` to SCENARIO_MAX_RECURSION. `fallback(unmatched, user_message)` may add matches when
    no keyword fired in the chat (the BM25 fallback).
    """
    texts = list(texts)
    count = len(texts) if message_count is None else message_count
    rng = rng or random.Random(count)
    scan_depth = scan_depth or getattr(settings, "SCENARIO_SCAN_DEPTH", DEFAULT_SCAN_DEPTH)
    budget = getattr(settings, "SCENARIO_TOKEN_BUDGET", DEFAULT_TOKEN_BUDGET) if budget is None else budget
    max_recursion = getattr(settings, "SCENARIO_MAX_RECURSION", DEFAULT_MAX_RECURSION) \
        if max_recursion is None else max_recursion
    cost = cost or (lambda scenario: 0)
    records = {key: record for key, record in (state or {}).items()
               if isinstance(record, dict) and isinstance(record.get("at"), int) and record["at"] < count}
    run = _Run(count=count, rng=rng, budget=budget, cost=cost, records=records)

    user_message = texts[-1] if texts else ""
    book_depth = getattr(character, "scan_depth", None)

    def chat_match(scenario: Scenario):
        depth = scenario.scan_depth or (book_depth if scenario.character_id else None) or scan_depth
        earlier = texts[-max(1, depth):-1] if texts else []
        return keyword_match(scenario, user_message=user_message, earlier=earlier)

    candidates: list[Scenario] = []
    for scenario in scenarios:
        why_not = run.why_not(scenario, character)
        if not why_not:
            candidates.append(scenario)
            continue
        match = chat_match(scenario)
        if isinstance(match, ScenarioMatch):  # triggered, but held back: worth telling editors
            run.selection.left_out.append((scenario, f"{match.reason}, but {why_not}"))

    found: list[ScenarioMatch] = []
    unmatched: list[Scenario] = []
    for scenario in candidates:
        record = records.get(_key(scenario))
        if record and record["at"] < count <= record["sticky_until"]:
            found.append(ScenarioMatch(
                scenario=scenario, trigger="sticky",
                reason=f"sticky (fired at message {record['at']}, held until message {record['sticky_until']})"))
            continue
        match = chat_match(scenario)
        if match is NO_KEYWORD:
            unmatched.append(scenario)
        elif match is not None:
            found.append(match)
    if fallback is not None and not any(match.trigger == "keyword" for match in found):
        found += fallback(unmatched, user_message)
    run.accept(found)

    passes = 0
    while run.last_pass and not run.exhausted and passes < max_recursion:
        passes += 1
        sources = [match for match in run.last_pass if not match.scenario.prevent_recursion]
        fired = {match.scenario.pk for match in run.selection.matches} | run.rejected
        searched = [*texts, *(match_text.scenario.content for match_text in run.selection.matches)]
        found = []
        for scenario in candidates:
            if scenario.pk in fired or scenario.exclude_recursion or scenario.always_on:
                continue
            for source in sources:
                keys = keywords_found(scenario=scenario, keywords=scenario.keyword_list,
                                      texts=[source.scenario.content])
                if not keys:
                    continue
                secondary = secondary_keywords_decide(scenario, searched)
                if secondary is None:
                    break
                reason = f"{_quoted(keys)} in the text of '{source.scenario.title}' (recursion)"
                if secondary:
                    reason += f", {secondary}"
                found.append(ScenarioMatch(scenario=scenario, reason=reason, keyword_hits=len(keys),
                                           trigger="recursion", keywords=tuple(keys),
                                           recursion_from=source.scenario.title))
                break
        run.accept(found)

    run.selection.state = run.new_state()
    return run.selection


def _key(scenario: Scenario) -> str:
    return str(scenario.pk)


def _quoted(keys: Sequence[str]) -> str:
    return ("keywords " if len(keys) > 1 else "keyword ") + ", ".join(f"'{key}'" for key in keys)


def budget_order(match: ScenarioMatch) -> tuple:
    """Constant scenarios first, then higher priority (SillyTavern's insertion order) first."""
    scenario = match.scenario
    return (scenario.always_on is False, -scenario.priority, scenario.title, scenario.pk or 0)


@dataclass
class _Run:
    count: int
    rng: random.Random
    budget: int
    cost: Callable[[Scenario], int]
    records: dict
    selection: WorldInfoSelection = field(default_factory=WorldInfoSelection)
    last_pass: list[ScenarioMatch] = field(default_factory=list)
    rejected: set = field(default_factory=set)  # ids that lost a roll or a group: never retried
    groups_won: dict = field(default_factory=dict)  # group name -> title of the winner
    spent: int = 0
    exhausted: bool = False

    def why_not(self, scenario: Scenario, character) -> str:
        if not character_filter_allows(scenario, character):
            return "it is not for this character (character filter)"
        if self.count < scenario.delay:
            return f"it is delayed until message {scenario.delay}"
        record = self.records.get(_key(scenario))
        if record and record["sticky_until"] < self.count <= record["cooldown_until"]:
            return f"it cools down until after message {record['cooldown_until']}"
        return ""

    def accept(self, found: list[ScenarioMatch]) -> None:
        """One pass: inclusion groups, then probability, then the budget."""
        self.last_pass = []
        survivors = self._group_winners(sorted(found, key=budget_order))
        for match in survivors:
            scenario = match.scenario
            if match.trigger != "sticky" and scenario.probability < 100:
                roll = round(self.rng.random() * 100, 2)
                if roll >= scenario.probability:
                    self.rejected.add(scenario.pk)
                    self.selection.left_out.append(
                        (scenario, f"{match.reason}, but the probability roll {roll:.0f} ≥ {scenario.probability}"))
                    continue
                match = replace(match, roll=roll,
                                reason=f"{match.reason}, probability roll {roll:.0f} < {scenario.probability}")
            if self.exhausted:
                self.selection.left_out.append((scenario, f"{match.reason}, but the token budget is spent"))
                continue
            tokens = self.cost(scenario)
            if self.spent + tokens > self.budget:
                self.exhausted = True  # SillyTavern: once the budget is spent, nothing more fires
                self.selection.left_out.append((scenario, f"{match.reason}, but over the token budget"))
                continue
            self.spent += tokens
            self.selection.matches.append(match)
            self.last_pass.append(match)

    def _group_winners(self, found: list[ScenarioMatch]) -> list[ScenarioMatch]:
        contenders: dict[str, list[ScenarioMatch]] = {}
        for match in found:
            for group in match.scenario.group_list:
                contenders.setdefault(group, []).append(match)
        losers: dict[int, str] = {}
        winners: dict[int, str] = {}
        for group, members in contenders.items():
            members = [m for m in members if id(m) not in losers]
            if not members:
                continue
            if group in self.groups_won:
                for member in members:
                    losers[id(member)] = f"inclusion group '{group}' already has '{self.groups_won[group]}'"
                continue
            winner = self._winner(members)
            self.groups_won[group] = winner.scenario.title
            winners[id(winner)] = group
            for member in members:
                if member is not winner:
                    losers[id(member)] = f"inclusion group '{group}' went to '{winner.scenario.title}'"
        kept = []
        for match in found:
            if id(match) in losers:
                self.rejected.add(match.scenario.pk)
                self.selection.left_out.append((match.scenario, f"{match.reason}, but {losers[id(match)]}"))
            elif id(match) in winners:
                group = winners[id(match)]
                kept.append(replace(match, group=group, reason=f"{match.reason}, won inclusion group '{group}'"))
            else:
                kept.append(match)
        return kept

    def _winner(self, members: list[ScenarioMatch]) -> ScenarioMatch:
        if len(members) == 1:
            return members[0]
        sticky = [m for m in members if m.trigger == "sticky"]
        if sticky:
            return sticky[0]
        prioritized = [m for m in members if m.scenario.group_prioritize]
        if prioritized:
            return max(prioritized, key=lambda m: (m.scenario.priority, -(m.scenario.pk or 0)))
        total = sum(m.scenario.group_weight for m in members)
        point = self.rng.random() * total
        for member in members:
            point -= member.scenario.group_weight
            if point < 0:
                return member
        return members[-1]

    def new_state(self) -> dict:
        state = {key: record for key, record in self.records.items() if record["cooldown_until"] >= self.count}
        for match in self.selection.matches:
            scenario = match.scenario
            if match.trigger in ("sticky", "forced") or not (scenario.sticky or scenario.cooldown):
                continue
            state[_key(scenario)] = {"at": self.count, "sticky_until": self.count + scenario.sticky,
                                     "cooldown_until": self.count + scenario.sticky + scenario.cooldown}
        return state
