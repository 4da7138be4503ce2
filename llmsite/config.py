"""Reads config.yaml: which GGUF model(s) (or remote servers) to serve, the fallback system prompt, default sampling.

Kept free of Django so settings can call it before Django is configured; a model's entry becomes
the engine's own `ModelSpec`. Every problem is a
`ConfigError` whose message is one line naming the file and what is wrong.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

import yaml

# The engine's own types: the config describes what the engine loads (chat/engine has no Django).
from chat.engine.types import BACKENDS, REMOTE_BACKEND, ROUTINGS, ModelSpec, SamplingParams

REMOTE = REMOTE_BACKEND  # an OpenAI-compatible server pool generates (vLLM, llama-server)
REMOTE_OPTIONS = ("base_url", "remote_model", "api_key_env", "remote_api", "timeout", "connect_timeout",
                  "reply_timeout", "max_connections", "routing", "upstream_slots")
# The local scheduler's latency budget and back-pressure (see chat/engine/scheduler.py, docs/ARCHITECTURE.md).
ENGINE_OPTIONS = ("prefill_step_ms", "prefill_min_tokens", "max_queue", "queue_timeout")
MODEL_OPTIONS = ("backend", "model_type", "gpu_layers", "context_length", "threads", "parallel",
                 "prefix_cache_mb", "chat_template", "flash_attention", "side_prefill", "weights", "state_dir",
                 "state_cache_mb", *REMOTE_OPTIONS, *ENGINE_OPTIONS)
INTEGER_OPTIONS = ("gpu_layers", "context_length", "threads", "parallel", "prefix_cache_mb", "state_cache_mb",
                   "max_connections", "upstream_slots",
                   *ENGINE_OPTIONS)
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# The sampling config.yaml may set; their defaults are the engine's own (one place: SamplingParams).
SAMPLING_OPTIONS = ("temperature", "top_p", "repetition_penalty", "max_tokens")
DEFAULT_SAMPLING = {f.name: f.default for f in fields(SamplingParams) if f.name in SAMPLING_OPTIONS}


class ConfigError(Exception):
    """config.yaml is missing or malformed; the message is one line for the operator."""


@dataclass(frozen=True)
class SiteConfig:
    path: Path
    system_prompt: str
    models: tuple[ModelSpec, ...]
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

    models: list[ModelSpec] = []
    if raw.get("backend") == REMOTE:
        if not (raw.get("model_name") or raw.get("remote_model")):
            fail(f"'model_name' is required with backend {REMOTE}")
        top_options = {key: raw[key] for key in MODEL_OPTIONS if key in raw}
        models.append(_model(raw.get("model_name") or raw["remote_model"], None, top_options, base_dir, fail))
    elif "model_path" in raw:
        top_options = {key: raw[key] for key in MODEL_OPTIONS if key in raw}
        models.append(_model(raw.get("model_name") or _name_from_path(raw["model_path"]),
                             raw["model_path"], top_options, base_dir, fail))
    for index, entry in enumerate(raw.get("models") or []):
        remote = isinstance(entry, dict) and entry.get("backend") == REMOTE
        if not isinstance(entry, dict) or "name" not in entry or ("model_path" not in entry and not remote):
            fail(f"models[{index}] needs 'name' and 'model_path' (or backend {REMOTE} and 'base_url')")
        options = {key: entry[key] for key in MODEL_OPTIONS if key in entry}
        models.append(_model(entry["name"], None if remote else entry["model_path"], options, base_dir, fail))
    if not models:
        fail(f"'model_path' is required (the GGUF file to serve), or backend {REMOTE} with 'base_url'")
    names = [model.name for model in models]
    if len(set(names)) != len(names):
        fail(f"model names must be unique, got {names}")
    state_dirs = [model.state_dir for model in models if model.state_dir]
    # Each model's store removes files of another model as foreign: the same folder spelt twice is one folder.
    if len({os.path.realpath(folder) for folder in state_dirs}) != len(state_dirs):
        fail(f"each model needs a state_dir of its own, got {state_dirs}")

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


def _model(name, model_path, options: dict, base_dir: Path, fail) -> ModelSpec:
    if not isinstance(name, str) or not name.strip():
        fail("a model name must be a non-empty string")
    backend = options.get("backend", "llama_cpp")
    if backend not in BACKENDS:
        fail(f"model {name!r}: backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend != REMOTE and (not isinstance(model_path, str) or not model_path.strip()):
        fail(f"model {name!r}: 'model_path' must be a non-empty string")
    for key in INTEGER_OPTIONS:
        value = options.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            fail(f"model {name!r}: {key} must be a non-negative integer")
    if "flash_attention" in options and not isinstance(options["flash_attention"], bool):
        fail(f"model {name!r}: flash_attention must be true or false")
    if options.get("flash_attention") and backend != "llama_cpp":
        fail(f"model {name!r}: flash_attention is a llama_cpp option")
    if "side_prefill" in options and not isinstance(options["side_prefill"], bool):
        fail(f"model {name!r}: side_prefill must be true or false")
    if "weights" in options:
        if options["weights"] is None:
            options = {**options, "weights": ""}
        elif not isinstance(options["weights"], str):
            fail(f"model {name!r}: weights must be a weight type such as q8_0, or empty")
        else:
            options = {**options, "weights": options["weights"].strip().lower()}
    if options.get("context_length") is not None and options["context_length"] < 16:
        fail(f"model {name!r}: context_length must be at least 16")
    if backend == REMOTE:
        return _spec(fail, name=name.strip(), path="", **_remote_options(name, options, fail))
    given = [key for key in REMOTE_OPTIONS if key in options]
    if given:
        fail(f"model {name!r}: {given[0]} is only used with backend {REMOTE}")
    resolved = Path(model_path)
    if not resolved.is_absolute():
        resolved = base_dir / resolved
    if "state_dir" in options:  # saved states on disk (chat/engine/state_store.py); relative to this folder
        if not isinstance(options["state_dir"], str):
            fail(f"model {name!r}: state_dir must be a folder path")
        if options["state_dir"].strip():
            options = {**options, "state_dir": str(base_dir / Path(options["state_dir"].strip()))}
    return _spec(fail, name=name.strip(), path=str(resolved), **options)


def _spec(fail, **values) -> ModelSpec:
    try:
        return ModelSpec(**values)
    except ValueError as exc:  # what the engine itself refuses (e.g. parallel: 0), still one line naming the file
        fail(str(exc))


def _remote_options(name, options: dict, fail) -> dict:
    """Validated options of an openai_compatible model; `base_url` (one URL or a list) becomes `base_urls`."""
    options = dict(options)
    urls = options.pop("base_url", None)
    if isinstance(urls, str):
        urls = [urls]
    if not isinstance(urls, list) or not urls:
        fail(f"model {name!r}: backend {REMOTE} needs 'base_url' (one URL or a list of URLs)")
    for url in urls:
        parts = urlsplit(url) if isinstance(url, str) else None
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            fail(f"model {name!r}: base_url {url!r} must be an http:// or https:// URL")
        if parts.username or parts.password:
            fail(f"model {name!r}: base_url must not hold credentials; name an environment variable in api_key_env")
    options["base_urls"] = tuple(url.strip() for url in urls)
    env_name = options.get("api_key_env")
    if env_name is not None and (not isinstance(env_name, str) or not ENV_NAME.fullmatch(env_name)):
        fail(f"model {name!r}: api_key_env must be the name of an environment variable (letters, digits, _), "
             "never the key itself")
    remote_model = options.get("remote_model")
    if remote_model is not None and (not isinstance(remote_model, str) or not remote_model.strip()):
        fail(f"model {name!r}: remote_model must be a non-empty string")
    if options.get("remote_api", "chat") not in ("chat", "completions"):
        fail(f"model {name!r}: remote_api must be chat or completions, got {options['remote_api']!r}")
    if options.get("routing", "affinity") not in ROUTINGS:
        fail(f"model {name!r}: routing must be affinity or round_robin, got {options['routing']!r}")
    for key in ("timeout", "connect_timeout", "reply_timeout"):
        value = options.get(key)
        if value is not None and (not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0):
            fail(f"model {name!r}: {key} must be a positive number of seconds")
    if options.get("max_connections") == 0:
        fail(f"model {name!r}: max_connections must be at least 1")
    # Options of the local backends (threads, gpu_layers...) mean nothing to a remote server.
    return {key: options[key] for key in ("base_urls", "remote_model", "api_key_env", "remote_api", "timeout",
                                          "connect_timeout", "reply_timeout", "max_connections", "backend",
                                          "context_length", "chat_template", "routing", "upstream_slots")
            if key in options}


def _name_from_path(model_path) -> str:
    stem = Path(str(model_path)).name
    for suffix in (".gguf", ".bin"):
        stem = stem.removesuffix(suffix)
    return stem
