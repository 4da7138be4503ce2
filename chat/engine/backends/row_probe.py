"""Whether the loaded model computes a prompt's rows the same however they are split into llama_decode calls.

The rows patch (scripts/llama_cpp_patches/) makes flash attention's result for a row independent of the rows
beside it; the matrix kernels are another matter: which one multiplies the weights depends on the weight type,
the CPU and how many rows a call holds (F32 weights: one row takes a dot product, several a blocked GEMM, and
they sum in other orders; the Q8_0 and Q4_1 kernels give the same bits either way). So before the engine reuses
prompts to the token it evaluates one short prompt whole and in pieces of 1 to 16 rows and compares every row's
logits, and the next decoded token's, bit for bit.
"""

from __future__ import annotations

import ctypes

import numpy as np

PIECES = (1, 2, 3, 5, 8, 13, 16)  # rows per call; 48 in all


def rows_split_invariant(llama, context, model, seq_id: int = 0) -> bool:
    """True when every row's logits (and the next token's) are the same whole and in PIECES. Leaves `seq_id`
    empty. Any failure to decode answers False: the engine then keeps to whole aligned chunks."""
    vocab = llama.llama_model_get_vocab(model)
    n_vocab = llama.llama_vocab_n_tokens(vocab)
    length = sum(PIECES)
    if n_vocab < 2 * length:
        return False
    tokens = [(index * 7919) % (n_vocab // 2) + n_vocab // 4 for index in range(length)]  # spread, deterministic
    memory = llama.llama_get_memory(context)
    batch = llama.llama_batch_init(length, 0, 1)
    try:
        whole = _logits_after(llama, context, memory, batch, tokens, (length,), n_vocab, seq_id)
        pieces = _logits_after(llama, context, memory, batch, tokens, PIECES, n_vocab, seq_id)
        return whole is not None and pieces is not None and np.array_equal(whole, pieces)
    finally:
        llama.llama_memory_seq_rm(memory, seq_id, -1, -1)
        llama.llama_batch_free(batch)


def _logits_after(llama, context, memory, batch, tokens: list[int], pieces: tuple[int, ...], n_vocab: int,
                  seq_id: int) -> np.ndarray | None:
    """Every row's logits, then the next decoded token's."""
    llama.llama_memory_seq_rm(memory, seq_id, -1, -1)
    rows, start = [], 0
    for size in pieces:
        if not _decode(llama, context, batch, tokens[start:start + size], start, seq_id):
            return None
        rows += [_logits(llama, context, index, n_vocab) for index in range(size)]
        start += size
    if not _decode(llama, context, batch, tokens[:1], len(tokens), seq_id):
        return None
    return np.concatenate([*rows, _logits(llama, context, 0, n_vocab)])


def _decode(llama, context, batch, tokens: list[int], position: int, seq_id: int) -> bool:
    for index, token in enumerate(tokens):
        batch.token[index], batch.pos[index], batch.n_seq_id[index] = token, position + index, 1
        batch.seq_id[index][0] = seq_id
        batch.logits[index] = True
    batch.n_tokens = len(tokens)
    return llama.llama_decode(context, batch) == 0


def _logits(llama, context, index: int, n_vocab: int) -> np.ndarray:
    pointer = llama.llama_get_logits_ith(context, index)
    return np.ctypeslib.as_array(ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)).copy()
