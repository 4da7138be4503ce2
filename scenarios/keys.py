"""Trigger keys as editors write them: a comma-separated list in which a key written /pattern/flags is a
regular expression (as in SillyTavern) and keeps its own commas (/a{1,3}/). Pure functions, no database."""

import re

import regex

_REGEX_KEY = re.compile(r"^/(.+)/([a-z]*)$", re.DOTALL)
# Where a regular-expression key may end: its closing slash, flags, then a comma or the end of the list.
_REGEX_END = re.compile(r"/[a-z]*\s*(?:,|$)")


def split_keywords(text: str) -> list[str]:
    """The keys of a comma-separated list; a key that starts with "/" runs to the first "/flags" followed by a
    comma or the end, so commas inside a regular expression do not split it."""
    keys, text, start = [], text or "", 0
    while start < len(text):
        while start < len(text) and text[start].isspace():
            start += 1
        end = text.find(",", start)
        end = len(text) if end < 0 else end
        if text.startswith("/", start):
            closing = _REGEX_END.search(text, start + 2)
            while closing is not None and text[closing.start() - 1] == "\\":  # an escaped slash is inside
                closing = _REGEX_END.search(text, closing.start() + 1)
            if closing is not None:
                end = closing.end() - 1 if text[closing.end() - 1] == "," else closing.end()
        if text[start:end].strip():
            keys.append(text[start:end].strip())
        start = end + 1
    return keys


def is_regex_key(keyword: str) -> bool:
    """A key written as /pattern/flags is a regular expression (as in SillyTavern)."""
    return bool(_REGEX_KEY.match(keyword))


def regex_key_parts(keyword: str) -> tuple[str, str] | None:
    match = _REGEX_KEY.match(keyword)
    return (match.group(1), match.group(2)) if match else None


def regex_key_error(keyword: str) -> str:
    """Why a /regex/ key does not compile ("" when it does)."""
    pattern, _flags = regex_key_parts(keyword)
    try:
        regex.compile(pattern)  # the engine scenarios/selectors.py searches with
    except (regex.error, ValueError, OverflowError) as exc:
        return str(exc)
    return ""
