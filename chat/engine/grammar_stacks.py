"""How many parse stacks a GBNF grammar can make llama.cpp's grammar engine hold at once, found by rehearsal.

llama.cpp follows every way a grammar could still match the text so far as a separate stack, and compares each
new stack with all the others (a linear search) before keeping it. Alternatives that start alike and nest stay
alive side by side: a schema's `anyOf` of 64 array branches made `[[` cost 64 × 64 stacks, and one accepted token
then ran for minutes on the scheduler thread, stalling every request of the model. No time check can interrupt a
native call, so a grammar is rehearsed before it is used: this module parses the GBNF as llama.cpp does (literals
as characters; groups and repetitions as rules of their own), follows the same stacks in Python, and looks for
text that makes them many (a beam search over the characters the stacks accept next, from the start rule and
from every rule with alternatives). A grammar that reaches `limit` stacks, or is too large to rehearse, is refused. The search is a heuristic bounded by a work budget: a grammar it does not find
out stays guarded by the per-token allowance (GrammarTooCostly), which is checked after each native call.
"""

from __future__ import annotations

import hashlib
import re
import threading

MAX_STACKS = 1024  # llama.cpp's work per token explodes past it (4,096: minutes); real schemas reached 540 (JSONSchemaBench)
REHEARSAL_STEPS = 48  # characters of rehearsed text
BEAM = 4  # stack sets followed at each step
WORK_BUDGET = 100_000  # stack expansions per rehearsal: bounds its own cost (a fraction of a second)
MAX_ELEMENTS = 500_000  # grammar elements after repetitions are written out: a bigger grammar is not rehearsed but refused
MAX_STACK_DEPTH = 5_000  # positions on one stack
CANDIDATES = 24  # characters tried from each stack set

VERDICTS_KEPT = 1024
_verdicts: dict[bytes, bool] = {}  # grammar digest -> too many stacks, oldest first
_verdicts_lock = threading.Lock()
_RULE_START = re.compile(r"^([a-zA-Z0-9_-]+)\s*::=", re.MULTILINE)
_ANY = ((0, 0x10FFFF),)


class _Budget(Exception):
    pass


