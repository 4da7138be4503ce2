"""The interface every backend offers to the engine and its scheduler."""

from __future__ import annotations

from abc import ABC, abstractmethod

from ..sequence import Sequence
from ..types import SamplingParams

# Tokens looked at by the repetition/presence/frequency penalties (llama.cpp's and ctransformers' default).
PENALTY_LAST_N = 64


class Backend(ABC):
    """One loaded model.

    tokenize/detokenize/token_bytes/is_end_of_generation are safe from any thread; start, step,
    release and close are called only by the model's scheduler thread.
    """

    name: str  # "llama_cpp" | "ctransformers"
    context_length: int  # max tokens of one sequence
    max_sequences: int  # how many sequences step() decodes together
    add_bos: bool  # the model expects a BOS token at the start of a prompt
    bos_token_id: int | None
    bos_text: str
    eos_text: str
    chat_template_source: str | None  # tokenizer.chat_template of the file, if any
    control_tokens: dict[str, int]  # text -> id of the tokens only special-token parsing gives (template markup)
    faults = None  # test-only fault injection (chat/engine/faults.py), set by the engine
    # suspend() is implemented: the scheduler may take a decoding sequence's slot for another owner's request
    # (preemption, chat/engine/scheduler.py) and start() resumes it later. A backend without it is never preempted.
    can_suspend = False

    # -- any thread --------------------------------------------------------------------------

    @abstractmethod
    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """Tokens of `text`, no BOS added; `special` parses control-token texts such as "<|im_end|>"."""

    @abstractmethod
    def detokenize(self, tokens: list[int]) -> str: ...

    @abstractmethod
    def token_bytes(self, token: int) -> bytes:
        """The bytes a generated token adds to the reply (empty for control tokens)."""

    @abstractmethod
    def is_end_of_generation(self, token: int) -> bool: ...

    def saved_state_for(self, prompt_tokens: list[int], *, owner: str = "", shared: int = 0):
        """A saved state of a prefix of `prompt_tokens` read from storage (slow), for `start` to restore; called in
        the request's thread before the sequence is queued (`owner`, `shared`: the Sequence's). None: nothing to
        read."""
        return None

    def check_params(self, params: SamplingParams) -> None:
        """Raise UnsupportedFeature/InvalidRequest for parameters this backend cannot honour."""

    # -- scheduler thread only ---------------------------------------------------------------

    @abstractmethod
    def start(self, seq: Sequence) -> None:
        """Give `seq` a sequence slot (reusing a cached prefix where possible); sets seq.cached_prompt_tokens.
        A suspended sequence (see suspend) gets a slot again and goes on decoding where it stopped."""

    def suspendable(self, seq: Sequence) -> bool:
        """Whether `seq` may be suspended now (it decodes; it is not evaluating its prompt or waiting for a copy)."""
        return False

    def suspend(self, seq: Sequence) -> None:
        """Free `seq`'s slot but keep what it needs to go on (sampler, grammar, its evaluated state where memory
        allows) until start() resumes it or release() drops it. Only if can_suspend and suspendable(seq)."""
        raise NotImplementedError

    @abstractmethod
    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Advance every started sequence by one decode; return the tokens sampled in this step.

        A sequence still pre-filling its prompt may sample nothing in a step. When only some sequences
        fail, raise errors.SequencesFailed(failed, sampled) so that the others go on; any other
        exception fails every sequence of the step.
        """

    @abstractmethod
    def release(self, seq: Sequence) -> None:
        """`seq` is finished or cancelled (running or suspended): free its slot and what it holds."""

    def stats(self) -> dict:
        return {}

    @abstractmethod
    def close(self) -> None: ...
