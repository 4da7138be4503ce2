"""Re-quantizing a GGUF file with llama.cpp's own quantizer (e.g. Q4_1 -> Q4_0 for faster CPU kernels)."""

from __future__ import annotations

import os
from pathlib import Path

from .errors import InvalidRequest, ModelUnavailable

_FTYPE_PREFIX = "LLAMA_FTYPE_MOSTLY_"


def quantize_types() -> list[str]:
    """Names accepted as `ftype`, e.g. "q4_0", "q4_k_m", "q8_0", "f16"."""
    from .backends.llama_cpp import _llama

    return sorted(name[len(_FTYPE_PREFIX) :].lower() for name in dir(_llama()) if name.startswith(_FTYPE_PREFIX))


def quantize_model(src: str | os.PathLike, dst: str | os.PathLike, ftype: str = "q4_0", *, threads: int = 0) -> Path:
    """Write `src` quantized to `ftype` as `dst` and return its Path.

    Already-quantized sources are allowed (re-quantizing loses a little quality). The output is
    written to a temporary file first, so a failed run never leaves a half-written `dst`.
    """
    from .backends.llama_cpp import _llama
    from .backends.weights import quantize_file

    llama = _llama()
    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise ModelUnavailable(src.name, str(src), "the model file does not exist.")
    code = getattr(llama, _FTYPE_PREFIX + ftype.upper(), None)
    if code is None:
        raise InvalidRequest(f"Unknown quantization type {ftype!r}; choose one of: {', '.join(quantize_types())}.")
    return quantize_file(llama, src, dst, code, ftype, threads=threads)
