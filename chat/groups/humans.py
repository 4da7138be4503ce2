"""The names the humans of a group conversation go by in its lines, told apart from one another.

The owner's name is whatever its first request's `name` said, the others' are their accounts' first names (or
usernames): an owner calling itself "Bob" beside the participant Bob, or two participants called Alex, wrote lines
that read alike, so the model could not tell who said what. Humans whose names read alike get their username
after the name, "Bob (@bob)"; usernames are unique. A name is compared without what is in parentheses and without
"@", so that nobody can pick a name that reads as another's told-apart form, and colons are taken out of names,
so that no name ("Bob: I agree. Sam") starts what reads as another's line."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

from .history import as_read

_PARENTHESES_AND_AT = re.compile(r"\([^)]*\)?|@")


@dataclass(frozen=True)
class Human:
    """A human of the conversation: an account id, the name it goes by there and its username."""

    pk: int
    name: str
    username: str


def human_labels(humans: list[Human]) -> dict[int, str]:
    """Account id -> the name its lines start with: the name without colons, and with " (@username)" after it when
    another human's name reads alike (`as_read`, parentheses and "@" left out)."""
    names = {human.pk: _without_colons(human.name) or human.username for human in humans}
    keys = {pk: _compared(name) for pk, name in names.items()}
    counts = Counter(keys.values())
    return {human.pk: f"{names[human.pk]} (@{human.username})" if counts[keys[human.pk]] > 1 else names[human.pk]
            for human in humans}


def _without_colons(name: str) -> str:
    """`name` with every character that reads as a colon (":", the full-width "：", "﹕"...) removed."""
    return " ".join("".join(c for c in name if ":" not in unicodedata.normalize("NFKC", c)).split())


def _compared(name: str) -> str:
    return as_read(_PARENTHESES_AND_AT.sub(" ", unicodedata.normalize("NFKC", name)))
