"""Whether llama.cpp may repack a model's weights for Intel AMX on this CPU (`use_extra_bufts`).

On CPUs with AMX_INT8 llama.cpp moves the weights of the types it has AMX kernels for into an AMX layout; on a
2-core Xeon those kernels decode one SmolLM2 stream about 2.3 times and evaluate prompts about 4 times as fast
as the plain ones (docs/BENCHMARKS.md, "CPUs with AMX"). Compiled by GCC 12 with optimisation, the pinned
llama.cpp's AMX kernels load a tile configuration whose stores the compiler dropped (the intrinsic does not tell
it that the configuration is read), and the process dies at the first multiply of several rows; the Makefile
builds it with `-fno-dse`, which keeps them. Whether the installed build is safe is not assumed: a child process
loads the model with repacking on and evaluates a batch. Its verdict is kept per (library build, model file) in
the user cache, so each pair is probed once, not at every start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import sys
import threading
from pathlib import Path

from .weights import AMX_FILE_TYPES, file_type, user_cache_folder

logger = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 600  # loading and repacking a large model in the child
PROBE_ROWS = 64  # a prompt chunk: the tiled kernels (a single row takes another path)

_verdicts: dict[str, bool] = {}
_lock = threading.Lock()


def cpu_has_amx(llama) -> bool:
    return b"AMX_INT8 = 1" in llama.llama_print_system_info()


def repacking_safe(llama, model_path: str) -> bool:
    """Whether loading `model_path` with llama.cpp's weight repacking leaves the process running: always where the
    CPU has no AMX (the plain repacked kernels are sound) or the file is of a type AMX kernels do not take (a
    file without a known type is probed); otherwise as the probe found for this build and file."""
    if not cpu_has_amx(llama):
        return True
    kind = file_type(llama, Path(model_path))
    if kind is not None and kind not in AMX_FILE_TYPES:
        return True
    key = _probe_key(llama, model_path)
    with _lock:
        if key not in _verdicts:
            stored = _stored_verdicts()
            if key in stored:
                _verdicts[key] = stored[key]
            else:
                verdict = _probe(model_path)
                if verdict is not None:
                    _store_verdict(key, verdict)
                _verdicts[key] = bool(verdict)
        return _verdicts[key]


def _probe(model_path: str) -> bool | None:
    """Run the probe in a child process: True when it finished, False when it died; None when it did not finish
    in time (not stored: a slow disk is no verdict on the build)."""
    try:
        result = subprocess.run(probe_command(model_path), capture_output=True, timeout=PROBE_TIMEOUT_SECONDS,
                                cwd=Path(__file__).resolve().parents[3], stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        logger.warning("AMX probe of %s did not finish in %d s: weights stay in the plain layout", model_path,
                       PROBE_TIMEOUT_SECONDS)
        return None
    except OSError as error:  # no child could start (no memory, no interpreter): no verdict on the build
        logger.warning("AMX probe of %s could not start (%s): weights stay in the plain layout", model_path, error)
        return None
    if result.returncode == 0:
        logger.info("AMX probe of %s passed: llama.cpp repacks its weights for AMX", model_path)
        return True
    logger.warning("AMX probe of %s failed (exit %s): this llama.cpp build crashes in its AMX kernels, so the "
                   "weights stay in the plain layout (slower); rebuild llama-cpp-python with the Makefile's "
                   "CMAKE_ARGS (-fno-dse) to use them", model_path, result.returncode)
    return False


def probe_command(model_path: str) -> list[str]:
    return [sys.executable, "-m", __name__, model_path]


def _probe_key(llama, model_path: str) -> str:
    """The library files' and the model file's identities: a rebuilt llama.cpp or a replaced model is probed again."""
    libraries = sorted(Path(llama.__file__).parent.glob("lib/*"))
    parts = [f"{path.name}\0{path.stat().st_size}\0{path.stat().st_mtime_ns}" for path in libraries if path.is_file()]
    model = Path(model_path)
    stat = model.stat()
    parts.append(f"{model.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}")
    return hashlib.blake2b("\n".join(parts).encode(), digest_size=12).hexdigest()


def _verdict_file() -> Path | None:
    folder = user_cache_folder()
    return folder / "amx-probe.json" if folder else None


def _stored_verdicts() -> dict:
    path = _verdict_file()
    try:
        stored = json.loads(path.read_text()) if path else {}
    except (OSError, ValueError):
        return {}
    return {key: value for key, value in stored.items() if isinstance(value, bool)} if isinstance(stored, dict) else {}


def _store_verdict(key: str, verdict: bool) -> None:
    path = _verdict_file()
    if path is None:
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        verdicts = {**_stored_verdicts(), key: verdict}
        partial = path.with_name(f"{path.name}.{os.getpid()}.partial")
        partial.write_text(json.dumps(verdicts))
        partial.replace(path)  # atomic: a reader sees the old file or the new one
    except OSError as error:
        logger.warning("AMX probe verdict not stored in %s (%s): it is probed again next start", path, error)


def _run_probe(model_path: str) -> int:
    """In the child: load with repacking, evaluate PROBE_ROWS rows and then one, check the logits are numbers."""
    import llama_cpp as llama

    quiet = llama.llama_log_callback(lambda *_: None)  # kept referenced while llama.cpp may call it
    llama.llama_log_set(quiet, None)
    llama.llama_backend_init()
    params = llama.llama_model_default_params()
    params.use_extra_bufts = True
    model = llama.llama_model_load_from_file(os.fsencode(model_path), params)
    if not model:
        return 2
    context_params = llama.llama_context_default_params()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = 2 * PROBE_ROWS
    context_params.n_threads = context_params.n_threads_batch = os.cpu_count() or 1
    context = llama.llama_init_from_model(model, context_params)
    if not context:
        return 2
    vocab_size = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))
    for rows in (PROBE_ROWS, 1):
        tokens = (llama.llama_token * rows)(*[(index * 7919) % vocab_size for index in range(rows)])
        if llama.llama_decode(context, llama.llama_batch_get_one(tokens, rows)):
            return 2
        logits = llama.llama_get_logits_ith(context, -1)
        if not all(math.isfinite(logits[index]) for index in range(vocab_size)):
            return 3
    return 0


if __name__ == "__main__":
    sys.exit(_run_probe(sys.argv[1]))
