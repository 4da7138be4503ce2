"""Inference engine of llmsite: loads GGUF models and serves concurrent generations.

Pure Python and free of Django. Importing this package imports no inference library; a model's
backend library is imported when the model is first used (ModelRegistry.get).
"""

from .local import Engine
from .errors import (
    ContextOverflow,
    EngineClosed,
    EngineError,
    EngineOverloaded,
    GenerationFailed,
    InvalidRequest,
    ModelUnavailable,
    UnknownModel,
    UnsupportedFeature,
)
from .generation import Generation
from .protocol import EngineProtocol
from .registry import ModelRegistry
from .types import Completion, ModelSpec, SamplingParams

__all__ = [
    "Completion",
    "ContextOverflow",
    "Engine",
    "EngineClosed",
    "EngineError",
    "EngineOverloaded",
    "EngineProtocol",
    "Generation",
    "GenerationFailed",
    "InvalidRequest",
    "ModelRegistry",
    "ModelSpec",
    "ModelUnavailable",
    "SamplingParams",
    "UnknownModel",
    "UnsupportedFeature",
]
