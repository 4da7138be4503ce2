"""GBNF for decimal numbers within bounds: integer ranges digit by digit, numbers with whole-number bounds.

An integer range [lo, hi] is split into runs of equal digit count, and each run into alternatives of
the form `prefix [a-b] [0-9]{k}` (the usual range-to-pattern construction, as llama.cpp's converter
does it). Numbers with bounds are written without exponent, with at most FRACTION_DIGITS decimals, so
that a reply parses to a float on the right side of its bound.
"""

from __future__ import annotations

MAX_DIGITS = 16         # integers of up to this many digits (beyond, float rounding blurs bounds anyway)
FRACTION_DIGITS = 6     # decimals of a bounded number: with bounds of up to 9 digits, 15 significant digits


def _lit(text: str) -> str:
    return f'"{text}"'


def _digits(low: int, high: int) -> str:
    return _lit(str(low)) if low == high else ("[0-9]" if (low, high) == (0, 9) else f"[{low}-{high}]")


def _any_digits(count: int) -> list[str]:
    return [] if count == 0 else (["[0-9]"] if count == 1 else [f"[0-9]{{{count}}}"])


def _same_length(low: str, high: str) -> list[list[str]]:
    """Alternatives (lists of atoms) matching the digit strings from `low` to `high`, of equal length."""
    if not low:
        return [[]]
    if low[0] == high[0]:
        return [[_lit(low[0])] + rest for rest in _same_length(low[1:], high[1:])]
    tail = len(low) - 1
    first, last = int(low[0]), int(high[0])
    out: list[list[str]] = []
    if low[1:] == "0" * tail:
        full_from = first
    else:
        out += [[_lit(low[0])] + rest for rest in _same_length(low[1:], "9" * tail)]
        full_from = first + 1
    high_full = high[1:] == "9" * tail
    full_to = last if high_full else last - 1
    if full_from <= full_to:
        out.append([_digits(full_from, full_to)] + _any_digits(tail))
    if not high_full:
        out += [[_lit(high[0])] + rest for rest in _same_length("0" * tail, high[1:])]
    return out


def natural_range(low: int, high: int | None) -> str | None:
    """Alternatives for the decimal integers low..high (0 <= low; high None: no upper bound); None if empty."""
    if high is not None and low > high:
        return None
    alternatives: list[list[str]] = []
    top = len(str(high)) if high is not None else max(MAX_DIGITS, len(str(low)))
    for length in range(len(str(low)), top + 1):
        start = max(low, 10 ** (length - 1) if length > 1 else 0)
        end = 10 ** length - 1 if high is None else min(high, 10 ** length - 1)
        if start > end:
            continue
        if high is None and length > 1 and start == 10 ** (length - 1):
            alternatives.append([f"[1-9][0-9]{{{length - 1},{max(MAX_DIGITS, length) - 1}}}"])
            break
        alternatives += _same_length(str(start), str(end))
    return " | ".join(" ".join(atoms) or '""' for atoms in alternatives) if alternatives else None


def integer_range(low: int | None, high: int | None) -> str | None:
    """GBNF for the JSON integers low..high (None: unbounded on that side); None if there is none."""
    if low is not None and high is not None and low > high:
        return None
    alternatives = []
    if high is None or high >= 0:
        natural = natural_range(max(low, 0) if low is not None else 0, high)
        if natural:
            alternatives.append(f"({natural})")
    if low is None or low < 0:
        magnitude = natural_range(max(1, -high) if high is not None else 1, -low if low is not None else None)
        if magnitude:
            alternatives.append(f'"-" ({magnitude})')
    return " | ".join(alternatives) or None


def _non_negative_number(low: int, low_exclusive: bool, high: int | None, high_exclusive: bool,
                         fraction_digits: int = FRACTION_DIGITS) -> str | None:
    """Decimals y with low <(=) y <(=) high, 0 <= low, whole-number bounds, no exponent."""
    if high is not None and (low > high or (low == high and (low_exclusive or high_exclusive))):
        return None
    fraction = f'"." [0-9]{{1,{fraction_digits}}}'
    alternatives = []
    start = low
    if low_exclusive:  # low itself with a non-zero fraction
        alternatives.append(f'"{low}" "." [0-9]{{0,{fraction_digits - 1}}} [1-9]')
        start = low + 1
    end = None if high is None else high - 1
    whole = natural_range(start, end)
    if whole:
        alternatives.append(f"({whole}) ({fraction})?")
    if high is not None and not high_exclusive and high >= start:
        alternatives.append(_lit(str(high)))
    return " | ".join(f"({a})" for a in alternatives) or None


def bounded_number(low: int | None, low_exclusive: bool, high: int | None, high_exclusive: bool) -> str | None:
    """GBNF for JSON numbers between whole-number bounds (None: unbounded on that side); None if none fits."""
    alternatives = []
    if high is None or high > 0 or (high == 0 and not high_exclusive):
        start, start_exclusive = (low, low_exclusive) if low is not None and low >= 0 else (0, False)
        positive = _non_negative_number(start, start_exclusive, high, high_exclusive)
        if positive:
            alternatives.append(f"({positive})")
    if low is None or low < 0:
        start, start_exclusive = (-high, high_exclusive) if high is not None and high < 0 else (0, True)
        end, end_exclusive = (-low, low_exclusive) if low is not None else (None, False)
        negative = _non_negative_number(start, start_exclusive, end, end_exclusive)
        if negative:
            alternatives.append(f'"-" ({negative})')
    return " | ".join(alternatives) or None
