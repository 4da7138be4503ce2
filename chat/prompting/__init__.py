"""Prompt composition: what the model reads for each reply (see docs/PROMPTS.md)."""

from .compose import ComposedPrompt, prompt_compose, prompt_greeting, system_prompt_default
from .placeholders import placeholders_replace
from .preview import PromptPreview, prompt_preview

__all__ = [
    "ComposedPrompt",
    "PromptPreview",
    "placeholders_replace",
    "prompt_compose",
    "prompt_greeting",
    "prompt_preview",
    "system_prompt_default",
]
