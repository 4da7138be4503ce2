"""The Django adapter to the engine: the process's model registry, built from config.yaml on first use.

Django code gets engines through `get_engine(name)`; chat/engine itself knows nothing of Django.
"""

from __future__ import annotations

import logging
import os
import threading

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .engine import ModelRegistry

logger = logging.getLogger("llmsite.models")
_registry = None
_registry_lock = threading.Lock()


def get_registry():
    global _registry
    if _registry is None:
        with _registry_lock:
            if _registry is None:
                config = settings.LLMSITE
                _registry = ModelRegistry(list(config.models), default=config.default_model)
    return _registry


def get_engine(name: str | None = None):
    """The loaded engine for a model name (the default when None); raises UnknownModel / ModelUnavailable."""
    registry = get_registry()
    if not registry.is_loaded(name):
        spec = registry.spec(name)
        if spec.base_urls:
            logger.info("connecting model %r to %s (backend %s)...", spec.name, ", ".join(spec.base_urls), spec.backend)
        else:
            size = os.path.getsize(spec.path) / 1e6 if os.path.exists(spec.path) else 0
            logger.info("loading model %r from %s (%.0f MB, backend %s)...", spec.name, os.path.basename(spec.path),
                        size, spec.backend)
    return registry.get(name)


def loaded_engines() -> list[tuple[str, object]]:
    """(name, engine) of the models this process has loaded; loads nothing."""
    if _registry is None:
        return []
    # loaded(), not get(): a scrape must not replace a dead engine (that is the next request's job).
    engines = [(name, _registry.loaded(name)) for name in _registry.names()]
    return [(name, engine) for name, engine in engines if engine is not None]


def reset_registry() -> None:
    """Close every loaded model; the next get_engine() reads the settings again (tests, reconfiguration)."""
    global _registry
    with _registry_lock:
        if _registry is not None:
            _registry.close()
        _registry = None


@receiver(setting_changed)
def _reset_on_config_change(*, setting, **kwargs):
    if setting == "LLMSITE":
        reset_registry()
