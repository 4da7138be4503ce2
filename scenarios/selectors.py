"""Which scenarios fire for a chat, and why: lorebook-style keyword matching with a BM25 fallback.

The rules (docs/PROMPTS.md):
- candidates are the enabled scenarios of the chat's character plus the global ones (no character);
- a scenario fires when one of its keywords appears in the last N messages (the user's new message
  is always one of them), N being the scenario's own `scan_depth`, else its character's lorebook
  `scan_depth`, else `SCENARIO_SCAN_DEPTH`, case-insensitively unless `case_sensitive`, as
  whole words unless `whole_words` is off; with secondary keywords set, one of those must appear too;
- `always_on` scenarios always fire;
- when no keyword fires any scenario, BM25 text relevance of the user's message against each
  scenario's title, content and keywords picks those scoring at least `SCENARIO_BM25_THRESHOLD`
  (among scenarios none of whose keywords appeared: one that the secondary keywords rejected stays out);
- rank: the character's own before global ones, then more keyword hits, then higher relevance,
  then higher priority.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

from django.conf import settings
import regex
from django.db.models import Q
from rank_bm25 import BM25Okapi

from .keys import regex_key_parts
from .models import Scenario

DEFAULT_SCAN_DEPTH = 4
DEFAULT_TOKEN_BUDGET = 400
DEFAULT_BM25_THRESHOLD = 0.3
# A /regex/ key comes from editors or imported files: a pattern that backtracks without end (/(a+)+$/) must not
# hold a worker. Each search stops after REGEX_KEY_TIMEOUT seconds (no match) and sees at most
# REGEX_KEY_MAX_CHARS of each text (the newest part: what the chat says last); so does text relevance (BM25).
REGEX_KEY_TIMEOUT = 0.05
REGEX_KEY_MAX_CHARS = 20_000

logger = logging.getLogger("llmsite.scenarios")
_timed_out_keys: set[str] = set()  # logged once each per process

_WORD = re.compile(r"\w+")
# Words that say nothing about a topic; without them a greeting cannot "match" every scenario.
_STOPWORDS = frozenset(
    """a about above after again against all am an and any are as at be because been before being below
    between both but by can could did do does doing down during each few for from further had has have
    having he her here hers herself him himself his how i if in into is it its itself just let me more
    most my myself no nor not now of off on once only or other our ours ourselves out over own same she
    should so some such than that the their theirs them themselves then there these they this those
    through to too under until up very was we were what when where which while who whom why will with
    would you your yours yourself yourselves hi hello hey please thanks thank yes ok okay oh tell know
    like get got want""".split()
)


@dataclass(frozen=True)
class ScenarioMatch:
    """One scenario that fired, with the human-readable reason shown to editors and stored with replies."""

    scenario: Scenario
    reason: str
    keyword_hits: int = 0
    relevance: float = 0.0
    # World Info (scenarios/world_info.py): how it fired, for the admin preview.
    trigger: str = ""  # "constant", "keyword", "recursion", "sticky", "relevance", "forced"
    keywords: tuple[str, ...] = ()  # the keys that matched
    recursion_from: str = ""  # the title of the scenario whose text fired it
    roll: float | None = None  # the probability roll (0-100) when its probability is below 100
    group: str = ""  # the inclusion group it won

    @property
    def linked(self) -> bool:
        """True for a scenario of the character itself (not a global one)."""
        return self.scenario.character_id is not None

    def rank_key(self) -> tuple:
        return (not self.linked, -self.keyword_hits, -self.relevance, -self.scenario.priority,
                self.scenario.title, self.scenario.pk or 0)


def scenarios_available(*, character=None) -> list[Scenario]:
    """Enabled scenarios that may fire for `character`: its own first, then the global ones."""
    scope = Q(character__isnull=True)
    if character is not None:
        scope |= Q(character=character)
    scenarios = Scenario.objects.filter(scope, enabled=True).select_related("character")
    return sorted(scenarios, key=lambda scenario: scenario.character_id is None)  # stable: keeps Meta.ordering


def scenarios_matching(
    *,
    character=None,
    texts: Sequence[str],
    scan_depth: int | None = None,
    bm25_threshold: float | None = None,
) -> list[ScenarioMatch]:
    """The scenarios that fire for a conversation, best first.

    `texts` are the messages' contents, oldest first, the user's new message last. Only the last
    few of them are scanned for keywords (at least the user's message): as many as the scenario's
    own scan depth, else the character's lorebook scan depth, else `scan_depth` (default
    SCENARIO_SCAN_DEPTH).
    """
    if scan_depth is None:
        scan_depth = getattr(settings, "SCENARIO_SCAN_DEPTH", DEFAULT_SCAN_DEPTH)
    if bm25_threshold is None:
        bm25_threshold = getattr(settings, "SCENARIO_BM25_THRESHOLD", DEFAULT_BM25_THRESHOLD)
    texts = list(texts)
    user_message = texts[-1] if texts else ""
    book_depth = getattr(character, "scan_depth", None)

    def earlier_for(scenario: Scenario) -> list[str]:
        depth = scenario.scan_depth or (book_depth if scenario.character_id else None) or scan_depth
        return texts[-max(1, depth):-1] if texts else []

    matches: list[ScenarioMatch] = []
    unmatched: list[Scenario] = []  # no keyword of theirs appeared: the BM25 fallback may still pick them
    for scenario in scenarios_available(character=character):
        match = _keyword_match(scenario, user_message=user_message, earlier=earlier_for(scenario))
        if match is _NO_KEYWORD:
            unmatched.append(scenario)
        elif match is not None:
            matches.append(match)
    if not any(match.keyword_hits for match in matches):
        matches.extend(_relevance_matches(unmatched, user_message=user_message, threshold=bm25_threshold))
    return sorted(matches, key=ScenarioMatch.rank_key)


def get_relevant_scenario(*, character=None, user_prompt: str, history: Sequence[str] = ()) -> Scenario | None:
    """The single most relevant scenario for a user's message (the original design's entry point)."""
    matches = scenarios_matching(character=character, texts=[*history, user_prompt])
    return matches[0].scenario if matches else None


def scenarios_within_budget(
    *,
    matches: Sequence[ScenarioMatch],
    cost: Callable[[Scenario], int],
    budget: int | None = None,
) -> tuple[list[ScenarioMatch], list[ScenarioMatch]]:
    """Split ranked matches into (inserted, left out) so the inserted ones cost at most `budget` tokens.

    Matches are taken in rank order; one that does not fit in what is left is left out and the next,
    smaller one may still fit. `cost(scenario)` is its token count as inserted.
    """
    if budget is None:
        budget = getattr(settings, "SCENARIO_TOKEN_BUDGET", DEFAULT_TOKEN_BUDGET)
    inserted, left_out, spent = [], [], 0
    for match in matches:
        tokens = cost(match.scenario)
        if spent + tokens <= budget:
            inserted.append(match)
            spent += tokens
        else:
            left_out.append(match)
    return inserted, left_out


# --- keyword rules ----------------------------------------------------------------------------------


_NO_KEYWORD = object()
NO_KEYWORD = _NO_KEYWORD  # keyword_match's answer when none of the keywords appeared


def keyword_match(scenario: Scenario, *, user_message: str, earlier: Sequence[str]):
    """The scenario's match for a chat; None when a keyword appeared but no secondary one did; or NO_KEYWORD."""
    return _keyword_match(scenario, user_message=user_message, earlier=earlier)


