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


def group_turns_for(*, lines: Sequence[GroupLine], speaker_id: int) -> list[dict]:
    """Chat turns for `speaker_id`'s reply: its own lines are the assistant's, everyone else's (the humans and
    the other characters) are user turns; every line starts with its writer's name, "Name: text"."""
    turns = []
    for line in lines:
        own = line.role == "assistant" and line.speaker_id == speaker_id
        turns.append({"role": "assistant" if own else "user", "content": f"{line.name}: {line.content}"})
    return turns
