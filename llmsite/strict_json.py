"""JSON as request bodies and imported files must be: finite numbers, no lone surrogates or NUL characters,
bounded nesting.

Python's json reads NaN, Infinity and 1e400 (as inf) and 5,000-digit integers, nests as deep as the stack
goes, and decodes "\\ud800" and "\\u0000": each later failed as a server error (int(inf), a sort, a
tokenizer, the database's text encoding) instead of telling the sender what is wrong with the text.
Nesting is bounded by MAX_NESTING, well within the stack: a value that json.loads just managed to read (about 900
levels under a view) could not be written back (a JSONField's json.dumps, an export) and was a server error.
"""

from __future__ import annotations

import json
import math

MAX_NESTING = 256  # arrays and objects inside one another; far beyond any card, request or JSON Schema we take


class StrictJSONError(ValueError):
    """Why the text is not acceptable JSON, in words for whoever sent it (no internal message)."""


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise StrictJSONError(f"the number {text[:20]} is too large")
    return value


def _no_constant(name: str):
    raise StrictJSONError(f"{name}, which JSON does not allow")


def strict_json_loads(text: str | bytes):
    try:
        value = json.loads(text, parse_float=_finite, parse_constant=_no_constant)
    except StrictJSONError:
        raise
    except json.JSONDecodeError as exc:
        raise StrictJSONError(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise StrictJSONError("it is nested too deeply") from None
    except ValueError:  # an integer of thousands of digits
        raise StrictJSONError("a number is too long") from None
    _check_text(value)
    return value


def _check_text(value) -> None:
    """Every string (keys too) encodable and free of NUL, and nesting within MAX_NESTING; iterative, so depth costs
    no stack."""
    pending = [(value, 0)]
    while pending:
        item, depth = pending.pop()
        if isinstance(item, (dict, list)):
            if depth >= MAX_NESTING:
                raise StrictJSONError(f"it is nested too deeply (more than {MAX_NESTING} levels)")
            inner = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            pending.extend((each, depth + 1) for each in inner)
        elif isinstance(item, str):
            if "\x00" in item:
                raise StrictJSONError("a NUL character, which text fields cannot hold")
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise StrictJSONError("an invalid Unicode escape (a lone surrogate)") from None
