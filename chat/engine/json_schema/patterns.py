"""GBNF for the JSON text of strings that match a `pattern` (a regular expression), from Python's own parser.

The grammar writes one full match of the pattern, so `re.search(pattern, value)` (how validators check
it) finds it. Characters JSON must escape are written escaped. Supported: literals, classes, `.`,
groups, alternation, repetition, `^`/`$` at the ends; refused: lookarounds, backreferences, `\\b`,
flags, and repeating something that can match nothing (its grammar is exponential work for the sampler).
"""

from __future__ import annotations

import json
import warnings

try:
    import re._parser as sre  # Python 3.11+
    from re import _constants as c
except ImportError:  # pragma: no cover
    import sre_parse as sre
    import sre_constants as c

from .errors import SchemaNotConvertible

MAX_REPEAT = 1000
# Repetitions nested in repetitions, ((a{1,20}){10,20}){10,20}: after n characters llama.cpp's grammar sampler keeps
# a stack for every way to share them out among the copies it writes of each bounded repetition, and merges them by
# a linear search: measured 0.1-1.7 s a token on the scheduler's thread (every stream waits). The counts' product
# along a nesting is bounded here (IPv4's (\.\d{1,3}){3} is 9); what stays expensive is stopped at run time
# (the engine's grammar CPU allowance).
MAX_NESTED_SPREAD = 256
SPECIAL = {ord('"'), ord("\\")} | set(range(0x20)) | {0x7F}  # JSON writes these escaped


class _Refused(Exception):
    pass


def _escaped(code: int) -> str:
    """GBNF literal of the JSON text for one character."""
    text = json.dumps(chr(code))[1:-1]
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _class_char(code: int) -> str:
    char = chr(code)
    if char.isalnum() and code < 0x80 or code > 0x7F and code not in (0x2028, 0x2029):
        return char
    return f"\\x{code:02X}" if code <= 0xFF else f"\\u{code:04X}"  # \x takes two digits: \x2028 is " " then "28"


def _class(ranges: list[tuple[int, int]], negate: bool, *, ascii_only: bool = False) -> str:
    r"""A character class without the characters JSON escapes (written escaped instead, when listed).

    `ascii_only`: a negated class that stands for \s, \d or \w, which in Python match Unicode spaces,
    digits and letters too; the grammar then writes only ASCII characters outside the class."""
    if negate:
        body = "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}" for a, b in ranges)
        beyond = "\\x7F-\\U0010FFFF" if ascii_only else "\\x7F"
        return f'[^{body}"\\\\\\x00-\\x1F{beyond}]'
    plain, escaped = [], []
    for a, b in ranges:
        start = a
        for code in range(a, min(b, 0x7F) + 1) if a <= 0x7F else []:
            if code in SPECIAL:
                if start < code:
                    plain.append((start, code - 1))
                escaped.append(code)
                start = code + 1
        if start <= b:
            plain.append((start, b))
    parts = []
    if plain:
        parts.append("[" + "".join(_class_char(a) if a == b else f"{_class_char(a)}-{_class_char(b)}"
                                   for a, b in plain) + "]")
    parts += [_escaped(code) for code in escaped]
    if not parts:
        raise _Refused("an empty character class")
    return parts[0] if len(parts) == 1 else "(" + " | ".join(parts) + ")"


CATEGORIES = {
    c.CATEGORY_DIGIT: [(0x30, 0x39)],
    c.CATEGORY_WORD: [(0x30, 0x39), (0x41, 0x5A), (0x5F, 0x5F), (0x61, 0x7A)],
    c.CATEGORY_SPACE: [(0x20, 0x20)],
}
NEGATED = {c.CATEGORY_NOT_DIGIT: c.CATEGORY_DIGIT, c.CATEGORY_NOT_WORD: c.CATEGORY_WORD,
           c.CATEGORY_NOT_SPACE: c.CATEGORY_SPACE}


def _in(items) -> str:
    negate, ranges = False, []
    for op, arg in items:
        if op is c.NEGATE:
            negate = True
        elif op is c.LITERAL:
            ranges.append((arg, arg))
        elif op is c.RANGE:
            ranges.append(arg)
        elif op is c.CATEGORY and arg in CATEGORIES:
            ranges += CATEGORIES[arg]
        elif op is c.CATEGORY and arg in NEGATED and len(items) == 1:
            return _class(CATEGORIES[NEGATED[arg]], True, ascii_only=True)
        else:
            raise _Refused("this character class")
    categories = any(op is c.CATEGORY for op, _arg in items)
    return _class(ranges, negate, ascii_only=negate and categories)


