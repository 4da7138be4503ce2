"""Group conversations: who speaks next, and the history as each speaker reads it (docs/API.md, Groups)."""

from .history import GroupLine, group_turns_for
from .humans import Human, human_labels
from .speakers import speaker_choose

__all__ = ["GroupLine", "Human", "group_turns_for", "human_labels", "speaker_choose"]
