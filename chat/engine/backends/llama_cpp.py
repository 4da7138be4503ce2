"""llama-cpp-python backend over the low-level API: continuous batching of several sequences per decode.

Each active sequence owns a sequence id ("slot") of one llama_context. A step puts the next token of
every decoding sequence plus chunks of newcomers' prompts into one llama_decode, then samples each
sequence with its own llama.cpp sampler chain (C code, seeded per sequence).

Prefix reuse: a slot keeps its KV cells after its sequence ends, so a new prompt that shares a
prefix with an idle slot continues from it (the tail is trimmed with llama_memory_seq_rm). Before a
slot's content is overwritten it is saved (llama_state_seq_get_data) into a memory-bounded LRU
cache, from which a later prompt with the same prefix is restored (llama_state_seq_set_data).
Partial llama_memory_seq_cp is never used: with per-sequence KV streams (kv_unified=False) it
aborts the whole process.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import InvalidRequest, ModelUnavailable
from ..prefix_cache import PrefixCache, common_prefix_length
from ..sequence import Sequence
from ..types import ModelSpec, SamplingParams
from .base import PENALTY_LAST_N, Backend

logger = logging.getLogger(__name__)

BATCH_TOKENS = 512  # tokens per llama_decode: all decoding sequences plus prompt chunks of newcomers
GREEDY_TOP_K = 40  # greedy only needs the best few candidates; keeps the penalty sampler cheap
MIN_REUSE_FROM_CACHE = 16  # restoring a saved state costs more than evaluating a handful of tokens
MIN_SAVE_TOKENS = 64  # shorter prefixes are cheap to evaluate again: not worth a cache entry

# ggml log levels (ggml.h): 3 = warning, 4 = error, 5 = continuation of the previous message.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_init_lock = threading.Lock()
_library = None  # llama_cpp module, once initialised
_log_callback = None  # kept referenced: llama.cpp calls it from C


def _llama():
    """Import and initialise llama_cpp once per process, routing its log to Python logging."""
    global _library, _log_callback
    with _init_lock:
        if _library is None:
            import llama_cpp

            @llama_cpp.llama_log_callback
            def log_callback(level, text, _user_data):
                if level in _LOG_LEVELS and text:
                    message = text.decode("utf-8", errors="replace").rstrip()
                    if message:
                        logger.log(_LOG_LEVELS[level], "llama.cpp: %s", message)

            _log_callback = log_callback  # llama.cpp's info chatter (model dumps) stays out of the log
            llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))
            llama_cpp.llama_backend_init()
            _library = llama_cpp
        return _library


@dataclass(eq=False)
class _Slot:
    """One sequence id of the context and what its KV cells currently hold."""

    seq_id: int
    kv_tokens: list[int] = field(default_factory=list)  # tokens at positions 0..n-1
    busy: bool = False
    last_used: float = 0.0


@dataclass(eq=False)
class _SequenceState:
    slot: _Slot
    sampler: object  # llama_sampler chain (freed on release)
    pending: list[int]  # tokens to decode next: the rest of the prompt, or the last sampled token


class LlamaCppBackend(Backend):
    name = "llama_cpp"

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaCppBackend:
        if not Path(spec.path).is_file():
            raise ModelUnavailable(spec.name, spec.path, "the model file does not exist.")
        llama = _llama()
        model_params = llama.llama_model_default_params()
        model_params.n_gpu_layers = spec.gpu_layers
        model = llama.llama_model_load_from_file(os.fsencode(spec.path), model_params)
        if not model:
            raise ModelUnavailable(
                spec.name, spec.path, "llama.cpp could not load it (not a GGUF model it supports, or a damaged file)."
            )
        context_length = min(spec.context_length, llama.llama_model_n_ctx_train(model) or spec.context_length)
        threads = spec.threads or os.cpu_count() or 1
        params = llama.llama_context_default_params()
        # Without a unified KV cache each sequence gets n_ctx / n_seq_max cells (and decodes faster).
        params.n_ctx = spec.parallel * context_length
        params.n_seq_max = spec.parallel
        params.kv_unified = False
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_threads = params.n_threads_batch = threads
        params.no_perf = True
        # Flash attention's CPU kernel makes a token's logits depend on how its prompt was split into
        # batches (logit differences up to ~0.9 measured on SmolLM2), so a reused prefix would not
        # give the same output as a cold prompt. Without it results are split-invariant and no slower here.
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        context = llama.llama_init_from_model(model, params)
        if not context:
            llama.llama_model_free(model)
            raise ModelUnavailable(
                spec.name, spec.path, "llama.cpp could not create its context (not enough memory for the KV cache?)."
            )
        return cls(spec, llama, model, context, context_length)

    def __init__(self, spec: ModelSpec, llama, model, context, context_length: int):
        self._llama = llama
        self._model = model
        self._context = context
        self._vocab = llama.llama_model_get_vocab(model)
        self._memory = llama.llama_get_memory(context)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self.max_sequences = spec.parallel
        self.context_length = min(context_length, llama.llama_n_ctx_seq(context))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self._vocab))
        bos = llama.llama_vocab_bos(self._vocab)
        self.bos_token_id = bos if bos >= 0 else None
        self.bos_text = self._token_text(bos)
        self.eos_text = self._token_text(llama.llama_vocab_eos(self._vocab))
        template = llama.llama_model_chat_template(model, None)
        self.chat_template_source = template.decode("utf-8", errors="replace") if template else None
        self._pieces: dict[int, bytes] = {}
        self._batch = llama.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._slots = [_Slot(seq_id) for seq_id in range(spec.parallel)]
        self._cache = PrefixCache(spec.prefix_cache_mb * 1024 * 1024)
        self._decode_seconds = 0.0

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    # -- any thread (the vocabulary is read-only after loading) ------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        data = text.encode("utf-8")
        capacity = len(data) + 8
        while True:
            buffer = (self._llama.llama_token * capacity)()
            count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, special)
            if count >= 0:
                return buffer[:count]
            capacity = -count

    def detokenize(self, tokens: list[int]) -> str:
        array = (self._llama.llama_token * len(tokens))(*tokens)
        capacity = 8 * len(tokens) + 16
        while True:
            buffer = ctypes.create_string_buffer(capacity)
            count = self._llama.llama_detokenize(self._vocab, array, len(tokens), buffer, capacity, False, True)
            if count >= 0:
                return buffer.raw[:count].decode("utf-8", errors="replace")
            capacity = -count

    def token_bytes(self, token: int) -> bytes:
        piece = self._pieces.get(token)
        if piece is None:
            buffer = ctypes.create_string_buffer(64)
            count = self._llama.llama_token_to_piece(self._vocab, token, buffer, 64, 0, False)
            if count < 0:
                buffer = ctypes.create_string_buffer(-count)
                count = self._llama.llama_token_to_piece(self._vocab, token, buffer, -count, 0, False)
            piece = self._pieces[token] = buffer.raw[:count]
        return piece

    def is_end_of_generation(self, token: int) -> bool:
        return bool(self._llama.llama_vocab_is_eog(self._vocab, token))

    def check_params(self, params: SamplingParams) -> None:
        if params.grammar is not None:
            self._llama.llama_sampler_free(self._grammar_sampler(params.grammar))

    def _grammar_sampler(self, grammar: str):
        sampler = self._llama.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8"), b"root")
        if not sampler:
            raise InvalidRequest("The GBNF grammar does not parse (it needs a 'root' rule).")
        return sampler

    # -- scheduler thread --------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        sampler = self._sampler_chain(seq)  # first: if it fails, no slot is left claimed
        try:
            slot, reused = self._claim_slot(seq.prompt_tokens)
        except BaseException:
            self._llama.llama_sampler_free(sampler)
            raise
        seq.cached_prompt_tokens = reused
        seq.backend_state = _SequenceState(slot=slot, sampler=sampler, pending=list(seq.prompt_tokens[reused:]))

    def _claim_slot(self, prompt: list[int]) -> tuple[_Slot, int]:
        """A free slot holding as much of `prompt` as possible in its KV cells; returns it and that length."""
        llama, memory = self._llama, self._memory
        limit = len(prompt) - 1  # the last prompt token must be decoded to get logits
        free = [slot for slot in self._slots if not slot.busy]
        resident_slot = max(free, key=lambda s: common_prefix_length(s.kv_tokens, prompt))
        resident = min(common_prefix_length(resident_slot.kv_tokens, prompt), limit)
        entry, cached = self._cache.longest_match(prompt) if self._cache.budget_bytes else (None, 0)
        cached = min(cached, limit)

        if resident >= max(cached, MIN_REUSE_FROM_CACHE):
            slot, reused = resident_slot, resident
        else:
            # Take an empty slot, else the least recently used one; a saved state may fill it.
            slot = min(free, key=lambda s: (bool(s.kv_tokens), s.last_used))
            reused = min(common_prefix_length(slot.kv_tokens, prompt), limit)
            if cached >= MIN_REUSE_FROM_CACHE and cached > reused:
                reused = 0
            else:
                entry = None
        if len(slot.kv_tokens) - reused >= MIN_SAVE_TOKENS:
            self._save_to_cache(slot)  # about to lose (the tail of) what the slot holds

        if reused and llama.llama_memory_seq_rm(memory, slot.seq_id, reused, -1):
            del slot.kv_tokens[reused:]
        else:  # a fresh start; also for models whose memory cannot drop a partial sequence
            llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            slot.kv_tokens, reused = [], 0
            if entry is not None and cached >= MIN_REUSE_FROM_CACHE:
                reused = self._restore(slot, entry, cached)
        slot.busy = True
        slot.last_used = time.monotonic()
        return slot, reused

    def _restore(self, slot: _Slot, entry, length: int) -> int:
        llama, memory = self._llama, self._memory
        if llama.llama_state_seq_set_data(self._context, entry.state, entry.size, slot.seq_id) and (
            llama.llama_memory_seq_rm(memory, slot.seq_id, length, -1)
        ):
            slot.kv_tokens = list(entry.tokens[:length])
            return length
        logger.warning("could not restore a cached prefix of %d tokens; evaluating it again", length)
        llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
        slot.kv_tokens = []
        return 0

    def _save_to_cache(self, slot: _Slot) -> None:
        if not self._cache.budget_bytes or self._cache.covers(slot.kv_tokens):
            return
        size = self._llama.llama_state_seq_get_size(self._context, slot.seq_id)
        if size > self._cache.budget_bytes:
            return
        state = (ctypes.c_uint8 * size)()
        if self._llama.llama_state_seq_get_data(self._context, state, size, slot.seq_id) == size:
            self._cache.put(slot.kv_tokens, state, size)

    def _sampler_chain(self, seq: Sequence):
        """One llama.cpp sampler chain per sequence: grammar, top-k, penalties, then greedy or top-p/temperature/dist."""
        llama, params = self._llama, seq.params
        grammar = self._grammar_sampler(params.grammar) if params.grammar is not None else None  # may raise
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama.llama_sampler_chain_init(chain_params)  # owns every sampler added to it
        if grammar is not None:
            llama.llama_sampler_chain_add(chain, grammar)
        top_k = GREEDY_TOP_K if params.greedy else params.top_k
        if top_k > 0:  # before the penalties: llama.cpp advises against penalising the full vocabulary
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(top_k))
        if params.repetition_penalty != 1.0 or params.frequency_penalty or params.presence_penalty:
            penalties = llama.llama_sampler_init_penalties(
                self._n_vocab,
                PENALTY_LAST_N,
                params.repetition_penalty,
                params.frequency_penalty,
                params.presence_penalty,
            )
            for token in seq.prompt_tokens[-PENALTY_LAST_N:]:  # the prompt counts as history, as in llama.cpp
                llama.llama_sampler_accept(penalties, token)
            llama.llama_sampler_chain_add(chain, penalties)
        if params.greedy:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        else:
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_p(params.top_p, 1))
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_temp(params.temperature))
            seed = llama.LLAMA_DEFAULT_SEED if params.seed is None else params.seed % 2**32
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_dist(seed))
        return chain

    def step(self, seqs: list[Sequence]) -> list[tuple[Sequence, int]]:
        llama, batch = self._llama, self._batch
        # Decoding sequences (one pending token each) first, so that prompts never starve them.
        ordered = sorted(seqs, key=lambda s: len(s.backend_state.pending) > 1)
        budget = BATCH_TOKENS
        planned: list[tuple[Sequence, list[int], int | None]] = []  # seq, chunk, batch index of its logits
        n = 0
        for seq in ordered:
            state: _SequenceState = seq.backend_state
            if budget == 0:
                break
            chunk = state.pending[:budget]
            budget -= len(chunk)
            slot, start = state.slot, len(state.slot.kv_tokens)
            for offset, token in enumerate(chunk):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = 0
                n += 1
            completes = len(chunk) == len(state.pending)
            if completes:
                batch.logits[n - 1] = 1
            planned.append((seq, chunk, n - 1 if completes else None))
        batch.n_tokens = n
        started = time.perf_counter()
        result = llama.llama_decode(self._context, batch)
        self._decode_seconds += time.perf_counter() - started
        if result != 0:
            for seq, _, _ in planned:  # what these slots hold is now unknown
                llama.llama_memory_seq_rm(self._memory, seq.backend_state.slot.seq_id, -1, -1)
                seq.backend_state.slot.kv_tokens = []
            raise RuntimeError(f"llama_decode returned {result}")

        sampled = []
        for seq, chunk, logits_index in planned:
            state = seq.backend_state
            state.slot.kv_tokens.extend(chunk)
            del state.pending[: len(chunk)]
            if logits_index is not None:
                token = llama.llama_sampler_sample(state.sampler, self._context, logits_index)
                state.pending = [token]
                sampled.append((seq, token))
        return sampled

    def release(self, seq: Sequence) -> None:
        state: _SequenceState = seq.backend_state
        if state is None:
            return
        # The slot keeps its KV cells: the next prompt sharing a prefix with them continues from there.
        state.slot.busy = False
        state.slot.last_used = time.monotonic()
        self._llama.llama_sampler_free(state.sampler)
        seq.backend_state = None

    def stats(self) -> dict:
        return {
            "prefix_cache_entries": len(self._cache),
            "prefix_cache_bytes": self._cache.total_bytes,
            "decode_seconds": self._decode_seconds,  # time inside llama_decode
        }

    def close(self) -> None:
        if self._context is None:
            return
        self._cache.clear()
        self._llama.llama_batch_free(self._batch)
        self._llama.llama_free(self._context)
        self._llama.llama_model_free(self._model)
        self._context = self._model = None