def relevance_matches(scenarios: Sequence[Scenario], *, user_message: str, threshold: float | None = None
                      ) -> list[ScenarioMatch]:
    """The BM25 fallback: scenarios whose text relevance to the user's message reaches `threshold`."""
    if threshold is None:
        threshold = getattr(settings, "SCENARIO_BM25_THRESHOLD", DEFAULT_BM25_THRESHOLD)
    return _relevance_matches(scenarios, user_message=user_message, threshold=threshold)


def _keyword_match(scenario: Scenario, *, user_message: str, earlier: Sequence[str]):
    """The match; None when a keyword appeared but no secondary keyword did (rejected); or _NO_KEYWORD."""
    if scenario.always_on:
        return ScenarioMatch(scenario=scenario, reason="always on", trigger="constant")
    in_user = _found(scenario, scenario.keyword_list, [user_message])
    in_earlier = [kw for kw in _found(scenario, scenario.keyword_list, earlier) if kw not in in_user]
    if not in_user and not in_earlier:
        return _NO_KEYWORD
    parts = []
    if in_user:
        parts.append(f"{_quoted('keyword', in_user)} in the user's message")
    if in_earlier:
        parts.append(f"{_quoted('keyword', in_earlier)} in a recent message")
    secondary = secondary_keywords_decide(scenario, [*earlier, user_message])
    if secondary is None:
        return None
    if secondary:
        parts.append(secondary)
    return ScenarioMatch(scenario=scenario, reason=", ".join(parts), keyword_hits=len(in_user) + len(in_earlier),
                         trigger="keyword", keywords=tuple(in_user + in_earlier))