class _Grammar:
    """Rules as llama.cpp builds them: alternatives of elements, an element a character set or a rule index."""

    def __init__(self, text: str):
        self.rules: list[list[tuple]] = []
        self.names: dict[str, int] = {}
        self.size = 0  # elements written out so far (MAX_ELEMENTS)
        self.repetitions: set[int] = set()  # rules written for *, +, ?, {m,n}: "more or stop", no ambiguity of their own
        bodies = []
        starts = list(_RULE_START.finditer(text))
        for index, match in enumerate(starts):
            end = starts[index + 1].start() if index + 1 < len(starts) else len(text)
            bodies.append((match.group(1), text[match.end():end]))
            self._index(match.group(1))
        for name, body in bodies:
            self.text, self.at = body, 0
            self.rules[self.names[name]] = self._alternatives(nested=False)

    def _index(self, name: str) -> int:
        if name not in self.names:
            self.names[name] = len(self.rules)
            self.rules.append([])
        return self.names[name]

    def _new_rule(self, alternatives: list[tuple]) -> tuple:
        self.rules.append(alternatives)
        return ("r", len(self.rules) - 1)

    # -- parsing (one rule body at a time) --

    def _skip(self):
        while self.at < len(self.text):
            char = self.text[self.at]
            if char == "#":
                while self.at < len(self.text) and self.text[self.at] != "\n":
                    self.at += 1
            elif char.isspace():
                self.at += 1
            else:
                return

    def _alternatives(self, *, nested: bool) -> list[tuple]:
        alternatives = [self._sequence()]
        while True:
            self._skip()
            if self.at < len(self.text) and self.text[self.at] == "|":
                self.at += 1
                alternatives.append(self._sequence())
                continue
            if nested:
                if self.at >= len(self.text) or self.text[self.at] != ")":
                    raise ValueError("unclosed group")
                self.at += 1
            return alternatives

    def _sequence(self) -> tuple:
        elements: list[tuple] = []
        while True:
            self._skip()
            if self.at >= len(self.text) or self.text[self.at] in "|)":
                return tuple(elements)
            char = self.text[self.at]
            if char == '"':
                self.at += 1
                last = len(elements)
                while self.text[self.at] != '"':
                    code = self._char()
                    elements.append(("c", ((code, code),), False))
                self.at += 1
                item = elements[last:] if len(elements) > last else []
            elif char == "[":
                self.at += 1
                negated = self.text[self.at] == "^"
                self.at += negated
                ranges = []
                while self.text[self.at] != "]":
                    low = self._char()
                    high = low
                    if self.text[self.at] == "-" and self.text[self.at + 1] != "]":
                        self.at += 1
                        high = self._char()
                    ranges.append((low, high))
                self.at += 1
                elements.append(("c", tuple(ranges), negated))
                item = elements[-1:]
            elif char == ".":
                self.at += 1
                elements.append(("c", _ANY, False))
                item = elements[-1:]
            elif char == "(":
                self.at += 1
                elements.append(self._new_rule(self._alternatives(nested=True)))
                item = elements[-1:]
            else:
                match = re.compile(r"[a-zA-Z0-9_-]+").match(self.text, self.at)
                if not match:
                    raise ValueError(f"unexpected {char!r}")
                self.at = match.end()
                elements.append(("r", self._index(match.group())))
                item = elements[-1:]
            self._repetition(elements, tuple(item))

    def _repetition(self, elements: list[tuple], item: tuple) -> None:
        """Rewrite `item` (the last elements) when a repetition operator follows, as llama.cpp does."""
        self._skip()
        if self.at >= len(self.text) or self.text[self.at] not in "*+?{":
            return
        operator = self.text[self.at]
        if operator == "{":
            close = self.text.index("}", self.at)
            low_text, _, high_text = self.text[self.at + 1:close].partition(",")
            low = int(low_text.strip() or 0)
            high = low if "," not in self.text[self.at + 1:close] else (
                int(high_text) if high_text.strip() else None)
            self.at = close + 1
        else:
            self.at += 1
            low, high = {"*": (0, None), "+": (1, None), "?": (0, 1)}[operator]
        del elements[len(elements) - len(item):]
        self.size += len(item) * (low + 2 * ((high or low + 1) - low))
        if self.size > MAX_ELEMENTS:
            raise _Budget
        elements.extend(item * low)
        if high is None:
            star = len(self.rules)
            self.rules.append([])
            self.rules[star] = [item + (("r", star),), ()]
            self.repetitions.add(star)
            elements.append(("r", star))
        elif high > low:
            tail: tuple = ()
            for _ in range(high - low):  # (item (item ...)?)?
                tail = (self._new_rule([item + tail, ()]),)
                self.repetitions.add(tail[0][1])
            elements.extend(tail)

    def _char(self) -> int:
        char = self.text[self.at]
        if char != "\\":
            self.at += 1
            return ord(char)
        kind = self.text[self.at + 1]
        widths = {"x": 2, "u": 4, "U": 8}
        if kind in widths:
            digits = self.text[self.at + 2:self.at + 2 + widths[kind]]
            self.at += 2 + widths[kind]
            return int(digits, 16)
        self.at += 2
        return {"n": 10, "r": 13, "t": 9}.get(kind, ord(kind))


