"""The installed llama.cpp carries the project's attention kernel patches (scripts/llama_cpp_patches/).

Upstream's flash attention on the CPU has two kernels: a tiled one for 64 or more query rows of a sequence in one
call (F32 queries, F32 products), and one for fewer rows (every decode step, short prompts, a long prompt's short
last chunk), which rounds the query to F16 and sums the values in F16. The decode patch makes the second work in
F32 (on a model of F32 weights a prompt's logits row by row then agree with the tiled kernel's to 5e-5 instead of
upstream's 0.07, logits of magnitude ~25); the rows patch sends every row over an F16 KV cache to it, so that a
prompt's logits are the same to the bit however it is split into calls."""

import os
from contextlib import contextmanager

import numpy as np
import pytest

from chat.engine.backends.llama_cpp import LlamaCppBackend, _llama
from chat.engine.backends.llama_patches import FLASH_ATTN_DECODE, FLASH_ATTN_ROWS, applied
from chat.engine.types import ModelSpec
from tests.factories import write_tiny_gguf

PROMPT_LENGTH = 192


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("attention") / "tiny.gguf")


@contextmanager
def bare_context(model_path, *, n_sequences: int = 1, threads: int = 2, flash_attention: bool = True):
    """A llama.cpp context on the low-level API (512 cells per sequence, each sequence in its own KV stream, as the
    engine runs them) and a `decode(items)` of (token, position, sequence) rows, logits for every row."""
    llama = _llama()
    model = llama.llama_model_load_from_file(os.fsencode(str(model_path)), llama.llama_model_default_params())
    params = llama.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch, params.n_seq_max = 512 * n_sequences, 256, 256, n_sequences
    params.kv_unified = False
    params.n_threads = params.n_threads_batch = threads
    params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention
                              else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
    context = llama.llama_init_from_model(model, params)
    batch = llama.llama_batch_init(256, 0, 1)
    n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(model))

    def decode(items):
        for i, (token, pos, seq) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = int(token), pos, 1, True
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        assert llama.llama_decode(context, batch) == 0

    def logits(row: int) -> np.ndarray:
        return np.ctypeslib.as_array(llama.llama_get_logits_ith(context, row), shape=(n_vocab,)).copy()

    try:
        yield decode, logits, n_vocab
    finally:
        llama.llama_batch_free(batch)
        llama.llama_free(context)
        llama.llama_model_free(model)


def last_logits(model_path, *, flash_attention: bool, chunk: int) -> np.ndarray:
    """The logits after a fixed random prompt evaluated in chunks of `chunk` rows, one call per chunk."""
    with bare_context(model_path, flash_attention=flash_attention) as (decode, logits, n_vocab):
        prompt = np.random.default_rng(1).integers(300, n_vocab, PROMPT_LENGTH)
        for start in range(0, PROMPT_LENGTH, chunk):
            rows = prompt[start:start + chunk]
            decode([(token, start + i, 0) for i, token in enumerate(rows)])
        return logits(len(rows) - 1)


def test_a_prompts_logits_are_the_same_to_the_bit_however_it_is_split_into_calls(tiny_model):
    """64 rows of a sequence or more took upstream's tiled kernel (other sums: 5e-5 apart with the decode patch
    alone, 0.07 upstream); with the rows patch no row does, so the engine may reuse a prompt to any token."""
    one_call = last_logits(tiny_model, flash_attention=True, chunk=PROMPT_LENGTH)
    assert np.abs(one_call).max() > 5  # the logits are not degenerate
    for chunk in (2, 7, 32, 64, 100):  # (one row per call takes another matrix kernel for F32 weights)
        assert np.array_equal(last_logits(tiny_model, flash_attention=True, chunk=chunk), one_call), chunk


def test_row_by_row_attention_is_the_same_however_the_rows_are_split(tiny_model):
    """A row's result depends on its own cells only (the engine's reproducibility rule relies on it)."""
    assert np.array_equal(last_logits(tiny_model, flash_attention=True, chunk=32),
                          last_logits(tiny_model, flash_attention=True, chunk=8))


