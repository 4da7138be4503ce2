"""Q8_0 weights: the matrix kernel the installed llama.cpp takes for them computes the products of their values,
and a row of activations the same alone or in a batch of any size.

With the q8_0-gemm patch (scripts/llama_cpp_patches/) a CPU with AVX-512 VNNI or AVX2 multiplies Q8_0 matrices
with one kernel for any number of rows, one included; elsewhere upstream's kernels do. The tiny model here is 96
wide, so a row of weights has three 32-value blocks (the VNNI kernel takes two at a time: the last one alone), and
its vocabulary is not a multiple of the kernels' row tiles (the AVX2 kernel's last tile repeats its last row)."""

import numpy as np
import pytest

from chat.engine.backends.llama_patches import Q8_0_GEMM, applied
from tests.factories import write_tiny_gguf

from .test_attention_kernel import PROMPT_LENGTH, last_logits

WIDTH = 96


@pytest.fixture(scope="module")
def q8_0_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("q8_0")
    return (write_tiny_gguf(folder / "q8_0.gguf", weights="q8_0", embedding_length=WIDTH, seed=3),
            write_tiny_gguf(folder / "f32.gguf", weights="f32_of_q8_0", embedding_length=WIDTH, seed=3))


def test_the_wheel_carries_the_q8_0_kernel_patch():
    assert Q8_0_GEMM in applied()  # compiled in where the CPU has AVX-512 VNNI or AVX2 (its #if), else upstream's


def test_q8_0_weights_give_the_logits_of_their_values(q8_0_models):
    """Against F32 weights of the same values: only the activations' own rounding to 8 bits (per 32 values, as
    llama.cpp multiplies Q8_0) sets them apart, about a percent of the logits' spread."""
    quantized, values = q8_0_models
    for chunk in (1, 3, 4, PROMPT_LENGTH):
        logits = last_logits(quantized, flash_attention=True, chunk=chunk)
        reference = last_logits(values, flash_attention=True, chunk=chunk)
        spread = reference.max() - reference.min()
        assert spread > 5  # not degenerate
        assert np.abs(logits - reference).max() < 0.03 * spread, chunk


def test_a_row_of_q8_0_products_is_the_same_alone_or_in_any_batch(q8_0_models):
    """One row per call, two, three, five, nine, or all at once: the same bits (the engine then reuses prompts to
    the token on such weights, row_probe.py)."""
    quantized, _ = q8_0_models
    whole = last_logits(quantized, flash_attention=True, chunk=PROMPT_LENGTH)
    for chunk in (1, 2, 3, 5, 9):
        assert np.array_equal(last_logits(quantized, flash_attention=True, chunk=chunk), whole), chunk
