"""Prompt composition: what the model reads for each reply (see docs/PROMPTS.md)."""

from .compose import (
    ComposedPrompt,
    prompt_compose,
    prompt_greeting,
    prompt_greetings,
    system_prompt_default,
    system_prompt_of,
    world_info_inputs,
)
from .placeholders import placeholders_replace
from .preview import PromptPreview, prompt_preview

__all__ = [
    "ComposedPrompt",
    "PromptPreview",
    "placeholders_replace",
    "prompt_compose",
    "prompt_greeting",
    "prompt_greetings",
    "prompt_preview",
    "system_prompt_default",
    "system_prompt_of",
    "world_info_inputs",
]
