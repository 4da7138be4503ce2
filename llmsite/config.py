"""Reads config.yaml: which GGUF model(s) to serve, the fallback system prompt, default sampling.

Kept free of Django so settings can call it before Django is configured. Every problem is a
`ConfigError` whose message is one line naming the file and what is wrong.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import yaml

BACKENDS = ("llama_cpp", "ctransformers")
MODEL_OPTIONS = ("backend", "model_type", "gpu_layers", "context_length", "threads", "parallel",
                 "prefix_cache_mb", "chat_template")
INTEGER_OPTIONS = ("gpu_layers", "context_length", "threads", "parallel", "prefix_cache_mb")
DEFAULT_SAMPLING = {"temperature": 0.7, "top_p": 0.95, "repetition_penalty": 1.1, "max_tokens": 256}


class ConfigError(Exception):
    """config.yaml is missing or malformed; the message is one line for the operator."""


@dataclass(frozen=True)
class ModelConfig:
    name: str
    path: str
    backend: str = "llama_cpp"
    model_type: str = "llama"
    gpu_layers: int = 0
    context_length: int = 2048
    threads: int = 0
    parallel: int = 8
    prefix_cache_mb: int = 256
    chat_template: str | None = None


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    system_prompt: str
    models: tuple[ModelConfig, ...]
    default_model: str
    sampling: dict = field(default_factory=lambda: dict(DEFAULT_SAMPLING))


def load_config(path: str | os.PathLike, *, base_dir: Path, overrides: dict | None = None) -> SiteConfig:
    """Read and validate the file; `overrides` (from environment variables) replace top-level values."""
    path = Path(path)
    if not path.is_absolute():
        path = base_dir / path
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (set LLMSITE_CONFIG to another path)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}: malformed YAML{where}: {problem}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of settings at the top level")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in INTEGER_OPTIONS:
            try:
                value = int(value)
            except ValueError:
                raise ConfigError(f"{path}: override for {key} must be an integer, got {value!r}") from None
        raw[key] = value
    return _parse(raw, path, base_dir)


def _parse(raw: dict, path: Path, base_dir: Path) -> SiteConfig:
    def fail(message: str):
        raise ConfigError(f"{path}: {message}")

    system_prompt = raw.get("system_prompt")
    if not isinstance(system_prompt, str) or not system_prompt.strip():
        fail("'system_prompt' is required and must be a non-empty string")

    models: list[ModelConfig] = []
    if "model_path" in raw:
        top_options = {key: raw[key] for key in MODEL_OPTIONS if key in raw}
        models.append(_model(raw.get("model_name") or _name_from_path(raw["model_path"]),
                             raw["model_path"], top_options, base_dir, fail))
    for index, entry in enumerate(raw.get("models") or []):
        if not isinstance(entry, dict) or "name" not in entry or "model_path" not in entry:
            fail(f"models[{index}] needs 'name' and 'model_path'")
        options = {key: entry[key] for key in MODEL_OPTIONS if key in entry}
        models.append(_model(entry["name"], entry["model_path"], options, base_dir, fail))
    if not models:
        fail("'model_path' is required (the GGUF file to serve)")
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        fail(f"model names must be unique, got {names}")

    default_model = raw.get("default_model", names[0])
    if default_model not in names:
        fail(f"'default_model' {default_model!r} is not one of the configured models {names}")

    sampling = dict(DEFAULT_SAMPLING)
    given = raw.get("sampling") or {}
    if not isinstance(given, dict):
        fail("'sampling' must be a mapping")
    for key, value in given.items():
        if key not in DEFAULT_SAMPLING:
            fail(f"unknown sampling option {key!r} (known: {', '.join(DEFAULT_SAMPLING)})")
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            fail(f"sampling.{key} must be a number")
        sampling[key] = value
    return SiteConfig(path=path, system_prompt=system_prompt.strip(), models=tuple(models),
                      default_model=default_model, sampling=sampling)


def _model(name, model_path, options: dict, base_dir: Path, fail) -> ModelConfig:
    if not isinstance(name, str) or not name.strip():
        fail("a model name must be a non-empty string")
    if not isinstance(model_path, str) or not model_path.strip():
        fail(f"model {name!r}: 'model_path' must be a non-empty string")
    backend = options.get("backend", "llama_cpp")
    if backend not in BACKENDS:
        fail(f"model {name!r}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    for key in INTEGER_OPTIONS:
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            fail(f"model {name!r}: {key} must be a non-negative integer")
    if options.get("context_length") is not None and options["context_length"] < 16:
        fail(f"model {name!r}: context_length must be at least 16")
    resolved = Path(model_path)
    if not resolved.is_absolute():
        resolved = base_dir / resolved
    return ModelConfig(name=name.strip(), path=str(resolved), **options)


def _name_from_path(model_path) -> str:
    stem = Path(str(model_path)).name
    for suffix in (".gguf", ".bin"):
        stem = stem.removesuffix(suffix)
    return stem
