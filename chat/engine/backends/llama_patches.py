"""What the installed llama.cpp carries of this project's patches (scripts/llama_cpp_patches/).

scripts/build_llama_wheel.sh writes `llama_cpp/_llmsite_patches.py` into the wheel it builds. A llama-cpp-python
installed any other way has no such module: the engine then keeps to what upstream's kernels guarantee.
"""

from __future__ import annotations

import functools

FLASH_ATTN_DECODE = "flash-attn-decode"
FLASH_ATTN_ROWS = "flash-attn-rows"
# Q8_0 matrices on CPUs with AVX-512 VNNI or AVX2: one kernel for any number of rows (faster; row_probe.py checks
# exactness)
Q8_0_GEMM = "q8_0-gemm"


@functools.cache
def applied() -> frozenset[str]:
    try:
        from llama_cpp import _llmsite_patches
    except ImportError:
        return frozenset()
    return frozenset(getattr(_llmsite_patches, "APPLIED", ()))


def lone_rows_exact(n_head: int, threads: int) -> bool:
    """Whether one decode row of one sequence computes as it does beside other sequences' rows. Upstream splits
    such a row's KV cells over the threads from 512 cells on (other sums); the patched kernel does so only where
    the heads are fewer than the threads, so elsewhere each head is one thread's, alone or not."""
    return FLASH_ATTN_DECODE in applied() and n_head >= threads


def every_row_exact(n_head: int, threads: int) -> bool:
    """Whether every query row over an F16 KV cache computes the same in any call: how many rows of its sequence
    the call holds, which other sequences, which thread (the rows patch: no tiled kernel; and lone rows as
    lone_rows_exact). A prompt may then be evaluated in any pieces and reused to any token."""
    return FLASH_ATTN_ROWS in applied() and lone_rows_exact(n_head, threads)
