"""The file a llama_cpp model loads: its own, or a copy with its weights re-quantized (`weights` in config.yaml).

llama.cpp's CPU kernels batch some weight types and not others: Q4_1 (the shipped SmolLM2 file) is multiplied
one row at a time, so eight sequences or a 64-token prompt chunk cost nearly eight or sixty-four times one row;
Q8_0 goes through blocked matrix kernels. A Q4_1 file re-quantized to Q8_0 keeps its numbers to within a few
percent of a 4-bit step and evaluates prompts about twice as fast, at the price of a larger file that one
sequence alone decodes more slowly (docs/BENCHMARKS.md, "Weights"). Where the weights are repacked for AMX
(amx.py), its kernels batch the file's own type and the file loads as it is.

The copy is made once, on first load, and kept beside the file (in `.weights/`), or in the user's cache folder
where the model's folder is not writable. Its name carries a hash of the source's path, size and modification
time, so a replaced file gets a new copy and two files of the same name never share one. One process writes it
while the others wait (a lock file); a folder without room for it is skipped. Where no copy can be made, or a
copy does not load, the file loads as it is (logged): a speed setting never stops a model from serving. Not
with layers on a GPU: its kernels batch every type.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import re
import shutil
import time
from pathlib import Path

from ..errors import EngineError
from ..gguf_metadata import NotGGUF, read_gguf_metadata
from ..types import ModelSpec

logger = logging.getLogger(__name__)

COPY_FOLDER = ".weights"
FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"
# Types whose tensors llama.cpp's AMX backend repacks and multiplies in blocks (ggml-cpu/amx/common.h,
# qtype_has_amx_kernels), as llama.cpp names file types.
AMX_FILE_TYPES = frozenset({"q4_0", "q4_1", "q8_0", "q4_k_s", "q4_k_m", "q5_k_s", "q5_k_m", "q6_k", "iq4_xs"})
ROOM_FACTOR = 2.5  # free space a copy needs, in sizes of its source (Q4 -> Q8_0 is ~1.5x, F16 sources ~1x)
STALE_PARTIAL_SECONDS = 3600  # a .partial this old was left by a process that died while writing


def weights_path(llama, spec: ModelSpec, *, amx: bool = False) -> str:
    """The GGUF file to load for `spec` (a llama_cpp model whose file exists); `llama` is the llama_cpp module.
    `amx`: the weights will be repacked for AMX, whose kernels multiply a file of those types in blocks."""
    if not spec.weights or spec.gpu_layers:
        return spec.path
    source = Path(spec.path)
    if amx and file_type(llama, source) in AMX_FILE_TYPES:
        logger.info("model %r: loading %s as it is (AMX kernels batch its weights; no %s copy needed)", spec.name,
                    source.name, spec.weights)
        return spec.path
    code = getattr(llama, FTYPE_PREFIX + spec.weights.upper(), None)
    if code is None:  # a type this llama.cpp build does not know
        logger.warning("model %r: loading %s as it is (this llama.cpp has no weight type %s)", spec.name,
                       source.name, spec.weights)
        return spec.path
    if file_type(llama, source) == spec.weights:
        return spec.path
    stat = source.stat()
    key = hashlib.blake2b(f"{source.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}".encode(), digest_size=6).hexdigest()
    name = f"{source.stem}.{spec.weights}.{key}.gguf"
    folders = [source.parent / COPY_FOLDER, *_user_cache()]
    for folder in folders:
        if (folder / name).is_file():
            return str(folder / name)
    for folder in folders:
        try:
            copy = _write_copy(llama, source, folder, name, code, spec)
        except (OSError, EngineError) as error:
            logger.warning("model %r: no %s copy in %s (%s)", spec.name, spec.weights, folder, error)
            continue
        if copy is not None:
            return str(copy)
    logger.warning("model %r: loading %s as it is (weights %s: no copy could be written)", spec.name, source.name,
                   spec.weights)
    return spec.path


def discard_copy(path: str, spec: ModelSpec) -> bool:
    """Remove a copy that llama.cpp could not load (e.g. cut short by a crash); False for the model's own file."""
    if os.path.samefile(path, spec.path) if os.path.exists(path) else path == spec.path:
        return False
    logger.warning("model %r: its %s copy %s does not load; removed, loading the file as it is", spec.name,
                   spec.weights, path)
    Path(path).unlink(missing_ok=True)
    return True