def _sequence(items, *, at_start: bool, at_end: bool) -> tuple[str, int, int | None]:
    parts, low, high = [], 0, 0
    items = list(items)
    for index, (op, arg) in enumerate(items):
        first, last = at_start and index == 0, at_end and index == len(items) - 1
        if op is c.AT:
            if arg in (c.AT_BEGINNING, c.AT_BEGINNING_STRING) and first:
                continue
            if arg in (c.AT_END, c.AT_END_STRING) and last:
                continue
            raise _Refused("an anchor inside the pattern")
        text, a, b = _item(op, arg, first=first, last=last)
        parts.append(text)
        low += a
        high = None if high is None or b is None else high + b
    return (" ".join(parts) if parts else '""'), low, high


def _item(op, arg, *, first: bool, last: bool) -> tuple[str, int, int | None]:
    if op is c.LITERAL:
        return (_escaped(arg) if arg in SPECIAL else f'"{chr(arg)}"'), 1, 1
    if op is c.NOT_LITERAL:
        return _class([(arg, arg)], True), 1, 1
    if op is c.ANY:
        return _class([], True), 1, 1
    if op is c.IN:
        return _in(arg), 1, 1
    if op is c.BRANCH:
        alternatives = [_sequence(branch, at_start=first, at_end=last) for branch in arg[1]]
        low = min(a[1] for a in alternatives)
        high = None if any(a[2] is None for a in alternatives) else max(a[2] for a in alternatives)
        return "(" + " | ".join(a[0] for a in alternatives) + ")", low, high
    if op is c.SUBPATTERN:
        _group, add_flags, del_flags, inner = arg
        if add_flags or del_flags:
            raise _Refused("flags")
        text, low, high = _sequence(inner, at_start=first, at_end=last)
        return f"({text})", low, high
    if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
        low, high, inner = arg
        if low > MAX_REPEAT or (high != c.MAXREPEAT and high > MAX_REPEAT):
            raise _Refused("a repetition above 1000")
        text, a, b = _sequence(inner, at_start=False, at_end=False)
        bound = None if high == c.MAXREPEAT else high
        if a == 0 and (low, bound) != (0, 1):
            # Each empty turn is another way to the same place: nested, llama.cpp's grammar sampler follows them
            # all, and ((a?){0,12}){0,12} took 2.7 s per token (longer bounds: hours) on the scheduler's thread.
            raise _Refused("a repetition of something that can match nothing, such as (a?)* (write a* instead)")
        suffix = ("*" if low == 0 else "+" if low == 1 else f"{{{low},}}") if bound is None else (
            "?" if (low, bound) == (0, 1) else f"{{{low}}}" if low == bound else f"{{{low},{bound}}}")
        return f"({text}){suffix}", a * low, None if bound is None or b is None else b * bound
    raise _Refused(str(op).lower())


def pattern_grammar(pattern, path: str, low: int = 0, high: int | None = None) -> str:
    """GBNF of the JSON string content for `pattern`, whose value is also low..high characters long."""
    if not isinstance(pattern, str):
        raise SchemaNotConvertible("'pattern' must be a string", keyword="pattern", path=path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = sre.parse(pattern)
    except Exception:
        raise SchemaNotConvertible("'pattern' is not a regular expression", keyword="pattern", path=path,
                                   unsatisfiable=True) from None
    if parsed.state.flags & ~(c.SRE_FLAG_UNICODE | getattr(c, "SRE_FLAG_TEMPLATE", 0)):
        raise SchemaNotConvertible("'pattern' with flags is not supported", keyword="pattern", path=path)
    items = list(parsed)
    if _spread(items) > MAX_NESTED_SPREAD:
        raise SchemaNotConvertible(f"'pattern' nests repetitions whose counts multiply past {MAX_NESTED_SPREAD} "
                                   "(such as (a{1,20}){10,20}); write one repetition instead", keyword="pattern",
                                   path=path)
    anchored_end = bool(items) and items[-1][0] is c.AT and items[-1][1] in (c.AT_END, c.AT_END_STRING)
    try:
        text, shortest, longest = _sequence(items, at_start=True, at_end=True)
        if shortest >= low and (high is None or (longest is not None and longest <= high)):
            return text
        if not anchored_end and longest is not None and (high is None or longest <= high):
            # The value only has to contain a match: pad it after the match to reach minLength.
            pad_low = max(low - shortest, 0)
            pad_high = None if high is None else high - longest
            if pad_high is None or pad_low <= pad_high:
                return f"{text} {_pad(pad_low, pad_high)}"
        try:
            return _fitted(items, low, high)
        except _NoRoom:
            return _capped_to_fit(items, low, high, anchored_end)
    except (_Refused, RecursionError) as exc:
        raise SchemaNotConvertible(f"'pattern' uses {exc}, which is not supported", keyword="pattern",
                                   path=path) from None
    except _NoRoom:
        raise SchemaNotConvertible("'pattern' and 'minLength'/'maxLength' together", keyword="pattern",
                                   path=path) from None


class _NoRoom(Exception):
    pass


REPEATS = (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None))


