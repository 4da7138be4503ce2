"""Group conversations: who speaks next, and the history as each speaker reads it (docs/API.md, Groups)."""

from .history import GroupLine, group_turns_for
from .speakers import speaker_choose

__all__ = ["GroupLine", "group_turns_for", "speaker_choose"]