def _write_copy(llama, source: Path, folder: Path, name: str, code: int, spec: ModelSpec) -> Path | None:
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer; the others find its copy when they get the lock
        copy = folder / name
        if copy.is_file():
            return copy
        _remove_leftovers(folder, source.stem, spec.weights, keep=name)
        if shutil.disk_usage(folder).free < ROOM_FACTOR * source.stat().st_size:
            logger.warning("model %r: no room for a %s copy in %s", spec.name, spec.weights, folder)
            return None
        logger.info("model %r: writing its weights as %s to %s (once)", spec.name, spec.weights, copy)
        return quantize_file(llama, source, copy, code, spec.weights)


def quantize_file(llama, src: Path, dst: Path, code: int, ftype: str, *, threads: int = 0) -> Path:
    """Write `src` quantized to llama.cpp's file type `code` (named `ftype`) as `dst`, through a temporary file
    that is flushed to disk before it takes `dst`'s name (a failed or interrupted run leaves no `dst`)."""
    params = llama.llama_model_quantize_default_params()
    params.ftype = code
    params.allow_requantize = True
    params.nthread = threads or os.cpu_count() or 1
    partial = dst.with_name(f"{dst.name}.{os.getpid()}-{time.monotonic_ns()}.partial")
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        if llama.llama_model_quantize(os.fsencode(src), os.fsencode(partial), params):
            raise EngineError(f"llama.cpp could not quantize {src.name} to {ftype}; see the server log.")
        with open(partial, "rb") as written:
            os.fsync(written.fileno())
        partial.replace(dst)
    finally:
        partial.unlink(missing_ok=True)
    return dst


def file_type(llama, path: Path) -> str | None:
    """The file's weight type as `weights` names it ("q4_1"; "f32" for ALL_F32), from its header; None when
    unknown."""
    try:
        code = read_gguf_metadata(path).get("general.file_type")
    except (OSError, NotGGUF):
        return None
    for prefix in (FTYPE_PREFIX, "LLAMA_FTYPE_ALL_"):
        names = [name for name in dir(llama) if name.startswith(prefix) and getattr(llama, name) == code]
        if names:
            return names[0][len(prefix):].lower()
    return None


def _remove_leftovers(folder: Path, stem: str, weights: str, *, keep: str) -> None:
    """Copies of earlier versions of a file of this name (another key), and .partial files of writers that died."""
    earlier = re.compile(rf"{re.escape(stem)}\.{weights}\.[0-9a-f]{{12}}\.gguf")
    now = time.time()
    for other in folder.iterdir():
        try:
            if other.name.endswith(".partial") and now - other.stat().st_mtime > STALE_PARTIAL_SECONDS:
                other.unlink(missing_ok=True)
            elif other.name != keep and earlier.fullmatch(other.name) and _same_source_gone(folder, other):
                other.unlink(missing_ok=True)
        except OSError:
            continue


def _same_source_gone(folder: Path, copy: Path) -> bool:
    """Beside the model (`.weights/`), a copy of the same name is of an earlier version of this very file; in the
    shared user cache it may be another folder's file of the same name, so it stays unless unused for a week."""
    if folder.name == COPY_FOLDER:
        return True
    return time.time() - copy.stat().st_atime > 7 * 86400


def user_cache_folder() -> Path | None:
    """This project's folder in the user's cache (XDG_CACHE_HOME or ~/.cache); None where the user has none."""
    try:
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "llmsite"
    except (RuntimeError, KeyError):  # no HOME and a user unknown to the system (containers)
        return None


def _user_cache() -> list[Path]:
    folder = user_cache_folder()
    return [folder / "weights"] if folder else []
