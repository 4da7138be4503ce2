"""The composed prompt for a sample message, as the character admin page shows it to editors."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from django.conf import settings

from chat.engine import ContextOverflow, EngineError
from chat.engine.prompt import Piece, Prompt
from chat.engines import get_engine

from .compose import ComposedPrompt, prompt_compose, prompt_greeting, world_info_inputs

logger = logging.getLogger(__name__)


@dataclass
class PromptPreview:
    user_message: str
    composed: ComposedPrompt | None = None
    model_name: str = ""
    error: str = ""  # why there is no composed prompt (model not loadable, context overflow)
    blocks: list[tuple[str, str, int]] = field(default_factory=list)  # (role, opening words, tokens) per message
    parts: list[tuple[str, str, int]] = field(default_factory=list)  # (what, opening words, tokens) per part
    scenario_tokens: dict[int, int] = field(default_factory=dict)  # scenario id -> tokens of its text

    @property
    def explained_matches(self) -> list[tuple[object, str, int]]:
        """(scenario, why it fired, its tokens) for each inserted scenario, in rank order."""
        if self.composed is None:
            return []
        return [(scenario, reason, self.scenario_tokens.get(scenario.pk, 0))
                for scenario, reason in self.composed.explained_scenarios]

    @property
    def pieces(self) -> list[Piece]:
        """The rendered prompt as the model reads it: the template's control tokens (`control`) and text.

        Control-token texts inside content (a card's, a client's) are text pieces: the page shows them
        as plain text. A remote model's prompt has no known markup: all of it is one text piece."""
        if self.composed is None:
            return []
        text = self.composed.text
        return list(text.pieces) if isinstance(text, Prompt) else [Piece(str(text))]


def prompt_preview(*, character, user_message: str, user_name: str = "User", conversation=None,
                   path=()) -> PromptPreview:
    """Compose the prompt the default model would get for `user_message` in a new chat with `character`, or,
    given a stored `conversation` and its `path` (the messages to its active leaf), as the next message of that
    conversation: its history and its branch's World Info timed effects (sticky entries and their reasons).

    A new chat opens with the character's greeting, as a new conversation does. Never raises for an
    unusable model: the preview's `error` says what is wrong instead.
    """
    preview = PromptPreview(user_message=user_message)
    try:
        engine = get_engine()
    except (EngineError, ValueError, ImportError, OSError) as exc:
        logger.warning("prompt preview: the model cannot be loaded: %s", exc)
        preview.error = f"The model cannot be loaded, so there is no preview: {exc}"
        return preview
    preview.model_name = engine.spec.name
    turns = [{"role": "user", "content": user_message}]
    world_info = {}
    if conversation is not None:
        user_name = conversation.user_name
        turns[:0] = [{"role": m.role, "content": m.content} for m in path if m.role in ("user", "assistant")]
        world_info = world_info_inputs(conversation.pk, path=path, message_count=len(turns))
    else:
        greeting = prompt_greeting(character=character, user_name=user_name)
        if greeting.strip():
            turns.insert(0, {"role": "assistant", "content": greeting})
    max_tokens = character.max_tokens or settings.LLMSITE.sampling["max_tokens"]
    try:
        preview.composed = prompt_compose(engine=engine, character=character, turns=turns, user_name=user_name,
                                          max_tokens=int(max_tokens), **world_info)
    except ContextOverflow as exc:
        preview.error = str(exc)
        return preview
    preview.blocks = prompt_block_costs(engine=engine, messages=preview.composed.messages)
    preview.parts = prompt_part_costs(engine=engine, composed=preview.composed)
    preview.scenario_tokens = {scenario.pk: engine.count_tokens(scenario.content)
                               for scenario in preview.composed.scenarios}
    return preview


def prompt_part_costs(*, engine, composed: ComposedPrompt) -> list[tuple[str, str, int]]:
    """The token cost of every part of a composed prompt (system prompt, persona, each World Info entry, the
    example dialogue, ...), with its first words; a last row for what the chat template and the joins add."""
    rows = [(what, _opening(text), engine.count_tokens(text)) for what, text in composed.parts]
    rows.append(("Chat template and separators", "", composed.prompt_tokens - sum(row[2] for row in rows)))
    return rows


def _opening(text: str) -> str:
    return text if len(text) <= 70 else text[:67] + "..."


def prompt_block_costs(*, engine, messages: list[dict]) -> list[tuple[str, str, int]]:
    """The token cost of every message of a composed prompt, with its role and first words (the blocks the
    preview lists; the chat template's own tokens come on top)."""
    blocks = []
    for message in messages:
        text = message["content"]
        blocks.append((message["role"], _opening(text), engine.count_tokens(text)))
    return blocks