def secondary_keywords_decide(scenario: Scenario, texts: Sequence[str]) -> str | None:
    """What the secondary keywords say about a scenario whose keyword appeared in `texts`, by its selective
    logic (SillyTavern's selectiveLogic): None when they reject it, else the reason to add ("" without any)."""
    secondary = scenario.secondary_keyword_list
    if not secondary:
        return ""
    found = _found(scenario, secondary, texts)
    missing = [keyword for keyword in secondary if keyword not in found]
    Logic = Scenario.SelectiveLogic
    logic = scenario.selective_logic
    if logic == Logic.NOT_ALL:
        return f"without {_quoted('secondary keyword', missing)}" if missing else None
    if logic == Logic.NOT_ANY:
        return "with no secondary keyword" if not found else None
    if logic == Logic.AND_ALL:
        return f"with every secondary keyword ({', '.join(repr(k) for k in found)})" if not missing else None
    return f"with {_quoted('secondary keyword', found)}" if found else None


def _found(scenario: Scenario, keywords: Sequence[str], texts: Sequence[str]) -> list[str]:
    return keywords_found(scenario=scenario, keywords=keywords, texts=texts)


def keywords_found(*, scenario: Scenario, keywords: Sequence[str], texts: Sequence[str]) -> list[str]:
    """The `keywords` that appear in one of `texts`, by the scenario's case and whole-word rules.

    A keyword written /pattern/flags is a regular expression (flag i ignores case); a malformed one never
    matches, nor one that runs out of time (REGEX_KEY_TIMEOUT)."""
    found = []
    for keyword in keywords:
        pattern = _pattern(keyword, scenario.case_sensitive, scenario.whole_words)
        if pattern is not None and any(_search(pattern, keyword, text) for text in texts):
            found.append(keyword)
    return found


def _search(pattern, keyword: str, text: str) -> bool:
    if isinstance(pattern, re.Pattern):  # an escaped plain keyword: linear time
        return pattern.search(text) is not None
    try:
        return pattern.search(text[-REGEX_KEY_MAX_CHARS:], timeout=REGEX_KEY_TIMEOUT) is not None
    except TimeoutError:
        if keyword not in _timed_out_keys:
            _timed_out_keys.add(keyword)
            logger.warning("Regex key %r ran out of time (%s s) and counts as no match.", keyword[:200],
                           REGEX_KEY_TIMEOUT)
        return False


