"""What every engine offers the rest of the project, local (Engine) or remote (RemoteEngine); both subclass it."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Protocol, runtime_checkable

from .generation import Generation
from .types import Completion, ModelSpec, SamplingParams


@runtime_checkable
class EngineProtocol(Protocol):
    """One served model: tokens, its chat format, and generations. Implementations are thread-safe."""

    spec: ModelSpec
    context_length: int  # max tokens of one sequence (prompt + reply)

    @property
    def alive(self) -> bool:
        """False once the engine can no longer serve (the registry then replaces it)."""

    @property
    def template_supports_tools(self) -> bool:
        """Whether render_chat passes `tools` to the model's own template."""

    def tokenize(self, text: str, *, special: bool = True, exact: bool = False) -> list[int]:
        """`exact`: the ids themselves, never an estimate's placeholders (a remote model whose upstream does not
        answer raises ModelUnavailable)."""

    def count_tokens(self, text: str) -> int: ...

    def detokenize(self, tokens: list[int]) -> str: ...

    def render_chat(self, messages: list[dict], *, add_generation_prompt: bool = True,
                    tools: list[dict] | None = None, continue_final: bool = False,
                    shared_until: tuple[int, int] | None = None) -> str:
        """The prompt of `messages`; `continue_final`: the last (assistant) turn left open to be extended;
        `shared_until`: (message index, characters of its content) where the site's own content ends (reusable
        across tenants)."""

    def prompt_tokens(self, prompt: str) -> list[int]: ...

    def submit(self, prompt: str, params: SamplingParams, *, owner: str = "") -> Generation:
        """Queue a request and return at once; raises ContextOverflow, InvalidRequest, EngineOverloaded...
        `owner` is an opaque label of whose request it is (fair admission between owners)."""

    def admission_held(self):
        """A block whose submits the engine admits together (n choices of one prompt fork from the first)."""
        return nullcontext()

    def generate(self, prompt: str, params: SamplingParams, *, owner: str = "") -> Completion:
        """Blocking convenience: submit and wait for the whole completion (shared by the implementations)."""
        generation = self.submit(prompt, params, owner=owner)
        for _ in generation:
            pass
        return generation.result

    def stats(self) -> dict: ...

    def close(self) -> None: ...
