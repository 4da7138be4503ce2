"""The history of a group conversation as one speaker reads it: every line attributed to whoever wrote it."""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import regex

# Put before a line inside a message that starts as a real line does ("Bob: ..."): it reads as quoted text
# within the message of whoever wrote it, never as a line of its own.
QUOTED_LINE_MARK = "> "
HUMAN_SUFFIX = " (a person)"  # after a human's name that is also a member's


@dataclass(frozen=True)
class GroupLine:
    """One stored message: its role, text, and who wrote it (a member's id and name, or a human's name)."""

    role: str
    content: str
    name: str  # the character's or the human's name
    speaker_id: int | None = None  # the member who wrote an assistant line


def group_turns_for(*, lines: Sequence[GroupLine], speaker_id: int, member_names: Sequence[str] = (),
                    participant_names: Sequence[str] = ()) -> list[dict]:
    """Chat turns for `speaker_id`'s reply: its own lines are the assistant's, everyone else's (the humans and
    the other characters) are user turns; every line starts with its writer's name, "Name: text". A human whose
    name reads as a member's (`member_names`; compared as read, `as_read`: "Cy_Stone", "_Ada_" or full-width "Ａｄａ"
    read as "Cy Stone" and "Ada") is told apart, "Ada (a person): text", so that no participant's line reads as the
    character's. Within a line's text, a line that starts with a name someone in the chat goes by (a
    member, a participant, anyone who wrote a line, "User") and a colon is quoted, "> Bob: ...", so that nobody,
    human or model, writes what reads as another's line."""
    members = {as_read(name) for name in member_names} - {""}
    line_start = _line_start_of(names=[*member_names, *participant_names, *(line.name for line in lines), "User"])
    turns = []
    for line in lines:
        own = line.role == "assistant" and line.speaker_id == speaker_id
        human_named_as_member = line.role != "assistant" and as_read(line.name) in members
        name = f"{line.name}{HUMAN_SUFFIX}" if human_named_as_member else line.name
        turns.append({"role": "assistant" if own else "user",
                      "content": f"{name}: {_quote_line_starts(line.content, line_start)}"})
    return turns


_SPACES_AND_EMPHASIS = re.compile(r"[\s*_]+")
_FORMAT_CHARACTERS = regex.compile(r"\p{Cf}+")


def _line_start_of(*, names: Iterable[str]) -> re.Pattern:
    """What starts a line of one of `names`, in a line's `as_read` form: the name, optionally marked a person, then
    a colon ("**Bob:**", "_Bob_ :" and "Bob (a person):" all read "bob:" or "bob :" there). Only single spaces are
    left in that form, so the pattern has no two quantifiers that could share a run of spaces (with "\\s*" on each
    side of optional parts, a name and 3,000 spaces took 18 s to match)."""
    spelled = sorted({as_read(name) for name in names} - {""}, key=len, reverse=True)  # longest first
    alternatives = "|".join(re.escape(name) for name in spelled)
    return re.compile(rf"(?:{alternatives})(?: ?{re.escape(as_read(HUMAN_SUFFIX))})? ?:")


def as_read(text: str) -> str:
    """`text` as a reader sees it, for matching: NFKC (a full-width colon is ":", a no-break or ideographic space is
    a space, full-width letters are plain), format characters (Unicode Cf: zero-width spaces and joiners, direction
    marks) dropped, since they show as nothing, markdown emphasis marks and runs of spaces made one space, stripped,
    case folded."""
    visible = _FORMAT_CHARACTERS.sub("", unicodedata.normalize("NFKC", text))
    return _SPACES_AND_EMPHASIS.sub(" ", visible).strip().casefold()


def _quote_line_starts(text: str, line_start: re.Pattern) -> str:
    """`text` with each of its lines after the first that reads as a line of the chat (`as_read`) quoted. The first
    follows the writer's own "Name: ", so it cannot start a line; every line is kept as it was written, only marked."""
    first, *rest = text.splitlines(keepends=True) or [""]
    return first + "".join(QUOTED_LINE_MARK + line if line_start.match(_start_as_read(line)) else line
                           for line in rest)


def _start_as_read(line: str) -> str:
    """`line` as read (`as_read`), whole: padding anywhere before the colon (spaces, zero-width characters, emphasis
    marks, full-width ones) must not push it out of view. Every step is a C-speed pass (normalize, compiled
    patterns), so a long history costs milliseconds, not a loop over its characters."""
    return as_read(line)