@lru_cache(maxsize=2048)
def _pattern(keyword: str, case_sensitive: bool, whole_words: bool):
    """A compiled `re` pattern for a plain keyword; a `regex` pattern (searched with a timeout) for a /regex/ key."""
    parts = regex_key_parts(keyword)
    if parts is not None:
        body, flags = parts
        try:
            return regex.compile(body, (regex.IGNORECASE if "i" in flags else 0)
                                 | (regex.DOTALL if "s" in flags else 0) | (regex.MULTILINE if "m" in flags else 0))
        except (regex.error, ValueError, OverflowError):
            return None
    body = re.escape(keyword)
    if whole_words:
        # Lookarounds instead of \b so keywords that start or end with punctuation ("c++") still work.
        body = rf"(?<!\w){body}(?!\w)"
    return re.compile(body, 0 if case_sensitive else re.IGNORECASE)


def _quoted(noun: str, words: Sequence[str]) -> str:
    plural = "s" if len(words) > 1 else ""
    return f"{noun}{plural} " + ", ".join(f"'{word}'" for word in words)


# --- BM25 fallback ----------------------------------------------------------------------------------


class _LuceneBM25(BM25Okapi):
    """BM25Okapi with Lucene's IDF, log(1 + (N - n + 0.5) / (n + 0.5)), which is always positive.

    rank_bm25's classic IDF is zero or negative for a term in half the documents or more, which is
    most terms when a character has two or three scenarios.
    """

    def _calc_idf(self, nd):
        for word, freq in nd.items():
            self.idf[word] = self.idf_of(freq)
        self.average_idf = sum(self.idf.values()) / len(self.idf) if self.idf else 0.0

    def idf_of(self, document_frequency: int) -> float:
        return math.log(1 + (self.corpus_size - document_frequency + 0.5) / (document_frequency + 0.5))


def text_terms(text: str) -> list[str]:
    """Lower-cased, lightly stemmed content words of a text (the BM25 vocabulary)."""
    return [_stem(word) for word in _WORD.findall(text.lower()) if word not in _STOPWORDS and len(word) > 1]


def _stem(word: str) -> str:
    # Just enough folding that "storms" meets "storm" and "jammed" meets "jams".
    for suffix in ("ing", "ed", "es", "s", "e"):
        if word.endswith(suffix) and len(word) - len(suffix) >= 3:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiou":
                word = word[:-1]  # "jamm" -> "jam"
            break
    return word


def scenario_relevance(*, scenarios: Sequence[Scenario], text: str) -> list[float]:
    """BM25 relevance of `text` to each scenario, normalised to about 0–1.

    1.0 means every content word of the text appears (once) in the scenario; words the scenarios
    never use count against the score at the weight of the rarest word. Scenarios are documents of
    title, keywords and content.
    """
    documents = [text_terms(f"{s.title} {s.keywords} {s.secondary_keywords} {s.content}") for s in scenarios]
    query = list(dict.fromkeys(text_terms(text[-REGEX_KEY_MAX_CHARS:])))  # the newest part, as for regex keys
    if not scenarios or not query or not any(documents):
        return [0.0] * len(scenarios)
    bm25 = _LuceneBM25(documents)
    ideal = sum(bm25.idf.get(term) or bm25.idf_of(0) for term in query)
    # Terms no scenario has score nothing: scoring them would cost a pass over the scenarios each.
    scores = bm25.get_scores([term for term in query if term in bm25.idf])
    return [min(1.0, float(score) / ideal) for score in scores]


def _relevance_matches(scenarios: Sequence[Scenario], *, user_message: str, threshold: float) -> list[ScenarioMatch]:
    scores = scenario_relevance(scenarios=scenarios, text=user_message)
    return [
        ScenarioMatch(scenario=scenario, reason=f"text relevance {score:.2f} (no keyword matched)",
                      relevance=round(score, 4), trigger="relevance")
        for scenario, score in zip(scenarios, scores)
        if score > 0 and score >= threshold
    ]
