"""ModelRegistry: configured models by name, each loaded on first use, once per process."""

from __future__ import annotations

import logging
import threading
import time
from typing import Iterable

from .engine import Engine
from .errors import EngineError, ModelUnavailable, UnknownModel
from .types import ModelSpec

logger = logging.getLogger(__name__)


class ModelRegistry:
    """Models are loaded lazily (never at import or construction) under a per-model lock."""

    def __init__(self, specs: Iterable[ModelSpec], default: str | None = None):
        self._specs: dict[str, ModelSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"model {spec.name!r} is configured twice")
            self._specs[spec.name] = spec
        if not self._specs:
            raise ValueError("at least one model must be configured")
        if default is not None and default not in self._specs:
            raise ValueError(f"default model {default!r} is not configured")
        self.default_name: str = default or next(iter(self._specs))
        self._engines: dict[str, Engine] = {}
        self._lock = threading.Lock()  # guards the dicts; held only briefly
        self._load_locks = {name: threading.Lock() for name in self._specs}  # one load at a time per model

    def names(self) -> list[str]:
        return list(self._specs)

    def spec(self, name: str | None = None) -> ModelSpec:
        name = self.default_name if name is None else name
        try:
            return self._specs[name]
        except KeyError:
            raise UnknownModel(name, self.names()) from None

    def get(self, name: str | None = None) -> Engine:
        """The loaded engine of `name` (default model if None), loading it on first use."""
        spec = self.spec(name)
        engine = self._engines.get(spec.name)
        if engine is not None:
            return engine
        with self._load_locks[spec.name]:
            engine = self._engines.get(spec.name)  # another thread may have loaded it meanwhile
            if engine is None:
                engine = self._load(spec)
                with self._lock:
                    self._engines[spec.name] = engine
        return engine

    def is_loaded(self, name: str | None = None) -> bool:
        return self.spec(name).name in self._engines

    def close(self) -> None:
        """Stop every scheduler and free every model; a later get() loads again."""
        with self._lock:
            engines, self._engines = list(self._engines.values()), {}
        for engine in engines:
            engine.close()

    @staticmethod
    def _load(spec: ModelSpec) -> Engine:
        # Imported here so that importing the engine package never imports an inference library.
        from .backends import load_backend

        started = time.perf_counter()
        backend = load_backend(spec)  # raises ModelUnavailable
        try:
            engine = Engine(spec, backend)
        except BaseException as error:
            backend.close()
            if isinstance(error, EngineError):
                raise
            logger.exception("model %r: engine setup failed", spec.name)
            raise ModelUnavailable(spec.name, spec.path, "the engine could not be set up; see the server log.") from None
        logger.info("model %r loaded with %s in %.2f s", spec.name, spec.backend, time.perf_counter() - started)
        return engine
