"""The file a llama_cpp model loads: its own, or a copy with its weights re-quantized (`weights` in config.yaml).

llama.cpp's CPU kernels batch some weight types and not others: Q4_1 (the shipped SmolLM2 file) is multiplied
one row at a time, so eight sequences or a 64-token prompt chunk cost nearly eight or sixty-four times one row;
Q8_0 goes through blocked matrix kernels. A Q4_1 file re-quantized to Q8_0 keeps its numbers to within rounding
(8-bit steps are a few percent of a 4-bit step) and evaluates prompts about twice as fast, at the price of a
larger file that one sequence alone decodes more slowly (docs/BENCHMARKS.md, "Weights re-laid as Q8_0").

The copy is made once, on first load, and kept beside the file (in `.weights/`), or in the user's cache folder
where the model's folder is read-only; it is named after the source's size and modification time, so a replaced
file gets a new copy. Where no copy can be made, the file loads as it is (logged): a speed setting never stops
a model from serving. Not with layers on a GPU: its kernels batch every type.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import EngineError
from ..gguf_metadata import NotGGUF, read_gguf_metadata
from ..types import ModelSpec

logger = logging.getLogger(__name__)

COPY_FOLDER = ".weights"
FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def weights_path(llama, spec: ModelSpec) -> str:
    """The GGUF file to load for `spec` (a llama_cpp model whose file exists); `llama` is the llama_cpp module."""
    if not spec.weights or spec.gpu_layers:
        return spec.path
    source = Path(spec.path)
    code = getattr(llama, FTYPE_PREFIX + spec.weights.upper(), None)
    if code is None:  # a type this llama.cpp build does not know
        logger.warning("model %r: loading %s as it is (this llama.cpp has no weight type %s)", spec.name,
                       source.name, spec.weights)
        return spec.path
    if _file_type(llama, source) == spec.weights:
        return spec.path
    stat = source.stat()
    name = f"{source.stem}.{spec.weights}.{stat.st_size:x}-{stat.st_mtime_ns:x}.gguf"
    folders = [source.parent / COPY_FOLDER, _user_cache() / "weights"]
    for folder in folders:
        if (folder / name).is_file():
            return str(folder / name)
    for folder in folders:
        try:
            logger.info("model %r: writing its weights as %s to %s (once)", spec.name, spec.weights, folder / name)
            copy = quantize_file(llama, source, folder / name, code, spec.weights)
        except (OSError, EngineError) as error:
            logger.warning("model %r: no %s copy in %s (%s)", spec.name, spec.weights, folder, error)
            continue
        _remove_older_copies(copy, source.stem, spec.weights)
        return str(copy)
    logger.warning("model %r: loading %s as it is (weights %s: no copy could be written)", spec.name, source.name,
                   spec.weights)
    return spec.path


def quantize_file(llama, src: Path, dst: Path, code: int, ftype: str, *, threads: int = 0) -> Path:
    """Write `src` quantized to llama.cpp's file type `code` (named `ftype`) as `dst`, through a temporary file
    (a failed run never leaves a half-written `dst`; two processes may write the same copy at once)."""
    params = llama.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    partial = dst.with_name(f"{dst.name}.{os.getpid()}.partial")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if llama.llama_model_quantize(os.fsencode(src), os.fsencode(partial), params):
            raise EngineError(f"llama.cpp could not quantize {src.name} to {ftype}; see the server log.")
        partial.replace(dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


def _file_type(llama, path: Path) -> str | None:
    """The file's weight type as `weights` names it ("q4_1"), from its header; None when unknown."""
    try:
        code = read_gguf_metadata(path).get("general.file_type")
    except (OSError, NotGGUF):
        return None
    names = [name for name in dir(llama) if name.startswith(FTYPE_PREFIX) and getattr(llama, name) == code]
    return names[0][len(FTYPE_PREFIX):].lower() if names else None


def _remove_older_copies(copy: Path, stem: str, weights: str) -> None:
    """Copies of an earlier version of the same file (another size or time) are never loaded again."""
    earlier = re.compile(rf"{re.escape(stem)}\.{weights}\.[0-9a-f]+-[0-9a-f]+\.gguf")
    for other in copy.parent.iterdir():
        if other != copy and earlier.fullmatch(other.name):
            other.unlink(missing_ok=True)


def _user_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmsite"