def _spread(items) -> int:
    """The largest product of repetition counts along a nesting of repetitions with something variable inside
    ((a{1,20}){10,20}: 400); 1 where nothing is nested so."""
    return _counts(items)[1]


def _counts(items) -> tuple[int, int]:
    """(the largest product of counts along one nesting path in `items`, the largest such product of a nesting
    around something variable). A repetition of something fixed counts its largest count if that varies, else 1
    (a fixed block); an unbounded one counts its least (llama.cpp writes that many copies, then right recursion)."""
    path, nested = 1, 1
    for op, arg in items:
        if op in REPEATS:
            low, high, inner = arg
            inner_path, inner_nested = _counts(inner)
            count = max(low, 1) if high == c.MAXREPEAT else high
            if inner_path > 1 or _varies(inner):
                here = count * inner_path
                nested = max(nested, inner_nested, here)
            else:
                here = count if high != low else 1
            path = max(path, here)
        elif op is c.BRANCH:
            for branch in arg[1]:
                branch_path, branch_nested = _counts(branch)
                path, nested = max(path, branch_path), max(nested, branch_nested)
        elif op is c.SUBPATTERN:
            inner_path, inner_nested = _counts(arg[3])
            path, nested = max(path, inner_path), max(nested, inner_nested)
    return path, nested


def _varies(items) -> bool:
    """Whether `items` hold a repetition whose count varies (their length is not fixed by it)."""
    for op, arg in items:
        if op in REPEATS and (arg[0] != arg[1] or _varies(arg[2])):
            return True
        if op is c.BRANCH and any(_varies(branch) for branch in arg[1]):
            return True
        if op is c.SUBPATTERN and _varies(arg[3]):
            return True
    return False


def _pad(low: int, high: int | None) -> str:
    char = _class([], True)
    return f"{char}{{{low},}}" if high is None else f"{char}{{{low},{high}}}"


def _fitted(items, low: int, high: int | None) -> str:
    """The pattern with its one variable repetition (of a single character) bounded so the length fits."""
    body = [item for item in items if item[0] is not c.AT]
    variable = [i for i, (op, arg) in enumerate(body)
                if op in (c.MAX_REPEAT, c.MIN_REPEAT) and arg[0] != arg[1]]
    if len(variable) != 1:
        raise _NoRoom
    index = variable[0]
    rep_low, rep_high, inner = body[index][1]
    inner_text, a, b = _sequence(inner, at_start=False, at_end=False)
    fixed_low = 0  # the fixed items are exact (x == y), so one sum serves both bounds
    for i, (op, arg) in enumerate(body):
        if i != index:
            _text, x, y = _item(op, arg, first=False, last=False)
            if y is None or x != y:
                raise _NoRoom
            fixed_low += x
    if (a, b) != (1, 1):
        raise _NoRoom
    top = c.MAXREPEAT if rep_high == c.MAXREPEAT else rep_high
    new_low = max(rep_low, low - fixed_low)
    new_high = top if high is None else min(top, high - fixed_low)
    if new_high != c.MAXREPEAT and new_low > new_high:
        raise _NoRoom
    if new_high != c.MAXREPEAT and new_high > MAX_REPEAT:
        new_high = max(new_low, MAX_REPEAT)
    bounded = list(items)
    position = items.index(body[index])
    bounded[position] = (body[index][0], (new_low, new_high, inner))
    text, _x, _y = _sequence(bounded, at_start=True, at_end=True)
    return text


def _capped(items, cap: int) -> list:
    """`items` with every repetition allowed at most `cap` more than its minimum (a subset of the matches)."""
    out = []
    for op, arg in items:
        if op in (c.MAX_REPEAT, c.MIN_REPEAT, getattr(c, "POSSESSIVE_REPEAT", None)):
            low, high, inner = arg
            top = low + cap if high == c.MAXREPEAT else min(high, low + cap)
            out.append((op, (low, top, _capped(inner, cap))))
        elif op is c.SUBPATTERN:
            group, add_flags, del_flags, inner = arg
            out.append((op, (group, add_flags, del_flags, _capped(inner, cap))))
        elif op is c.BRANCH:
            out.append((op, (arg[0], [_capped(branch, cap) for branch in arg[1]])))
        else:
            out.append((op, arg))
    return out


def _capped_to_fit(items, low: int, high: int | None, anchored_end: bool) -> str:
    """Repetitions capped until the longest match fits maxLength; padding (unanchored end) for minLength."""
    for cap in (64, 32, 16, 8, 4, 2, 1, 0):
        text, shortest, longest = _sequence(_capped(items, cap), at_start=True, at_end=True)
        if high is not None and (longest is None or longest > high):
            continue
        if shortest >= low:
            return text
        if not anchored_end:
            return f"{text} {_pad(low - shortest, None if high is None else high - longest)}"
        break
    raise _NoRoom
