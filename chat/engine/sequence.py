"""The scheduler's record of one request while it waits and while it decodes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .generation import Generation
from .logprobs import LogprobTrack, TokenLogprob
from .text import TextAssembler
from .types import SamplingParams


@dataclass(eq=False)  # identity semantics: sequences are dict keys and list members
class Sequence:
    generation: Generation
    prompt_tokens: list[int]
    params: SamplingParams
    max_new_tokens: int  # params.max_tokens clipped to the room left in the context
    assembler: TextAssembler
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    backend_state: Any = field(default=None, repr=False)  # owned by the backend between start and release
    logprob_track: LogprobTrack | None = None  # set when the request asked for logprobs
    token_logprob: TokenLogprob | None = field(default=None, repr=False)  # the backend's record of its last sample
    owner: str = ""  # opaque label of whose request this is: admission is fair between owners
    # Leading prompt tokens that are the site's own content (Prompt.shared_pieces): the only part of this prompt
    # another owner's prompt may reuse, and the only part of another owner's it may reuse.
    shared_tokens: int = 0
    # A saved prompt state the backend read from disk in the request's thread (Backend.saved_state_for), so that
    # the scheduler thread never reads files; dropped once the sequence has started.
    saved_state: Any = field(default=None, repr=False)
