"""{{char}} / {{user}} placeholders (also <BOT> / <USER>, any case), as Character Cards use them."""

from __future__ import annotations

import re

_PLACEHOLDER = re.compile(r"\{\{\s*(char|user)\s*\}\}|<(bot|user)>", re.IGNORECASE)
_START = re.compile(r"^[ \t]*<START>[ \t]*$", re.IGNORECASE | re.MULTILINE)


def placeholders_replace(text: str, *, char_name: str, user_name: str) -> str:
    """`text` with {{char}} and <BOT> replaced by the character's name, {{user}} and <USER> by the user's."""
    if not text:
        return ""

    def name(match: re.Match) -> str:
        which = (match.group(1) or match.group(2)).lower()
        return user_name if which == "user" else char_name

    return _PLACEHOLDER.sub(name, text)


def example_dialogue_blocks(text: str) -> list[str]:
    """The exchanges of an example dialogue, split at the cards' `<START>` lines."""
    return [block.strip() for block in _START.split(text or "") if block.strip()]
