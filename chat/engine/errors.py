"""Engine error types; every message is safe to show a client (no paths beyond the model file, no tracebacks)."""

from __future__ import annotations


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class UnknownModel(EngineError):
    """No model of that name is configured."""

    def __init__(self, name: str, known: list[str] | None = None):
        self.name = name
        self.known = list(known or [])
        message = f"Unknown model {name!r}."
        if self.known:
            message += f" Configured models: {', '.join(sorted(self.known))}."
        super().__init__(message)


class ModelUnavailable(EngineError):
    """The model is configured but cannot be used (missing file, failed load, unreadable by the backend)."""

    def __init__(self, model: str, path: str, reason: str):
        self.model = model
        self.path = path
        self.reason = reason
        super().__init__(f"Model {model!r} ({path}) is unavailable: {reason}")


class ContextOverflow(EngineError):
    """The prompt leaves no room for even one new token in the model's context."""

    def __init__(self, prompt_tokens: int, context_length: int):
        self.prompt_tokens = prompt_tokens
        self.context_length = context_length
        super().__init__(
            f"The prompt is {prompt_tokens} tokens long; the model's context holds {context_length} "
            "tokens including the reply. Shorten the conversation."
        )


class UnsupportedFeature(EngineError):
    """The backend of this model cannot do what was asked (e.g. grammars under ctransformers)."""


class InvalidRequest(EngineError, ValueError):
    """The sampling parameters are invalid (e.g. a GBNF grammar that does not parse); `param` names the
    request field at fault where the engine knows it."""

    param: str | None = None

    def __init__(self, message: str, *, param: str | None = None):
        super().__init__(message)
        if param is not None:
            self.param = param


class GenerationFailed(EngineError):
    """The backend failed while generating; details are logged, not shown."""

    def __init__(self, model: str):
        self.model = model
        super().__init__(f"Generation with model {model!r} failed; see the server log.")


class EngineClosed(EngineError):
    """The engine was closed (shutdown) before the request finished."""


class EngineOverloaded(EngineError):
    """The queue in front of the scheduler is full, or the request waited in it too long: retry later."""

    def __init__(self, model: str, retry_after: int, *, waited: bool = False):
        self.model = model
        self.retry_after = retry_after
        why = "waited too long for a free sequence slot" if waited else "found the request queue full"
        super().__init__(f"Model {model!r} is overloaded: the request {why}. Retry in {retry_after} s.")


class SequencesFailed(Exception):
    """Raised by Backend.step when some sequences failed and the others went on (internal to the engine)."""

    def __init__(self, failed: list, sampled: list, errors: dict | None = None):
        super().__init__(f"{len(failed)} sequence(s) failed in a decode step")
        self.failed = failed  # Sequence objects that failed (their slot may be lost)
        self.sampled = sampled  # (Sequence, token) of the step's other sequences
        self.errors = errors or {}  # Sequence -> EngineError to report (GenerationFailed when absent)
