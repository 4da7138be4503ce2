"""Inference backends. Each module imports its library only when a model is loaded."""

from __future__ import annotations

from ..types import ModelSpec
from .base import Backend


def load_backend(spec: ModelSpec) -> Backend:
    """Load the model of `spec` with its backend; raises ModelUnavailable."""
    if spec.backend == "llama_cpp":
        from .llama_cpp import LlamaCppBackend

        return LlamaCppBackend.load(spec)
    if spec.backend == "ctransformers":
        from .ctransformers import CTransformersBackend

        return CTransformersBackend.load(spec)
    raise ValueError(f"unknown backend {spec.backend!r}")  # ModelSpec already rejects these


__all__ = ["Backend", "load_backend"]
