"""How many prompt tokens one decode step may carry while streams decode, from a target step time and measured speeds.

A step that carries a long prompt chunk makes every running stream wait for its next token
(a 512-token chunk takes seconds on a small CPU). The budget keeps such steps near a target
time: it learns what a decode-only step costs and what one prompt token adds, both as moving
averages of the steps actually run, and allows as many prompt tokens as fit in the rest.
"""

from __future__ import annotations

SMOOTHING = 0.2  # weight of the newest step in the moving averages
MIN_SAMPLE_TOKENS = 16  # steps with fewer prompt tokens say little about the prefill speed
# A prompt token costs at least this: a step faster than the average decode-only step (timing noise) must not
# teach the budget that prompt tokens are free (a zero average divided by: every running sequence failed).
MIN_TOKEN_SECONDS = 1e-6


def _average(previous: float | None, value: float) -> float:
    return value if previous is None else (1 - SMOOTHING) * previous + SMOOTHING * value


class PrefillBudget:
    """Prompt tokens allowed next to decoding sequences; all the room there is when nothing decodes."""

    def __init__(self, target_seconds: float, batch_tokens: int):
        self.target_seconds = target_seconds  # 0 or less: no limit
        self.batch_tokens = batch_tokens
        self.decode_step_seconds: float | None = None  # a step without prompt tokens
        self.prompt_token_seconds: float | None = None  # what one prompt token adds to a step

    def prompt_tokens(self, decoding: int) -> int:
        """Prompt tokens the next step may carry beside `decoding` one-token sequences."""
        room = max(self.batch_tokens - decoding, 0)
        if decoding == 0 or self.target_seconds <= 0:
            return room
        if self.prompt_token_seconds is None:
            return 0  # unknown speed: the caller's per-prompt minimum applies until one step is measured
        spare = self.target_seconds - (self.decode_step_seconds or 0.0)
        return max(0, min(room, int(spare / self.prompt_token_seconds)))

    def observe(self, seconds: float, decoding: int, prompt_tokens: int) -> None:
        """Learn from one step that took `seconds` with `decoding` one-token sequences and `prompt_tokens`."""
        if prompt_tokens == 0:
            if decoding:
                self.decode_step_seconds = _average(self.decode_step_seconds, seconds)
            return
        if prompt_tokens < MIN_SAMPLE_TOKENS:
            return
        decode_part = (self.decode_step_seconds or 0.0) if decoding else 0.0
        per_token = max(seconds - decode_part, 0.0) / prompt_tokens
        per_token = max(per_token, MIN_TOKEN_SECONDS)
        self.prompt_token_seconds = _average(self.prompt_token_seconds, per_token)
