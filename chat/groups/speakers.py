"""Who speaks next in a group conversation: pure functions over the members and the last message."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence

NATURAL = "natural"
ROUND_ROBIN = "round_robin"


def speaker_choose(*, members: Sequence, last_text: str, last_speaker_id: int | None, mode: str = NATURAL,
                   rng: random.Random | None = None):
    """The member who replies next.

    natural: a member named in the last message (the earliest named there), else one drawn by the members'
    talkativeness weights (all equal when every weight is 0); never the last speaker unless alone.
    round_robin: the member after the last speaker, in member order.
    """
    members = list(members)
    if not members:
        raise ValueError("a group needs at least one member")
    if len(members) == 1:
        return members[0]
    if mode == ROUND_ROBIN:
        ids = [member.pk for member in members]
        return members[(ids.index(last_speaker_id) + 1) % len(members)] if last_speaker_id in ids else members[0]
    others = [member for member in members if member.pk != last_speaker_id]
    mentioned = sorted(((_first_mention(member.name, last_text), index, member) for index, member in enumerate(others)),
                       key=lambda item: (item[0], item[1]))
    if mentioned and mentioned[0][0] < len(last_text) + 1:
        return mentioned[0][2]
    weights = [max(0.0, float(getattr(member, "talkativeness", 0.5) or 0.0)) for member in others]
    if not any(weights):
        weights = [1.0] * len(others)
    return (rng or random.Random()).choices(others, weights=weights, k=1)[0]


def _first_mention(name: str, text: str) -> int:
    """Where the name (or its first word) first appears in the text as a whole word; past the end when absent."""
    positions = []
    for candidate in {name.strip(), name.strip().split(" ")[0]} - {""}:
        match = re.search(rf"(?<!\w){re.escape(candidate)}(?!\w)", text, re.IGNORECASE)
        if match:
            positions.append(match.start())
    return min(positions) if positions else len(text) + 1
