"""The history of a group conversation as one speaker reads it: every line attributed to whoever wrote it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class GroupLine:
    """One stored message: its role, text, and who wrote it (a member's id and name, or a human's name)."""

    role: str
    content: str
    name: str  # the character's or the human's name
    speaker_id: int | None = None  # the member who wrote an assistant line


def group_turns_for(*, lines: Sequence[GroupLine], speaker_id: int, member_names: Sequence[str] = ()) -> list[dict]:
    """Chat turns for `speaker_id`'s reply: its own lines are the assistant's, everyone else's (the humans and
    the other characters) are user turns; every line starts with its writer's name, "Name: text". A human whose
    name is a member's (`member_names`) is told apart, "Ada (a person): text", so that no participant's line reads
    as the character's."""
    members = {name.casefold() for name in member_names}
    turns = []
    for line in lines:
        own = line.role == "assistant" and line.speaker_id == speaker_id
        name = f"{line.name} (a person)" if line.role != "assistant" and line.name.casefold() in members else line.name
        turns.append({"role": "assistant" if own else "user", "content": f"{name}: {line.content}"})
    return turns