class _Stacks:
    """llama.cpp's stacks: tuples of positions (rule, alternative, element), the top last."""

    def __init__(self, grammar: _Grammar, work: list[int], budget: int = 0):
        self.rules, self.work = grammar.rules, work
        self.budget = budget or WORK_BUDGET

    def _end(self, position) -> bool:
        rule, alternative, element = position
        return element >= len(self.rules[rule][alternative])

    def advance(self, stack: tuple, into: set) -> None:
        """Expand rule references on top until a character is on top, as llama.cpp's advance_stack does (without
        recursion: a chain of a thousand optional properties is a thousand expansions, not a thousand frames)."""
        todo = [stack]
        while todo:
            stack = todo.pop()
            self.work[0] += 1
            if self.work[0] > self.budget:
                raise _Budget
            if not stack:
                into.add(stack)
                continue
            rule, alternative, element = stack[-1]
            kind, *detail = self.rules[rule][alternative][element]
            if kind != "r":
                into.add(stack)
                continue
            if len(stack) > MAX_STACK_DEPTH:  # left recursion (llama.cpp refuses it) or absurd nesting
                raise _Budget
            following = (rule, alternative, element + 1)
            base = stack[:-1] + (() if self._end(following) else (following,))
            for index, body in enumerate(self.rules[detail[0]]):
                todo.append(base + (((detail[0], index, 0),) if body else ()))

    def accept(self, stacks: frozenset, code: int) -> frozenset:
        new: set = set()
        for stack in stacks:
            if not stack:
                continue
            rule, alternative, element = stack[-1]
            _, ranges, negated = self.rules[rule][alternative][element]
            if any(low <= code <= high for low, high in ranges) == negated:
                continue
            following = (rule, alternative, element + 1)
            self.advance(stack[:-1] + (() if self._end(following) else (following,)), new)
        return frozenset(new)

    def candidates(self, stacks: frozenset) -> list[int]:
        """Characters the stacks accept next: one or two of each set (structural characters come first)."""
        found: dict[int, None] = {}
        for stack in stacks:
            if not stack:
                continue
            rule, alternative, element = stack[-1]
            _, ranges, negated = self.rules[rule][alternative][element]
            if negated:
                outside = next((c for c in b"a0 _~" if not any(lo <= c <= hi for lo, hi in ranges)), None)
                if outside is not None:
                    found.setdefault(outside, None)
            else:
                for low, high in ranges:
                    found.setdefault(low, None)
                    found.setdefault(high, None)
        return sorted(found, key=lambda code: (chr(code) not in '[{"', code))[:CANDIDATES]


def most_stacks(gbnf: str, *, limit: int = MAX_STACKS, root: str = "root") -> int:
    """The most stacks the rehearsal found (stopping at `limit`); `limit` itself for a grammar too large to
    rehearse (parsing it here would cost too much), 0 for text this parser cannot read (llama.cpp's then decides).

    The search starts from `root` and again from every rule with alternatives (named, or a group in parentheses): ambiguity belongs to a rule,
    and text before it (say 400 optional properties, each a path of its own) must not hide it from a beam that
    follows only the widest stack sets. The starts share one work budget; one that runs out reports what the
    search found until then."""
    try:
        grammar = _Grammar(gbnf)
    except _Budget:
        return limit
    except (ValueError, IndexError, StopIteration, RecursionError):
        return 0
    if root not in grammar.names:
        return 0
    root_index = grammar.names[root]
    starts = [root_index] + [index for index, alternatives in enumerate(grammar.rules)
                             if index != root_index and len(alternatives) > 1 and index not in grammar.repetitions]
    work, most = [0], 0
    for number, start in enumerate(starts):
        # The root may use half of the budget; each other start an equal share of what is left.
        left = WORK_BUDGET - work[0]
        share = left // 2 if number == 0 and len(starts) > 1 else left // (len(starts) - number)
        if share <= 0:
            break
        most = max(most, _rehearse(grammar, start, _Stacks(grammar, work, budget=work[0] + share), limit))
        if most >= limit:
            break
    return most


def _rehearse(grammar: _Grammar, start_rule: int, stacks_of: _Stacks, limit: int) -> int:
    start: set = set()
    most = 0
    try:
        for index, body in enumerate(grammar.rules[start_rule]):
            stacks_of.advance(((start_rule, index, 0),) if body else (), start)
        most = len(start)
        beam, seen = [frozenset(start)], {frozenset(start)}
        for _ in range(REHEARSAL_STEPS):
            if most >= limit:
                break
            following = []
            for stacks in beam:
                for code in stacks_of.candidates(stacks):
                    after = stacks_of.accept(stacks, code)
                    if after and after not in seen:
                        seen.add(after)
                        following.append(after)
                        most = max(most, len(after))
                        if most >= limit:
                            break
            beam = sorted(following, key=len, reverse=True)[:BEAM]
            if not beam:
                break
    except _Budget:
        pass
    return most


def too_many_stacks(gbnf: str) -> bool:
    """True when text exists (found by rehearsal) that makes llama.cpp follow MAX_STACKS parses at once."""
    # Remembered by digest: a grammar may be a megabyte, and clients repeat their schemas.
    digest = hashlib.blake2b(gbnf.encode("utf-8", "surrogatepass"), digest_size=16).digest()
    known = _verdicts.get(digest)
    if known is None:
        known = most_stacks(gbnf) >= MAX_STACKS
        with _verdicts_lock:
            _verdicts[digest] = known
            while len(_verdicts) > VERDICTS_KEPT:
                del _verdicts[next(iter(_verdicts))]
    return known
