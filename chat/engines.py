"""The Django adapter to the engine: the process's model registry, built from config.yaml on first use, and
whether the process still admits new generations (the drain after SIGTERM, `manage.py serve`).

Django code gets engines through `get_engine(name)`; chat/engine itself knows nothing of Django. The drain flag
is set by the launcher (chat/ops/drain.py) and read by every surface that admits work (HTTP middleware,
WebSocket consumer).
"""

from __future__ import annotations

import logging
import os
import threading
import time

from django.conf import settings
from django.core.signals import setting_changed
from django.dispatch import receiver

from .engine import ModelRegistry

logger = logging.getLogger("llmsite.models")
_registry = None
_registry_lock = threading.Lock()

DRAIN_RETRY_AFTER_SECONDS = 5  # a client retrying after this reaches another instance through the balancer
_drain_lock = threading.Lock()
_draining_since: float | None = None


def drain_begin() -> None:
    global _draining_since
    with _drain_lock:
        if _draining_since is None:
            _draining_since = time.monotonic()


def drain_reset() -> None:
    """Admit again (tests)."""
    global _draining_since
    with _drain_lock:
        _draining_since = None


def is_draining() -> bool:
    return _draining_since is not None


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