def test_row_by_row_attention_agrees_with_attention_without_flash_attention(tiny_model):
    plain = last_logits(tiny_model, flash_attention=False, chunk=32)
    row_by_row = last_logits(tiny_model, flash_attention=True, chunk=32)
    assert np.abs(row_by_row - plain).max() < 0.05  # the plain path's KQ rounds the query to F16 as well


def decode_step_logits(model_path, *, threads: int, n_sequences: int = 3) -> list[np.ndarray]:
    """Each sequence's logits after its own random prompt (one call each) and then one decode step of all of them
    together (one token per sequence, each in its own KV stream)."""
    with bare_context(model_path, n_sequences=n_sequences, threads=threads) as (decode, logits, n_vocab):
        prompts = [np.random.default_rng(seq).integers(300, n_vocab, 40 + 7 * seq) for seq in range(n_sequences)]
        for seq, prompt in enumerate(prompts):
            decode([(token, pos, seq) for pos, token in enumerate(prompt)])
        decode([(prompt[0], len(prompt), seq) for seq, prompt in enumerate(prompts)])
        return [logits(seq) for seq in range(n_sequences)]


def test_a_decode_step_gives_each_query_head_the_same_bits_beside_the_heads_of_its_kv_head_or_alone(tiny_model):
    """At a decode step (one row per head and sequence) the rows patch attends the query heads that share a K/V
    head together, reading its cells once for them. On one thread they are (one chunk of rows); on four each row
    is its own chunk, so alone. Each row must come out the same either way."""
    assert FLASH_ATTN_ROWS in applied()
    grouped = decode_step_logits(tiny_model, threads=1)
    alone = decode_step_logits(tiny_model, threads=4)
    assert not np.array_equal(grouped[0], grouped[1])  # the sequences differ
    for seq, (together, apart) in enumerate(zip(grouped, alone)):
        assert np.abs(together).max() > 5, seq  # not degenerate
        assert np.array_equal(together, apart), seq


@contextmanager
def loaded_backend(model_path, threads: int, gpu_layers: int, flash_attention: bool):
    backend = LlamaCppBackend.load(ModelSpec("kernel", str(model_path), context_length=512, parallel=2,
                                             threads=threads, gpu_layers=gpu_layers, flash_attention=flash_attention))
    try:
        yield backend
    finally:
        backend.close()


def test_the_engine_sees_the_patch_and_needs_no_throwaway_rows_where_heads_outnumber_threads(tiny_model):
    """The wheel built by scripts/build_llama_wheel.sh says which patches it carries. With the patch a lone decode
    row is split over the threads only where the heads (4 in the tiny model) are fewer than the threads; with
    layers on a GPU its own kernels decide, so the engine keeps the throwaway rows."""
    assert FLASH_ATTN_DECODE in applied() and FLASH_ATTN_ROWS in applied()
    for threads, gpu_layers, flash_attention, exact in ((2, 0, True, True), (4, 0, True, True), (8, 0, True, False),
                                                        (2, 1, True, False), (2, 0, False, True)):
        with loaded_backend(tiny_model, threads, gpu_layers, flash_attention) as backend:
            assert backend._lone_rows_exact is exact
            # F32 weights: one row per call takes another matrix kernel than several (the probe sees it), so
            # prompts are reused in whole chunks only
            assert not backend._rows_exact and backend._granularity == 64


@pytest.mark.smollm2
def test_on_smollm2_every_row_computes_the_same_in_any_call_so_prompts_are_reused_to_the_token(smollm2_gguf):
    """The shipped model's matrix kernels give a row the same bits alone or in company (row_probe.py), and with the
    rows patch attention does too: the engine reuses prompts to the token. Not with layers on a GPU (its kernels
    decide), nor without flash attention (its other kernels were not made so), nor with more threads than heads."""
    for threads, gpu_layers, flash_attention, exact in ((2, 0, True, True), (8, 0, True, True), (16, 0, True, False),
                                                        (2, 1, True, False), (2, 0, False, False)):
        with loaded_backend(smollm2_gguf, threads, gpu_layers, flash_attention) as backend:
            assert backend._rows_exact is exact, (threads, gpu_layers, flash_attention)
            assert backend._granularity == (1 if exact else 64)
