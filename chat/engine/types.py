"""Plain value types of the engine's public API."""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InvalidRequest

BACKENDS = ("llama_cpp", "ctransformers")
FINISH_REASONS = ("stop", "length", "cancelled")


@dataclass(frozen=True)
class ModelSpec:
    """How to load and serve one model."""

    name: str
    path: str
    backend: str = "llama_cpp"  # "llama_cpp" | "ctransformers"
    model_type: str = "llama"  # ctransformers' model_type
    gpu_layers: int = 0
    context_length: int = 2048  # max tokens of one sequence (prompt + reply)
    threads: int = 0  # 0 = os.cpu_count()
    parallel: int = 8  # max concurrently decoded sequences (llama_cpp)
    prefix_cache_mb: int = 256  # budget for saved prefixes
    chat_template: str | None = None  # overrides the GGUF's template when set

    def __post_init__(self):
        # Configuration mistakes fail when the registry is built, not on the first request.
        if self.backend not in BACKENDS:
            raise ValueError(f"model {self.name!r}: backend must be one of {BACKENDS}, not {self.backend!r}")
        if self.context_length < 2:
            raise ValueError(f"model {self.name!r}: context_length must be at least 2")
        if self.parallel < 1:
            raise ValueError(f"model {self.name!r}: parallel must be at least 1")
        if self.prefix_cache_mb < 0 or self.threads < 0:
            raise ValueError(f"model {self.name!r}: prefix_cache_mb and threads cannot be negative")


@dataclass(frozen=True)
class SamplingParams:
    """How to pick the next tokens. temperature <= 0 means greedy decoding."""

    max_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.95
    top_k: int = 40
    repetition_penalty: float = 1.1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    grammar: str | None = None  # GBNF text

    def __post_init__(self):
        if isinstance(self.stop, str):  # a lone string would otherwise become one stop per character
            object.__setattr__(self, "stop", (self.stop,))
        else:
            object.__setattr__(self, "stop", tuple(self.stop))
        if self.max_tokens < 1:
            raise InvalidRequest("max_tokens must be at least 1.")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest("top_p must be in (0, 1].")
        if self.top_k < 0:
            raise InvalidRequest("top_k cannot be negative (0 disables it).")
        if self.repetition_penalty <= 0:
            raise InvalidRequest("repetition_penalty must be positive (1.0 disables it).")
        if any(not stop for stop in self.stop):
            raise InvalidRequest("stop strings cannot be empty.")

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0


@dataclass(frozen=True)
class Completion:
    """The finished result of one generation."""

    text: str
    finish_reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int = 0  # how many prompt tokens came from the prefix cache
