"""llama-cpp-python backend over the low-level API: continuous batching of several sequences per decode.

Each active sequence owns a sequence id ("slot") of one llama_context with its own KV stream
(kv_unified=False: long distinct contexts decode about twice as fast as in a unified cache). A step
puts the next token of every decoding sequence plus prompt chunks (limited by a latency budget while
streams decode) into one llama_decode, grouped in increasing slot order so that llama.cpp runs it
in one pass, then samples each sequence with its own llama.cpp sampler chain (C code, seeded).

Prefix reuse: a slot keeps its KV cells after its sequence ends, so a new prompt that shares a
prefix with an idle slot continues from it (the tail is trimmed with llama_memory_seq_rm). Before a
slot's content is overwritten it is saved (llama_state_seq_get_data) into a memory-bounded LRU
cache, from which a later prompt with the same prefix is restored (llama_state_seq_set_data).
Prefix sharing: a prompt whose prefix a busy slot holds (or is evaluating, as in a burst of
requests for one character) waits for it, then copies that WHOLE sequence with
llama_memory_seq_cp and drops the tail; a partial llama_memory_seq_cp is never used: with
per-sequence KV streams it aborts the whole process. Copies live in the slots' own cells: no
memory beyond the fixed KV cache. Such a copy between streams is only recorded by llama_memory_seq_cp
and carried out at the start of the next llama_decode: before either slot is saved or restored, the
copies are applied by decoding one throwaway token (a save would otherwise store stale cells, and a
restore would be overwritten by the copy or carried by it into another slot).

Aligned prompt chunks (see PROMPT_CHUNK, _prompt_calls and _throwaway_slots): batch shapes are fixed so that a
warm prompt computes exactly the cells (and logits) of a cold one, flash attention on, and a sequence decodes
the same in any company. Forks (`n` choices): a sequence whose prompt is the very
prompt another slot is evaluating waits for it, then gets a copy of the whole sequence and samples its first
token from the same logits row with its own sampler: the prompt is evaluated once.

Suspension (preemption, chat/engine/scheduler.py): a decoding sequence's slot may be taken for another owner. Its
whole state (prompt and decoded tokens) is saved into the prefix cache, marked as reusable by other prompts only
up to its whole prompt chunks; its samplers stay. On resume it takes the slot that still holds it, else restores
the saved state (the same cells: it decodes on exactly as it would have), else evaluates them again in the shapes
of their first evaluation: its prompt as a cold prompt (whole-chunk reuse, aligned chunks, the last chunk's shape),
then its decoded tokens row by row, and decodes its last sampled token next (_next_chunk, _padding).

Failure containment: an error while sampling one sequence (logprobs, grammar) fails that sequence
only (SequencesFailed); a token the grammar rejects is never accepted (that throws a C++ exception
through ctypes, which aborts the process), a grammar that takes more of this thread's CPU than its
allowance fails its sequence (GrammarTooCostly: the others wait for it), and a failed start releases what it claimed.
"""

from __future__ import annotations

import ctypes
import itertools
import logging
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..admission import MAX_REMEMBERED_OWNERS
from ..errors import EngineError, GenerationFailed, InvalidRequest, ModelUnavailable, SequencesFailed
from ..literal_text import literal_fragments, literal_pattern
from ..logprobs import TokenLogprob, TopLogprob, log_softmax_top
from ..prefill_budget import PrefillBudget
from ..prefix_cache import CachedPrefix, PrefixCache, common_prefix_length, reusable_across
from ..state_store import StateStore, model_fingerprint, state_fingerprint
from ..sequence import Sequence
from ..types import ModelSpec, SamplingParams
from .base import PENALTY_LAST_N, Backend
from .constrained import GRAMMAR_SECONDS_FIRST, GRAMMAR_SECONDS_PER_TOKEN, ConstrainedSampler, GrammarTooCostly
from .row_probe import rows_split_invariant
from .side_prefill import SidePrefill, SideJob
from .state_buffer import state_buffer
from .amx import cpu_has_amx, repacking_safe
from .llama_patches import applied as applied_patches, every_row_exact, lone_rows_exact
from .weights import discard_copy, weights_path

logger = logging.getLogger(__name__)

BATCH_TOKENS = 512  # tokens per llama_decode, and prompt tokens per step while nothing decodes
# Prompts are evaluated in chunks of PROMPT_CHUNK tokens that start at a multiple of it (_prompt_calls).
# CPU kernels pick their code path by a batch's shape: flash attention's tiled path needs 64 query rows per
# sequence and then computes each row the same however many rows and sequences a call holds, so tiled chunks
# share calls of up to BATCH_TOKENS rows; below 64 rows a row-by-row path, exact in any company but slow on
# long contexts (a 43-row tail over 1,800 cells took 0.95 s). So a prompt's last, partial chunk past
# LONE_ROW_KV_CELLS is padded to PROMPT_CHUNK rows with throwaway tokens after it (masked from the real rows by
# causality; removed after the decode), unless it is shorter than ROW_BY_ROW_TAIL.
# Only whole chunks before the last are reused (resident, copied, saved): a reused prefix holds exactly the
# cells a cold prompt computes, and the last chunk is evaluated as a cold prompt evaluates it. The exception,
# short prompts whose last chunk goes row by row, is resident_reuse's.
PROMPT_CHUNK = 64
# ...unless it has fewer rows than this: then it goes row by row in a call of its own (the same shape cold or warm).
# Measured with the project's decode attention kernel (bench/flash_attention_shapes.py, SmolLM2, 2 threads, the Xeon
# with AMX): 48 rows take 116 ms row by row at 960 cells and 170 ms at 1,792, a padded chunk 145 and 209 ms; they
# break even near 58-60 rows. (Upstream's kernel broke even near 44 rows on an EPYC; 32 was the limit then.)
ROW_BY_ROW_TAIL = 56
# Where every row is exact, a prompt's piece beside decoding streams is cut to the step's budget, in multiples of
# this (the rows kernel attends up to 16 rows of a head together), down to prefill_min_tokens (at least one
# multiple): a whole 64-row chunk
# near 1,800 cells took ~0.3 s on a Zen 3 EPYC, past the 0.2 s budget (docs/BENCHMARKS.md, "A Zen 3 EPYC").
PIECE_ROWS = 16
GGML_TYPE_F16 = 1  # ggml.h's ggml_type
MAX_SPECIAL_TEXTS = 4096  # control-token texts in one text tokenized with special parsing (_check_special_texts)
LONE_ROW_KV_CELLS = 256  # llama.cpp pads the KV view to 256 cells; from 512 a lone decode row is split by thread
LOGIT_BAN = float("-inf")  # OpenAI's logit_bias -100: the token is never sampled
GREEDY_TOP_K = 40  # greedy only needs the best few candidates; keeps the penalty sampler cheap
MIN_REUSE_FROM_CACHE = 16  # restoring a saved state costs more than evaluating a handful of tokens
MIN_SAVE_TOKENS = 64  # shorter prefixes are cheap to evaluate again: not worth a cache entry
MIN_SHARE_TOKENS = PROMPT_CHUNK  # copying a busy slot's prefix (and waiting for it) pays off only for longer prefixes
MIN_SHARE_GAIN = 16  # share only when it gives this many more tokens than an idle slot or the saved states
# A prompt this long goes to the side context while other sequences decode (side_prefill.py): shorter ones end
# before their chunks' cost grows with the cells (a 64-row chunk: 0.13 s at the start, 0.4 s near 1,800 cells).
SIDE_PREFILL_MIN_TOKENS = 512
SIDE_IDLE_WAIT = 0.02  # seconds a step with nothing but a side prompt to wait for waits for it
SHUTDOWN_WRITE_WAIT = 30.0  # seconds close() waits to queue each slot's state for disk (none is dropped at shutdown)
MAX_GRAMMAR_REPETITION = 10_000  # llama.cpp expands x{n} into n copies: a bigger count would exhaust memory
# llama.cpp parses nested groups recursively: ~30,000 levels overflowed an 8 MB thread stack here (a segfault),
# e.g. the grammar of a JSON Schema string with maxLength 100000. 2,000 leaves a wide margin.
MAX_GRAMMAR_NESTING = 2_000
_REPETITION = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")

# ggml log levels (ggml.h): 3 = warning, 4 = error, 5 = continuation of the previous message.
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_init_lock = threading.Lock()
_library = None  # llama_cpp module, once initialised
_log_callback = None  # kept referenced: llama.cpp calls it from C


def reusable(length: int, granularity: int = PROMPT_CHUNK) -> int:
    """`length` rounded down to whole prompt chunks (`granularity` 1: where every row is exact, any length)."""
    return max(0, length - length % granularity)


def last_chunk_start(prompt_length: int, granularity: int = PROMPT_CHUNK) -> int:
    """Where a prompt's last chunk starts: what precedes it is the most of it that may be reused."""
    return reusable(prompt_length - 1, granularity)


def resident_reuse(prompt_length: int, common: int, exact: int, granularity: int = PROMPT_CHUNK) -> int:
    """How many of a prompt's tokens a slot may give it: the slot shares `common` leading tokens with the
    prompt, `exact` of its positions are whole aligned chunks.

    As a rule, whole chunks before the prompt's last. But a short prompt (ending within LONE_ROW_KV_CELLS, its
    last chunk under PROMPT_CHUNK rows) evaluates its last chunk row by row, and row-by-row cells are the same
    however the rows are split; a slot holds row-by-row cells past its aligned part too (prompt tails and
    decoded tokens within LONE_ROW_KV_CELLS). So a slot whose aligned part ends where the last chunk starts
    gives any prefix that ends inside that chunk, e.g. a shared system message of 20 tokens, as llama-server
    reuses it. At least one token is evaluated: its logits are the first token's.
    """
    limit = last_chunk_start(prompt_length, granularity)
    if (prompt_length <= LONE_ROW_KV_CELLS and prompt_length - limit < PROMPT_CHUNK and exact == limit
            and common > limit):
        return min(common, prompt_length - 1)
    return reusable(min(common, exact, limit), granularity)


def chunk_size(pending: int) -> int:
    """The next chunk of a prompt with `pending` tokens left (from an aligned position)."""
    return min(pending, PROMPT_CHUNK)


def prompt_padding(start: int, size: int, end: int, context_length: int) -> int:
    """Throwaway rows after a prompt chunk of `size` tokens from `start` (the prompt ends at `end`): a last chunk
    of ROW_BY_ROW_TAIL rows or more past LONE_ROW_KV_CELLS is padded to whole chunks, so that it takes flash
    attention's tiled path, when there is room. A function of positions only: cold and warm prompts pad alike."""
    partial = size % PROMPT_CHUNK
    if (partial < ROW_BY_ROW_TAIL or start + size != end or start + size <= LONE_ROW_KV_CELLS
            or start + size - partial + PROMPT_CHUNK > context_length):
        return 0
    return PROMPT_CHUNK - partial


def model_file_for(llama, spec: ModelSpec) -> tuple[str, object]:
    """The file the engine loads for `spec` (its own, or a copy in `weights`' type) and its llama_model_params."""
    path = weights_path(llama, spec, amx=cpu_has_amx(llama) and repacking_safe(llama, spec.path))
    return path, model_params_for(llama, spec, path)


def in_passing_thread(work, name: str):
    """`work()` in a thread that ends with it. Repacking weights (for AMX) or a llama_decode runs an OpenMP team in
    the calling thread; a team left in a thread that lives on (the main thread of a Celery worker or a script)
    stays managed by libgomp, which then throttles the spin-wait of the scheduler thread's own team: one SmolLM2
    stream decoded 32 against 245 tok/s on a 2-core Xeon with AMX (docs/BENCHMARKS.md). A thread that ends takes
    its team with it."""
    result = []
    thread = threading.Thread(target=lambda: result.append(work()), name=name)
    thread.start()
    thread.join()
    return result[0] if result else None


def load_in_passing_thread(llama, path: str, params):
    """llama_model_load_from_file in a passing thread (in_passing_thread)."""
    return in_passing_thread(lambda: llama.llama_model_load_from_file(os.fsencode(path), params), "llama-model-load")


def model_params_for(llama, spec: ModelSpec, path: str):
    """llama_model_params for loading `path` for `spec`. Weights are repacked for the CPU's fastest kernels only
    where that leaves the process running (amx.py: some builds crash in their AMX kernels)."""
    params = llama.llama_model_default_params()
    params.n_gpu_layers = spec.gpu_layers
    params.use_extra_bufts = repacking_safe(llama, path)
    return params


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


def grammar_structure(grammar: str) -> str:
    """GBNF text with its string literals, character classes and comments blanked out: what is left is syntax
    (so a JSON Schema's "{20000}" or "((((" inside a literal is not read as a repetition or a group)."""
    kept = []
    closing, escaped = None, False  # inside a literal or class: the character that ends it
    comment = False
    for char in grammar:
        if comment:
            comment = char != "\n"
            char = " " if comment else char
        elif closing is not None:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == closing:
                closing = None
            char = " " if closing is not None else char
        elif char == '"':
            closing = '"'
        elif char == "[":
            closing = "]"
        elif char == "#":
            comment, char = True, " "
        kept.append(char)
    return "".join(kept)


def grammar_nesting(grammar: str) -> int:
    """The deepest nesting of ( ) groups in GBNF text, outside string literals, character classes and comments."""
    depth = deepest = 0
    for char in grammar_structure(grammar):
        if char == "(":
            depth += 1
            deepest = max(deepest, depth)
        elif char == ")":
            depth -= 1
    return deepest


def grammar_repetition(grammar: str) -> int:
    """The largest {m,n} count in GBNF text, outside literals (a count too long to read is as large as it gets)."""
    largest = 0
    for match in _REPETITION.finditer(grammar_structure(grammar)):
        for count in match.groups():
            if count:
                largest = max(largest, int(count) if len(count) <= 9 else 10 ** 9)
    return largest


@dataclass(eq=False)
class _Slot:
    """One sequence id of the context and what its KV cells currently hold."""

    seq_id: int
    kv_tokens: list[int] = field(default_factory=list)  # tokens at positions 0..n-1
    exact: int = 0  # leading positions evaluated as whole aligned prompt chunks: the part that may be reused
    busy: bool = False
    waiting: bool = False  # busy, and waiting for a prefix copied from another slot
    copy_pending: bool = False  # source or target of a llama_memory_seq_cp not yet applied (next llama_decode)
    prompt: list[int] = field(default_factory=list)  # the prompt of the sequence that last claimed it
    claims: int = 0  # how many times it was claimed: tells a waiting copier that its source changed hands
    last_used: float = 0.0
    owner: str = ""  # whose sequence filled it last: only that owner reuses its cells at token granularity
    shared: int = 0  # its leading cells of the site's own content (Sequence.shared_tokens): all another owner reuses


@dataclass(eq=False)
class _Share:
    """A prefix that a sequence will copy from a busy slot once that slot holds it."""

    slot: _Slot
    claims: int  # the source slot's claim count when the copy was planned
    length: int


@dataclass(eq=False)
class _SideState:
    """A prompt evaluated in the side context, as _restore takes a saved state."""

    tokens: list[int]
    state: object
    size: int
    granularity: int = PROMPT_CHUNK

    @property
    def reusable(self) -> int:
        return reusable(len(self.tokens), self.granularity)  # as the main context would have left them


@dataclass(eq=False)
class _SequenceState:
    slot: _Slot
    sampler: object  # llama_sampler chain (freed on release)
    grammar: object | None  # the grammar's sampler, outside the chain (chat/engine/backends/constrained.py)
    pending: list[int]  # tokens to decode next: the rest of the prompt, or the last sampled token
    prompt: list[int]
    share: _Share | None = None  # set while waiting for a shared prefix
    twin: _Share | None = None  # set while waiting to fork from a slot evaluating the very same prompt
    prefilling: bool = True  # until the prompt's last token is decoded
    logits_index: int | None = None  # batch row of this sequence's logits in the current step
    # While suspended (slot None): the tokens its slot held, i.e. the prompt and every decoded token but the last
    # sampled one, which is still `pending`.
    resume_tokens: list[int] | None = None
    # Set at suspension: how much of its slot any prompt may reuse (its prompt's whole chunks). Its decoded tokens,
    # evaluated again as a prompt when it resumes without its saved state, must not become reusable by others.
    exact_cap: int | None = None
    grammar_seconds: float = 0.0  # CPU time its grammar took on the scheduler's thread (GrammarAllowance)
    grammar_tokens: int = 0
    # A resumed sequence evaluated again (_resume): where its prompt ends (evaluated as a cold prompt is; its decoded
    # tokens after it row by row, as they were decoded) and the token it sampled last, decoded next, not sampled.
    prompt_end: int | None = None
    resume_next: int | None = None
    side: bool = False  # its prompt is being evaluated in the side context (side_prefill.py)
    logits_context: object = None  # where its logits row is when not in the main context (the side context)


class LlamaCppBackend(Backend):
    name = "llama_cpp"
    can_suspend = True

    @classmethod
    def load(cls, spec: ModelSpec) -> LlamaCppBackend:
        if not Path(spec.path).is_file():
            raise ModelUnavailable(spec.name, spec.path, "the model file does not exist.")
        llama = _llama()
        path, params = model_file_for(llama, spec)
        model = load_in_passing_thread(llama, path, params)
        if not model and discard_copy(path, spec):
            path = spec.path
            model = load_in_passing_thread(llama, path, model_params_for(llama, spec, path))
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
        # batches; aligned prompt chunks (PROMPT_CHUNK) keep reused prefixes exact with it on.
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_AUTO if spec.flash_attention
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        context = llama.llama_init_from_model(model, params)
        if not context:
            llama.llama_model_free(model)
            raise ModelUnavailable(
                spec.name, spec.path, "llama.cpp could not create its context (not enough memory for the KV cache?)."
            )
        # Where every row computes the same in any call (the rows patch, flash attention over the F16 KV cache, and
        # matrix kernels that the probe finds split-invariant for this model's weights), a prompt is reused to the
        # token and its last chunk needs no padding (docs/ARCHITECTURE.md).
        kv_f16 = params.type_k == params.type_v == GGML_TYPE_F16
        rows_exact = bool(not spec.gpu_layers and spec.flash_attention and kv_f16
                          and every_row_exact(llama.llama_model_n_head(model), threads)
                          and in_passing_thread(lambda: rows_split_invariant(llama, context, model), "llama-row-probe"))
        # A saved state is restored only into a context whose cells it matches (chat/engine/state_store.py).
        state_key = state_fingerprint(model_fingerprint(path), {
            "flash_attention": spec.flash_attention, "prompt_chunk": PROMPT_CHUNK, "type_k": params.type_k,
            "type_v": params.type_v, "llama_cpp": getattr(llama, "__version__", ""),
            "patches": sorted(applied_patches()), "rows_exact": rows_exact}) if spec.state_dir else ""
        return cls(spec, llama, model, context, context_length, state_key=state_key, rows_exact=rows_exact)

    def __init__(self, spec: ModelSpec, llama, model, context, context_length: int, *, state_key: str = "",
                 rows_exact: bool = False):
        self._llama = llama
        self._model_name = spec.name
        self._model = model
        self._context = context
        self._vocab = llama.llama_model_get_vocab(model)
        self._memory = llama.llama_get_memory(context)
        self._n_vocab = llama.llama_vocab_n_tokens(self._vocab)
        self._constrained = ConstrainedSampler(llama, self._n_vocab)
        self.max_sequences = spec.parallel
        self.context_length = min(context_length, llama.llama_n_ctx_seq(context))
        self.add_bos = bool(llama.llama_vocab_get_add_bos(self._vocab))
        bos = llama.llama_vocab_bos(self._vocab)
        self.bos_token_id = bos if bos >= 0 else None
        self.bos_text = self._token_text(bos)
        self.eos_text = self._token_text(llama.llama_vocab_eos(self._vocab))
        self.control_tokens = self._control_tokens()
        template = llama.llama_model_chat_template(model, None)
        self.chat_template_source = template.decode("utf-8", errors="replace") if template else None
        self._pieces: dict[int, bytes] = {}
        self._batch = llama.llama_batch_init(BATCH_TOKENS, 0, 1)
        self._slots = [_Slot(seq_id) for seq_id in range(spec.parallel)]
        self._cache = PrefixCache(spec.prefix_cache_mb * 1024 * 1024)
        # Saved states on disk (state_store.py): written where the memory cache saves, read (by saved_state_for, in
        # the request's thread) where they hold more of a prompt than memory.
        self._disk = (StateStore(spec.state_dir, fingerprint=state_key, budget_bytes=spec.state_cache_mb * 1024 * 1024)
                      if spec.state_dir and state_key else None)
        self._decode_seconds = 0.0
        self._prompt_tokens_evaluated = 0  # prompt tokens that went through llama_decode (cached ones excluded)
        self._shared_prefixes = 0  # prefixes copied from a busy slot instead of evaluated
        self._forks = 0  # sequences forked from another evaluating the same prompt (n choices): no prompt work
        self._moves = 0  # sequences moved to keep busy slots consecutive
        self._suspended: set[_SequenceState] = set()  # states of suspended sequences (their samplers are ours)
        self._resumes_restored = 0  # suspended sequences that went on from their own cells (slot or saved state)
        self._resumes_evaluated = 0  # ...that had their prompt and decoded tokens evaluated again
        self._budget = PrefillBudget(spec.prefill_step_ms / 1000, BATCH_TOKENS)
        self._threads = spec.threads or os.cpu_count() or 1
        # Where a lone decode row computes as it does in company, no throwaway rows are needed beside it
        # (_throwaway_slots, _padding): on CPUs where two rows cost about twice one (AMX), they halved such a stream.
        # The patch is to the CPU kernel: with layers offloaded the GPU's kernels decide, so the rows stay.
        self._lone_rows_exact = not spec.gpu_layers and lone_rows_exact(llama.llama_model_n_head(model), self._threads)
        # Reuse to the token where every row is exact (load): `_granularity` 1 instead of whole chunks. Across
        # owners reuse stays in whole chunks (_reuse_length).
        self._rows_exact = rows_exact
        self._granularity = 1 if self._rows_exact else PROMPT_CHUNK
        # Long prompts next to decoding streams go to a second context on a thread of its own (side_prefill.py):
        # on the CPU, with a thread to spare, and with flash attention (measured: the same logits to the bit); for
        # a model with one plain KV cache, whose saved states the main context takes (not SWA's two caches, nor a
        # recurrent state).
        plain_cache = not (llama.llama_model_n_swa(model) or llama.llama_model_is_recurrent(model)
                           or llama.llama_model_is_hybrid(model))
        self._side = (SidePrefill(llama, model, context_length=self.context_length,
                                  flash_attn_type=llama.LLAMA_FLASH_ATTN_TYPE_AUTO, streams=spec.parallel,
                                  batch_tokens=BATCH_TOKENS)
                      if spec.side_prefill and spec.flash_attention and not spec.gpu_layers and self._threads >= 2
                      and plain_cache else None)
        self._side_prefills = 0  # prompts evaluated in the side context and moved into their slot
        self._side_turns: dict[str, int] = {}  # owner -> when its last prompt went aside, oldest first
        self._side_turn_numbers = itertools.count(1)
        # every waiting prompt advances at least this many whole chunks per step, even past the budget
        self._min_prompt_chunks = -(-spec.prefill_min_tokens // PROMPT_CHUNK)
        # where every row is exact: tokens, not chunks, but never under a piece (0 would crawl a token a step)
        self._min_prompt_tokens = max(PIECE_ROWS, spec.prefill_min_tokens)

    def _control_tokens(self) -> dict[str, int]:
        """Text -> id of the tokens only the chat template's markup may produce: control and unknown tokens (only
        special-token parsing produces them), and user-defined ones without whitespace, which llama.cpp matches
        in any text (chat/engine/literal_text.py), e.g. a ChatML "<|im_start|>" a converter marked user-defined.
        Whitespace runs, the user-defined tokens of neox-style vocabularies, are ordinary text."""
        llama = self._llama
        control = llama.LLAMA_TOKEN_ATTR_CONTROL | llama.LLAMA_TOKEN_ATTR_UNKNOWN
        found, user_defined = {}, []
        for token in range(self._n_vocab):
            attr = llama.llama_vocab_get_attr(self._vocab, token)
            text = self._token_text(token) if attr & (control | llama.LLAMA_TOKEN_ATTR_USER_DEFINED) else ""
            if attr & control:
                found.setdefault(text, token)
            elif attr & llama.LLAMA_TOKEN_ATTR_USER_DEFINED and text and not any(c.isspace() for c in text):
                found.setdefault(text, token)
                user_defined.append(text)
        found.pop("", None)
        self._user_defined = literal_pattern(user_defined)
        self._special_texts = literal_pattern(found)
        return found

    def _token_text(self, token: int) -> str:
        if token < 0:
            return ""
        return self._llama.llama_vocab_get_text(self._vocab, token).decode("utf-8", errors="replace")

    # -- any thread (the vocabulary is read-only after loading) ------------------------------

    def tokenize(self, text: str, *, special: bool = True) -> list[int]:
        """The tokens of `text`; `special=False`: as text, user-defined token texts included (spelled out)."""
        if special:
            self._check_special_texts(text)
        if special or self._user_defined is None:
            return self._tokenize(text, special)
        fragments = literal_fragments(text, self._user_defined)
        tokens = self._tokenize(fragments[0], False) if fragments else []
        for fragment in fragments[1:]:
            tokens += self._continued(fragment)
        return tokens

    def _check_special_texts(self, text: str) -> None:
        """Refuse text with more than MAX_SPECIAL_TEXTS control-token texts: llama.cpp's special-token parsing
        takes time quadratic in their number (measured: 90,000 "<|im_end|>a" in 1 MB, 32 s of CPU)."""
        if self._special_texts is None:
            return
        for count, _ in enumerate(self._special_texts.finditer(text), 1):
            if count > MAX_SPECIAL_TEXTS:
                raise InvalidRequest(f"The text holds more than {MAX_SPECIAL_TEXTS} control-token texts "
                                     "(such as <|im_end|>) to parse as special tokens.")

    def _continued(self, fragment: str) -> list[int]:
        """The tokens of a fragment that goes on from the one before: without the space llama.cpp's SPM
        tokenizer puts before a text's start (tokenized after a newline whose tokens are then dropped)."""
        lead = self._tokenize("\n", False)
        tokens = self._tokenize("\n" + fragment, False)
        return tokens[len(lead):] if tokens[:len(lead)] == lead else self._tokenize(fragment, False)

    def _tokenize(self, text: str, special: bool) -> list[int]:
        data = text.encode("utf-8", errors="replace")  # a lone surrogate (valid JSON "\ud800") becomes "?"
        capacity = len(data) + 8
        while True:
            buffer = (self._llama.llama_token * capacity)()
            count = self._llama.llama_tokenize(self._vocab, data, len(data), buffer, capacity, False, special)
            if count >= 0:
                return buffer[:count]
            capacity = -count

    def detokenize(self, tokens: list[int]) -> str:
        if any(not 0 <= token < self._n_vocab for token in tokens):  # llama.cpp would abort the process
            raise InvalidRequest(f"Token ids must be from 0 to {self._n_vocab - 1} for this model.", param="tokens")
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

    def saved_state_for(self, prompt: list[int], *, owner: str = "", shared: int = 0) -> CachedPrefix | None:
        """A state on disk that holds more of `prompt` than memory does (a slot or the prefix cache), read here in
        the request's thread so that the scheduler never waits for a file; None when memory is as good."""
        if self._disk is None:
            return None
        limit = last_chunk_start(len(prompt), self._granularity)
        in_memory = self._held_in_memory(prompt, limit, owner, shared)
        if in_memory >= limit:
            return None
        # Reuse is in whole chunks: a file is worth reading only if it holds at least one more.
        stored, _ = self._disk.longest_match(prompt, better_than=in_memory + PROMPT_CHUNK - 1, owner=owner,
                                             shared=shared)
        if stored is None:
            return None
        size = len(stored.state)
        return CachedPrefix(stored.tokens, (ctypes.c_uint8 * size).from_buffer_copy(stored.state), size,
                            owner=stored.owner, shared=stored.shared)

    def _held_in_memory(self, prompt: list[int], limit: int, owner: str, shared: int) -> int:
        """How much of `prompt` a slot or the prefix cache holds for `owner`. From a request thread it is an
        estimate (the slots change under it); the scheduler decides again with what it finds."""
        held = [self._reuse_length(reusable_across(min(common_prefix_length(list(slot.kv_tokens), prompt), slot.exact,
                                                       limit), saved_owner=slot.owner, saved_shared=slot.shared,
                                                   owner=owner, shared=shared), across_owners=slot.owner != owner)
                for slot in self._slots]
        cached = self._cache.match_length(prompt, owner=owner, shared=shared) if self._cache.budget_bytes else 0
        return max(held + [reusable(min(cached, limit), self._granularity)])

    def _reuse_length(self, length: int, *, across_owners: bool) -> int:
        """`length` rounded down to what may be reused: to the token where every row is exact, else whole chunks.
        Across owners always whole chunks, so that reuse never confirms a guess one token at a time."""
        return reusable(length, PROMPT_CHUNK if across_owners else self._granularity)

    def check_params(self, params: SamplingParams) -> None:
        if any(token >= self._n_vocab for token, _ in params.logit_bias):
            raise InvalidRequest(f"logit_bias names a token id outside this model's vocabulary (0-{self._n_vocab - 1}).",
                                 param="logit_bias")
        if params.grammar is not None:
            self._llama.llama_sampler_free(self._grammar_sampler(params.grammar))

    def _grammar_sampler(self, grammar: str):
        """A grammar sampler for GBNF text; what would crash llama.cpp's parser is refused first (InvalidRequest)."""
        if grammar_repetition(grammar) > MAX_GRAMMAR_REPETITION:
            raise InvalidRequest(f"The grammar repeats an item more than {MAX_GRAMMAR_REPETITION} times.")
        if grammar_nesting(grammar) > MAX_GRAMMAR_NESTING:
            raise InvalidRequest(f"The grammar nests groups more than {MAX_GRAMMAR_NESTING} deep "
                                 "(e.g. a maxLength or maxItems that large); use a smaller bound.")
        sampler = self._llama.llama_sampler_init_grammar(self._vocab, grammar.encode("utf-8", errors="replace"), b"root")
        if not sampler:
            raise InvalidRequest("The structured output asked for (response_format or tools) could not be prepared.")
        return sampler

    # -- scheduler thread --------------------------------------------------------------------

    def start(self, seq: Sequence) -> None:
        if seq.backend_state is not None and seq.backend_state.resume_tokens is not None:
            self._resume(seq)
            return
        if not seq.prompt_tokens:  # would decode nothing, then sample logits of another sequence's row
            raise InvalidRequest("The prompt is empty: it must contain at least one token.")
        # First: if the grammar does not parse, no slot is left claimed.
        grammar = self._grammar_sampler(seq.params.grammar) if seq.params.grammar is not None else None
        sampler = slot = None
        try:
            sampler = self._sampler_chain(seq)
            twin = self._twin_source(seq.prompt_tokens, seq.owner)
            if twin is not None:
                self._start_twin(seq, sampler, grammar, twin)
                return
            slot, reused, share = self._claim_slot(seq.prompt_tokens, seq.saved_state, owner=seq.owner,
                                                   shared=seq.shared_tokens)
            seq.cached_prompt_tokens = share.length if share else reused
            seq.backend_state = state = _SequenceState(
                slot=slot, sampler=sampler, grammar=grammar, pending=list(seq.prompt_tokens[reused:]),
                prompt=seq.prompt_tokens, share=share
            )
            slot.waiting = share is not None
            seq.saved_state = None  # restored or not needed: its bytes go
            if share is not None:
                self._take_shared_prefix(state)  # at once if the source already holds the prefix
        except BaseException:  # nothing stays claimed: slot and samplers go back
            seq.backend_state = None
            seq.saved_state = None
            if slot is not None:
                slot.busy = slot.waiting = False
            for claimed in (sampler, grammar):
                if claimed is not None:
                    self._llama.llama_sampler_free(claimed)
            raise

    def suspendable(self, seq: Sequence) -> bool:
        """A decoding sequence; or one evaluating its prompt for the first time, between whole chunks (an owner's
        long prompts would otherwise hold every slot until they are all evaluated)."""
        state: _SequenceState | None = seq.backend_state
        if state is None or state.slot is None or state.share is not None or state.twin is not None or state.side:
            return False
        if state.prefilling:
            return (state.prompt_end is None and not state.slot.waiting and bool(state.pending)
                    and state.slot.exact == len(state.slot.kv_tokens))
        return len(state.pending) == 1

    def suspend(self, seq: Sequence) -> None:
        """Free the slot of a sequence (suspendable); its state goes to the prefix cache (where the budget allows)
        and its samplers stay with it until it resumes (start) or is released."""
        state: _SequenceState = seq.backend_state
        slot = state.slot
        self._save_suspended(slot)
        state.resume_tokens = list(slot.kv_tokens)
        if not state.prefilling:  # what it decoded is never reusable by others (a prompt's whole chunks are)
            state.exact_cap = slot.exact if state.exact_cap is None else min(state.exact_cap, slot.exact)
        state.slot, state.logits_index = None, None
        slot.busy = slot.waiting = False
        slot.last_used = time.monotonic()  # its cells stay: the sequence takes this slot back if nobody took it
        self._suspended.add(state)

    def _save_suspended(self, slot: _Slot) -> None:
        """Save everything `slot` holds (decoded tokens included) into the memory cache; only its whole chunks are
        reusable by other prompts. Never to disk: it is kept for one sequence's resumption."""
        tokens = slot.kv_tokens
        if not tokens or not self._cache.budget_bytes or self._cache.covers(tokens, exact=slot.exact,
                                                                             owner=slot.owner):
            return
        if slot.copy_pending and not self._apply_copies(slot):
            return
        size = self._llama.llama_state_seq_get_size(self._context, slot.seq_id)
        state = state_buffer(size)
        if self._llama.llama_state_seq_get_data(self._context, state, size, slot.seq_id) == size:
            self._cache.put(tokens, state, size, exact=slot.exact, owner=slot.owner, shared=slot.shared)

    def _resume(self, seq: Sequence) -> None:
        """A suspended sequence gets a slot holding exactly its cells (its own old slot, or its saved state
        restored), else evaluates its prompt and decoded tokens again as a prompt. seq.cached_prompt_tokens stays."""
        state: _SequenceState = seq.backend_state
        tokens = state.resume_tokens
        free = [slot for slot in self._slots if not slot.busy]
        slot = next((slot for slot in free if slot.kv_tokens == tokens), None)
        if slot is None:
            entry, held = (self._cache.longest_match(tokens, exact_only=False, owner=seq.owner)
                           if self._cache.budget_bytes else (None, 0))
            if entry is not None and held == len(tokens):
                slot = min(free, key=lambda s: (bool(s.kv_tokens), s.last_used))
                if slot.exact >= MIN_SAVE_TOKENS:
                    self._save_to_cache(slot)
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                slot.kv_tokens, slot.exact = [], 0
                if not self._restore(slot, entry, held):
                    slot = None
        if slot is not None:
            slot.busy = True
            slot.claims += 1
            slot.prompt = list(seq.prompt_tokens)
            slot.owner, slot.shared = seq.owner, seq.shared_tokens
            slot.last_used = time.monotonic()
            state.slot = slot
            self._resumes_restored += 1
        elif state.prefilling:  # paused between chunks of its prompt: it goes on from whatever may be reused
            slot, reused, share = self._claim_slot(seq.prompt_tokens, owner=seq.owner, shared=seq.shared_tokens)
            state.slot, state.prompt, state.share = slot, seq.prompt_tokens, share
            state.pending = list(seq.prompt_tokens[reused:])
            slot.waiting = share is not None
            self._resumes_evaluated += 1
            if share is not None:
                self._take_shared_prefix(state)
        else:  # its cells are gone: evaluated again, so that they are what its first evaluation computed
            prompt_end = len(seq.prompt_tokens)
            slot, reused, share = self._claim_slot(tokens, owner=seq.owner, shared=seq.shared_tokens,
                                                   prompt_end=prompt_end)
            slot.exact = min(slot.exact, state.exact_cap)
            state.resume_next = state.pending[0]  # sampled before the pause: decoded once the rest is back
            state.slot, state.prompt, state.pending, state.share = slot, tokens, tokens[reused:], share
            state.prompt_end = prompt_end
            state.prefilling = True
            slot.waiting = share is not None
            self._resumes_evaluated += 1
            if share is not None:
                self._take_shared_prefix(state)
        if self._cache.budget_bytes:
            # Its saved state did its job; only its reusable prefix may still serve.
            self._cache.demote(tokens, owner=seq.owner)
        state.resume_tokens = None
        self._suspended.discard(state)

    def _twin_source(self, prompt: list[int], owner: str) -> _Share | None:
        """A busy slot of the same owner evaluating exactly `prompt` that has not sampled yet: fork from it instead
        (n choices). Only the same owner's: a twin reports its whole prompt as cached (usage.cached_tokens) and
        starts sooner, so another tenant could confirm a guess of a running prompt, last chunk included."""
        for slot in self._slots:
            if (slot.busy and not slot.waiting and slot.owner == owner and slot.prompt == prompt
                    and len(slot.kv_tokens) < len(prompt)):
                return _Share(slot, slot.claims, len(prompt))
        return None

    def _start_twin(self, seq: Sequence, sampler, grammar, twin: _Share) -> None:
        """Claim a slot that stays empty until the twin's prompt is evaluated (see _fork_twins)."""
        free = [slot for slot in self._slots if not slot.busy]
        slot = min(free, key=lambda s: (bool(s.kv_tokens), s.last_used))
        if slot.exact >= MIN_SAVE_TOKENS:
            self._save_to_cache(slot)
        self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
        slot.kv_tokens, slot.exact = [], 0
        slot.busy = slot.waiting = True
        slot.claims += 1
        slot.prompt = list(seq.prompt_tokens)
        slot.owner, slot.shared = seq.owner, seq.shared_tokens
        slot.last_used = time.monotonic()
        seq.cached_prompt_tokens = len(seq.prompt_tokens)
        seq.backend_state = _SequenceState(slot=slot, sampler=sampler, grammar=grammar, pending=[],
                                           prompt=seq.prompt_tokens, twin=twin)

    def _fork_twins(self, source_seq: Sequence, seqs: list[Sequence], *, context=None) -> tuple[list, list]:
        """Right after `source_seq` sampled its first token: copy its whole sequence to each twin and sample the
        twin's first token from the same logits row with the twin's own sampler (in `context`: the side context's
        when the source's prompt was evaluated there). (sampled, failed)"""
        source_state = source_seq.backend_state
        source = source_state.slot
        sampled, failed = [], []
        for seq in seqs:
            state = seq.backend_state
            if state is None or state.twin is None or state.twin.slot is not source or (
                    state.twin.claims != source.claims):
                continue
            slot, llama = state.slot, self._llama
            llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
            llama.llama_memory_seq_cp(self._memory, source.seq_id, slot.seq_id, -1, -1)
            source.copy_pending = slot.copy_pending = True
            slot.kv_tokens, slot.exact, slot.waiting = list(source.kv_tokens), source.exact, False
            state.twin, state.prefilling = None, False
            state.logits_index, state.logits_context = source_state.logits_index, context
            self._forks += 1
            token, error = self._sample_guarded(seq, state)
            if error is not None:
                failed.append((seq, error))
                continue
            state.pending = [token]
            sampled.append((seq, token))
        return sampled, failed

    def _orphaned_twin(self, state: _SequenceState) -> None:
        """A twin whose source went away before sampling: it evaluates the prompt itself."""
        twin = state.twin
        if twin.slot.busy and twin.slot.claims == twin.claims:
            return
        state.twin = None
        state.slot.waiting = False
        state.pending = list(state.prompt)

    def _claim_slot(self, prompt: list[int], saved: CachedPrefix | None = None, owner: str = "", shared: int = 0,
                    prompt_end: int | None = None) -> tuple[_Slot, int, _Share | None]:
        """A free slot holding as much of `prompt` as possible, how much it holds, and a busy slot to copy more from.
        `saved`: the state read from disk for this prompt (saved_state_for), used where it beats memory.
        `prompt_end`: where the prompt proper ends in `prompt` (a resumed sequence's decoded tokens follow): reuse
        stops before its last chunk as it would for that prompt alone.

        Reuse shows (in usage.cached_tokens, and in the time to the first token), so it would let a tenant confirm
        a guess of another's prompt: reuse by the token one guessed token at a time, reuse of whole chunks a whole
        64-token chunk at once (a chunk holding one unknown field, an account number, is guessed field by field).
        So cells evaluated for another owner give only the site's own content common to both prompts (`shared`:
        Sequence.shared_tokens), in whole chunks; the owner's own cells give whatever they hold."""
        llama, memory = self._llama, self._memory
        end = len(prompt) if prompt_end is None else prompt_end
        limit = last_chunk_start(end, self._granularity)  # the last chunk is evaluated as a cold prompt evaluates it

        def held(slot: _Slot) -> int:  # what a slot holds of `prompt` that may be reused
            common = common_prefix_length(slot.kv_tokens, prompt)
            if slot.owner != owner:
                return reusable(min(common, slot.exact, limit, slot.shared, shared))
            return resident_reuse(end, min(common, end), slot.exact, self._granularity)

        free = [slot for slot in self._slots if not slot.busy]
        resident_slot = max(free, key=held)
        resident = held(resident_slot)
        entry, cached = (self._cache.longest_match(prompt, owner=owner, shared=shared) if self._cache.budget_bytes
                         else (None, 0))
        from_disk = saved.reusable_by(common_prefix_length(saved.tokens, prompt), owner=owner,
                                      shared=shared) if saved is not None else 0
        if from_disk > cached:
            entry, cached = saved, from_disk
        cached = self._reuse_length(min(cached, limit), across_owners=entry is not None and entry.owner != owner)
        share = self._share_source(prompt, limit, owner, shared)
        if share is not None and share.length < max(resident, cached) + MIN_SHARE_GAIN:
            share = None  # what is already here (or saved) is as good: no copy, no waiting

        if share is None and resident >= max(cached, MIN_REUSE_FROM_CACHE):
            slot, reused = resident_slot, resident
        else:
            # Take an empty slot, else the least recently used one; a saved state or a busy slot may fill it.
            slot = min(free, key=lambda s: (bool(s.kv_tokens), s.last_used))
            reused = 0 if share else held(slot)
            if share is None and cached >= MIN_REUSE_FROM_CACHE and cached > reused:
                reused = 0
            else:
                entry = None
        if slot.exact - reused >= MIN_SAVE_TOKENS:
            self._save_to_cache(slot)  # about to lose (the tail of) what the slot holds

        if reused and llama.llama_memory_seq_rm(memory, slot.seq_id, reused, -1):
            del slot.kv_tokens[reused:]
            slot.exact = min(slot.exact, reusable(reused, self._granularity))
        else:  # a fresh start; also for models whose memory cannot drop a partial sequence
            llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            slot.kv_tokens, slot.exact, reused = [], 0, 0
            if entry is not None and cached >= MIN_REUSE_FROM_CACHE:
                reused = self._restore(slot, entry, cached, from_disk=entry is saved)
        slot.busy = True
        slot.claims += 1
        slot.prompt = list(prompt)
        slot.owner, slot.shared = owner, shared
        slot.last_used = time.monotonic()
        return slot, reused, share

    def _share_source(self, prompt: list[int], limit: int, owner: str, shared: int) -> _Share | None:
        """The busy slot that holds, or is evaluating, the longest prefix of `prompt` that `owner` may reuse (see
        _claim_slot; None below MIN_SHARE_TOKENS)."""
        best: _Share | None = None
        for slot in self._slots:
            if not slot.busy or slot.waiting:  # a slot waiting for its own copy is no source yet
                continue
            # What the slot will hold in whole chunks once its prompt is evaluated (or holds already).
            evaluated = len(slot.kv_tokens) >= len(slot.prompt)
            ceiling = slot.exact if evaluated else last_chunk_start(len(slot.prompt), self._granularity)
            length = self._reuse_length(reusable_across(min(common_prefix_length(slot.prompt, prompt), ceiling, limit),
                                                        saved_owner=slot.owner, saved_shared=slot.shared, owner=owner,
                                                        shared=shared), across_owners=slot.owner != owner)
            if length >= MIN_SHARE_TOKENS and (best is None or length > best.length):
                best = _Share(slot, slot.claims, length)
        return best

    def _take_shared_prefix(self, state: _SequenceState) -> bool:
        """Copy the awaited prefix into the sequence's slot once its source holds it; False while it must wait.

        The copy is of the whole source sequence, then the tail is dropped: a partial llama_memory_seq_cp
        aborts the process with per-sequence KV streams.
        """
        share, slot = state.share, state.slot
        source = share.slot
        available = min(common_prefix_length(source.kv_tokens, state.prompt), share.length, source.exact)
        if source.owner != slot.owner:  # also where the source was taken by another owner since
            available = min(available, source.shared, slot.shared)
        available = self._reuse_length(available, across_owners=source.owner != slot.owner)
        still_coming = source.busy and source.claims == share.claims and available < share.length
        if still_coming and source.kv_tokens == state.prompt[: len(source.kv_tokens)]:
            return False
        state.share = None
        slot.waiting = False
        llama, memory = self._llama, self._memory
        if available >= MIN_SHARE_TOKENS:
            llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
            llama.llama_memory_seq_cp(memory, source.seq_id, slot.seq_id, -1, -1)
            source.copy_pending = slot.copy_pending = True
            if llama.llama_memory_seq_rm(memory, slot.seq_id, available, -1):
                slot.kv_tokens = list(source.kv_tokens[:available])
                slot.exact = available if state.exact_cap is None else min(available, state.exact_cap)
                state.pending = list(state.prompt[available:])
                self._shared_prefixes += 1
                return True
            logger.warning("could not trim a copied prefix; evaluating the prompt in full")
        llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)  # the source went away first: evaluate it all
        slot.kv_tokens, slot.exact = [], 0
        state.pending = list(state.prompt)
        return True

    def _restore(self, slot: _Slot, entry, length: int, *, from_disk: bool = False) -> int:
        llama, memory = self._llama, self._memory
        if slot.copy_pending and not self._apply_copies(slot):  # the copy would overwrite it, or carry it away
            return 0
        taken = llama.llama_state_seq_set_data(self._context, entry.state, entry.size, slot.seq_id)
        # llama.cpp takes a state with a cell at the largest position, which the trim below (end exclusive) keeps
        # and every later decode of the slot fails on: the sequence must end where its prefix ends.
        accepted = taken and llama.llama_memory_seq_rm(memory, slot.seq_id, length, -1) and (
            llama.llama_memory_seq_pos_min(memory, slot.seq_id) == 0
            and llama.llama_memory_seq_pos_max(memory, slot.seq_id) == length - 1)
        if accepted:
            slot.kv_tokens = list(entry.tokens[:length])
            slot.exact = min(length, entry.reusable)  # a suspended sequence's decoded tokens are not reused by others
            return length
        if from_disk:  # a file this context cannot take would be read again and again
            self._disk.discard(entry.tokens, entry.owner)
        logger.warning("could not restore a cached prefix of %d tokens; evaluating it again", length)
        if taken:  # its cells may hold one that llama_memory_seq_rm cannot remove
            self._empty_sequence(slot)
        else:  # llama.cpp emptied the sequence itself when it refused the state
            llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)
        slot.kv_tokens, slot.exact = [], 0
        return 0

    def _empty_sequence(self, slot: _Slot) -> None:
        """Remove every cell of `slot`, even one at the largest position, which llama_memory_seq_rm cannot reach
        (its end is exclusive): a whole-stream copy from another slot replaces the slot's cells, then they go."""
        llama, memory = self._llama, self._memory
        other = next((candidate for candidate in self._slots if candidate is not slot), None)
        if other is None:  # one slot, one stream: clearing the memory clears only this slot
            llama.llama_memory_clear(memory, True)
            return
        llama.llama_memory_seq_cp(memory, other.seq_id, slot.seq_id, -1, -1)
        other.copy_pending = slot.copy_pending = True
        llama.llama_memory_seq_rm(memory, slot.seq_id, -1, -1)

    def _save_to_cache(self, slot: _Slot, *, disk_wait: float = 0.0) -> None:
        tokens = slot.kv_tokens[: slot.exact]  # only whole chunks are ever reused
        if len(tokens) < MIN_SAVE_TOKENS or (
                (not self._cache.budget_bytes or self._cache.covers(tokens, owner=slot.owner)) and self._disk is None):
            return
        if slot.copy_pending and not self._apply_copies(slot):  # it would save cells it does not hold yet
            return
        size = self._llama.llama_state_seq_get_size(self._context, slot.seq_id)
        state = state_buffer(size)
        if self._llama.llama_state_seq_get_data(self._context, state, size, slot.seq_id) != size:
            return
        if (self._cache.budget_bytes and size <= self._cache.budget_bytes
                and not self._cache.covers(tokens, owner=slot.owner)):
            self._cache.put(tokens, state, size, owner=slot.owner, shared=slot.shared)
        if self._disk is not None:  # written by the store's own thread
            self._disk.put(tokens, bytes(state), wait=disk_wait, owner=slot.owner, shared=slot.shared)

    def _apply_copies(self, slot: _Slot) -> bool:
        """Carry out the recorded llama_memory_seq_cp copies now. llama.cpp applies them at the start of a
        decode and has no call to force it: decode one throwaway token in `slot`, then drop it."""
        batch, position = self._batch, len(slot.kv_tokens)
        batch.token[0] = slot.kv_tokens[-1] if slot.kv_tokens else max(self.bos_token_id or 0, 0)
        batch.pos[0] = position
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = slot.seq_id
        batch.logits[0] = 1
        batch.n_tokens = 1
        result = self._llama.llama_decode(self._context, batch)
        self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, position, -1)
        if result != 0:
            logger.warning("llama_decode returned %d while applying KV copies", result)
            return False
        for other in self._slots:
            other.copy_pending = False
        return True

    def _sampler_chain(self, seq: Sequence):
        """One llama.cpp sampler chain per sequence: top-k, penalties, then greedy or top-p/temperature/dist.
        A grammar is applied outside it, only when needed (ConstrainedSampler)."""
        llama, params = self._llama, seq.params
        chain_params = llama.llama_sampler_chain_default_params()
        chain_params.no_perf = True
        chain = llama.llama_sampler_chain_init(chain_params)  # owns every sampler added to it
        if params.logit_bias:  # first, so that top-k and greedy pick among the biased logits
            entries = (llama.llama_logit_bias * len(params.logit_bias))(
                *[llama.llama_logit_bias(token, LOGIT_BAN if bias <= -100 else bias) for token, bias in params.logit_bias])
            # llama.cpp copies the entries into the sampler.
            llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_logit_bias(self._n_vocab, len(entries), entries))
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
        """One step: a llama_decode of the next token of every decoding sequence, then prompt chunks.

        Each prompt chunk is PROMPT_CHUNK tokens from an aligned position (or the prompt's end), evaluated in a
        call whose shape keeps its cells independent of what else ran (_prompt_calls). While sequences
        decode, the prefill budget limits the prompt tokens of a step, but every waiting prompt (with several
        owners: each owner's oldest) gets `prefill_min_tokens` (in whole chunks) and the oldest of all at least one. The decoding sequences go
        into their batch in increasing sequence-id order, and are first packed onto consecutive slots: with
        per-sequence KV streams llama.cpp puts sequences into one pass only while their ids run on by one
        (0, 1, 2...); out-of-order or scattered ids split a step into several passes (+35% measured).
        """
        self._pack_slots(seqs)
        for seq in seqs:
            if seq.backend_state.share is not None:
                self._take_shared_prefix(seq.backend_state)
            elif seq.backend_state.twin is not None:
                self._orphaned_twin(seq.backend_state)
        sampled, failed = self._side_finished(seqs)
        # A sequence that just sampled its first token from the side context's logits (and its twins) decodes it
        # next step, as after a prompt evaluated here: one token per sequence and step (the scheduler reads its
        # logprob record, seq.token_logprob, after the step, and a first token that ends it must be its last).
        just_sampled = {seq for seq, _ in sampled}
        ready = [seq for seq in seqs if seq.backend_state.share is None and seq.backend_state.pending
                 and not seq.backend_state.side and seq not in just_sampled]
        decoding = sorted((seq for seq in ready if not seq.backend_state.prefilling),
                          key=lambda seq: seq.backend_state.slot.seq_id)
        prefilling = [seq for seq in ready if seq.backend_state.prefilling]  # admission order: oldest first
        if decoding:
            self._side_start(prefilling)
        prompt_chunks = self._plan_prompt_chunks(prefilling, self._budget.prompt_tokens(len(decoding)),
                                                 decoding_owners={seq.owner for seq in decoding})
        if self._side is not None and self._side.job is not None:
            # Nothing else to compute here: the side prompt takes every thread for its next chunks.
            self._side.job.threads = 1 if decoding or prompt_chunks else self._threads
        if not decoding and not prompt_chunks:
            if not sampled and not failed and self._side is not None:
                self._side.wait(SIDE_IDLE_WAIT)  # nothing but a side prompt to wait for: no busy loop
            if failed:
                raise SequencesFailed([seq for seq, _ in failed], sampled, errors=dict(failed))
            return sampled
        started = time.perf_counter()
        if decoding:
            ok, bad = self._decode_planned([(seq, 1) for seq in decoding])
            sampled += ok
            failed += bad
        failed_seqs = {seq for seq, _ in failed}
        for call in self._prompt_calls(prompt_chunks):
            call = [(seq, size) for seq, size in call if seq not in failed_seqs]
            if not call:
                continue
            ok, bad = self._decode_planned(call, twins_of=seqs)
            sampled += ok
            failed += bad
            failed_seqs.update(seq for seq, _ in bad)
            self._prompt_tokens_evaluated += sum(size for seq, size in call if seq not in failed_seqs)
        elapsed = time.perf_counter() - started
        self._decode_seconds += elapsed
        if not failed:
            self._budget.observe(elapsed, len(decoding), sum(size for _, size in prompt_chunks))
        if failed:
            raise SequencesFailed([seq for seq, _ in failed], sampled, errors=dict(failed))
        return sampled

    def _side_start(self, prefilling: list[Sequence]) -> None:
        """Hand a long prompt evaluated from its start to the side context (one at a time), and give the main
        context one thread fewer meanwhile: the side's thread is the other. Taken out of `prefilling`. Of several,
        the oldest of the owner whose prompt went aside least recently (never first): one owner's burst of long
        prompts does not keep another's out of it."""
        if self._side is None or self._side.busy:
            return
        candidates = [seq for seq in prefilling if self._side_eligible(seq.backend_state)]
        if not candidates:
            return
        seq = min(candidates, key=lambda candidate: self._side_turns.get(candidate.owner, 0))  # oldest among equals
        state: _SequenceState = seq.backend_state
        if self._side.start(seq, state.pending, self._side_chunks(len(state.pending))) is None:
            self._side.close()  # a context made before its thread failed to start is freed
            self._side = None  # no second context here (memory, threads): long prompts stay in the main one
            return
        state.side = True
        self._set_threads(self._threads - 1)
        prefilling.remove(seq)
        self._side_turns.pop(seq.owner, None)  # re-inserted last: the dict stays ordered oldest turn first
        self._side_turns[seq.owner] = next(self._side_turn_numbers)
        if len(self._side_turns) > MAX_REMEMBERED_OWNERS:
            del self._side_turns[next(iter(self._side_turns))]

    @staticmethod
    def _side_eligible(state: _SequenceState) -> bool:
        """A long prompt not yet begun, with nothing shared, restored or resumed."""
        return not (state.share is not None or state.twin is not None or state.prompt_end is not None
                    or state.slot.kv_tokens or state.slot.waiting or len(state.pending) < SIDE_PREFILL_MIN_TOKENS)

    def _side_chunks(self, length: int) -> list[tuple[int, int, int]]:
        """(start, size, padding) of each call of a prompt of `length` tokens evaluated from its start, chunk by
        chunk as the main context evaluates it: whole aligned chunks, then the last padded or row by row."""
        chunks, start = [], 0
        while start < length:
            size = chunk_size(length - start)
            chunks.append((start, size, self._prompt_padding(start, size, length)))
            start += size
        return chunks

    def _side_finished(self, seqs: list[Sequence]) -> tuple[list, list]:
        """A finished side job: the prompt's cells into its slot and its first token sampled from the side
        context's logits (twins forked from it). Failed, or not taken, the sequence evaluates its prompt in the
        main context from the start as if it never left. (sampled, failed)"""
        job: SideJob | None = self._side.finished() if self._side is not None else None
        if job is None:
            return [], []
        self._set_threads(self._threads)
        seq = job.seq
        state: _SequenceState | None = seq.backend_state
        if job.cancelled or state is None or not state.side:  # released meanwhile
            return [], []
        state.side = False
        if job.failed or len(job.tokens) != len(state.pending):
            return [], []
        taken = self._restore(state.slot, _SideState(job.tokens, job.state, job.size, self._granularity), len(job.tokens))
        if taken != len(job.tokens):
            # This context does not take the side's states: its memory writes more than one stream count (the two
            # KV caches of SWA models, a recurrent state). Every long prompt would be evaluated twice: no more.
            logger.warning("model %r does not take the side context's states; long prompts stay in the main one",
                           self._model_name)
            self._side.close()
            self._side = None
            return [], []
        self._prompt_tokens_evaluated += len(job.tokens)
        self._side_prefills += 1
        state.pending, state.logits_index, state.logits_context = [], job.logits_index, self._side.context
        token, error = self._sample_guarded(seq, state)
        if error is not None:
            return [], [(seq, error)]
        state.pending, state.prefilling = [token], False
        forked, fork_failed = self._fork_twins(seq, seqs, context=self._side.context)
        return [(seq, token), *forked], fork_failed

    def _set_threads(self, threads: int) -> None:
        self._llama.llama_set_n_threads(self._context, threads, threads)

    def _prompt_calls(self, chunks: list[tuple[Sequence, int]]) -> list[list[tuple[Sequence, int]]]:
        """The llama_decode calls of a step's prompt chunks, in order (measured: bench/flash_attention_shapes.py).

        Tiled chunks (whole aligned chunks, and a last chunk padded to PROMPT_CHUNK rows) share calls of up to
        BATCH_TOKENS rows: a sequence's consecutive chunks become one item, and items of several sequences go
        together. Flash attention's tiled path computes each query row the same however many rows of a sequence
        a call holds and whatever other sequences it holds, as long as every sequence brings a multiple of
        PROMPT_CHUNK rows (llama.cpp splits a call into ubatches of equal rows per sequence). A last chunk under
        PROMPT_CHUNK rows that ends within LONE_ROW_KV_CELLS goes row by row, into one call with the others like
        it, after the tiled calls: below 64 rows flash attention computes each row on its own (the same logits in
        any company), and under 512 KV cells no row is split by thread."""
        ends, tiled, lone, small = {}, {}, [], []
        for seq, size in chunks:
            start = ends.get(seq, len(seq.backend_state.slot.kv_tokens))
            ends[seq] = start + size
            prompt_end = seq.backend_state.prompt_end
            if self._rows_exact:
                tiled[seq] = tiled.get(seq, 0) + size  # any rows in any call: all in as few calls as fit
            elif prompt_end is not None and start >= prompt_end:
                lone.append([(seq, size)])  # a resumed sequence's decoded tokens: row by row, in order
            elif size < PROMPT_CHUNK and ends[seq] <= LONE_ROW_KV_CELLS:
                small.append((seq, size))
            elif size < PROMPT_CHUNK and (size < ROW_BY_ROW_TAIL or start + PROMPT_CHUNK > self.context_length):
                lone.append([(seq, size)])  # short, or no room to pad it: row by row, alone, as warm prompts take it
            else:
                tiled[seq] = tiled.get(seq, 0) + size
        calls, call, rows = [], [], 0
        for seq, size in tiled.items():
            done = 0
            while done < size:
                room, rest = BATCH_TOKENS - rows, size - done
                rest_rows = rest + self._padding(seq.backend_state, rest, offset=done)
                piece, piece_rows = ((rest, rest_rows) if rest_rows <= room
                                     else (reusable(min(rest, room), self._granularity),) * 2)
                if not piece:
                    calls.append(call)
                    call, rows = [], 0
                    continue
                call.append((seq, piece))
                rows += piece_rows
                done += piece
        if call:
            calls.append(call)
        calls += lone
        call, rows = [], 0
        for seq, size in sorted(small, key=lambda item: item[0].backend_state.slot.seq_id):
            if rows + size > BATCH_TOKENS:  # more than 8 short prompts at once (parallel above 8): another call
                calls.append(call)
                call, rows = [], 0
            call.append((seq, size))
            rows += size
        if call:
            calls.append(call)
        return calls

    def _plan_prompt_chunks(self, prefilling: list[Sequence], allowance: int,
                            decoding_owners: set[str] = frozenset()) -> list[tuple[Sequence, int]]:
        """(sequence, chunk size) to evaluate this step: whole chunks, round-robin from the oldest prompt (where
        every row is exact, a guaranteed chunk beyond the allowance is cut to it, down to prefill_min_tokens).

        The minimum beyond the allowance goes to each owner's oldest prompt only when the step serves more than
        one owner: an owner with seven long prompts would otherwise put seven chunks into every step of everyone
        else's (its own streams it may slow down as it likes: a burst of one persona's first turns)."""
        chunks, taken, held_back = [], dict.fromkeys(prefilling, 0), set()
        one_owner = len(decoding_owners | {seq.owner for seq in prefilling}) <= 1
        oldest_of_owner: dict[str, Sequence | None] = {}
        for seq in prefilling:
            oldest_of_owner.setdefault(seq.owner, None if one_owner else seq)
        rounds = 0
        while True:
            added = False
            for seq in prefilling:
                size = 0 if seq in held_back else self._next_chunk(seq.backend_state, taken[seq])
                guaranteed = (rounds < self._min_prompt_chunks and oldest_of_owner[seq.owner] in (seq, None)
                              or not chunks)
                if size <= 0 or (size > allowance and not guaranteed):
                    continue
                if size > allowance and self._rows_exact:  # pieces of any size compute alike: keep to the budget
                    size = min(size, max(self._min_prompt_tokens, allowance // PIECE_ROWS * PIECE_ROWS))
                chunks.append((seq, size))
                taken[seq] += size
                allowance -= size
                added = True
                state = seq.backend_state
                if state.prompt_end is not None and len(state.slot.kv_tokens) + taken[seq] == state.prompt_end:
                    held_back.add(seq)  # its decoded tokens go in later steps: their calls must come after this one
            rounds += 1
            if not added:
                return chunks

    @staticmethod
    def _next_chunk(state: _SequenceState, taken: int) -> int:
        """The size of a prefilling sequence's next chunk, `taken` tokens past what its slot holds: PROMPT_CHUNK
        from an aligned position, or to the prompt's end; a resumed sequence's decoded tokens in pieces under
        PROMPT_CHUNK rows (row by row, as they were decoded), never leaving one row for last when it can be helped."""
        remaining = len(state.pending) - taken
        if state.prompt_end is None or remaining <= 0:
            return chunk_size(remaining)
        position = len(state.slot.kv_tokens) + taken
        if position < state.prompt_end:
            return min(remaining, state.prompt_end - position, PROMPT_CHUNK)
        size = min(remaining, PROMPT_CHUNK - 1)
        return size - 1 if remaining - size == 1 and size > 1 else size

    def _pack_slots(self, seqs: list[Sequence]) -> None:
        """Move sequences so that the busy slots have consecutive ids (one decode pass per step).

        The window of consecutive slots that already holds the most sequences stays; each sequence outside
        it moves into a free slot inside it by a whole-sequence copy (the only copy the split cache allows).
        Its old slot keeps the cells as an idle copy, so prefix reuse loses nothing; what the free slot
        held is saved to the prefix cache first, as when a newcomer takes a slot.
        """
        n = len(seqs)
        busy = {seq.backend_state.slot.seq_id for seq in seqs}
        if n < 2 or max(busy) - min(busy) == n - 1:
            return
        start = max(range(len(self._slots) - n + 1), key=lambda w: (len(busy & set(range(w, w + n))), -w))
        holes = [slot for slot in self._slots[start : start + n] if not slot.busy]
        outside = [seq for seq in seqs if not start <= seq.backend_state.slot.seq_id < start + n]
        for seq, target in zip(outside, holes):
            self._move(seq.backend_state, target, seqs)

    def _move(self, state: _SequenceState, target: _Slot, seqs: list[Sequence]) -> None:
        llama, memory, source = self._llama, self._memory, state.slot
        if len(target.kv_tokens) >= MIN_SAVE_TOKENS:
            self._save_to_cache(target)
        llama.llama_memory_seq_rm(memory, target.seq_id, -1, -1)
        if source.kv_tokens and state.share is None:
            llama.llama_memory_seq_cp(memory, source.seq_id, target.seq_id, -1, -1)
            source.copy_pending = target.copy_pending = True
            target.kv_tokens, target.exact = list(source.kv_tokens), source.exact
        else:  # nothing evaluated yet (a sequence waiting for its shared prefix)
            target.kv_tokens, target.exact = [], 0
        target.busy, target.waiting, target.prompt, target.owner = True, source.waiting, source.prompt, source.owner
        target.shared = source.shared
        target.claims += 1
        source.busy = source.waiting = False
        source.claims += 1
        source.last_used = target.last_used = time.monotonic()
        state.slot = target
        for other in seqs:  # sequences waiting to copy a prefix from the old slot copy it from the new one
            share = other.backend_state.share
            if share is not None and share.slot is source:
                other.backend_state.share = _Share(target, target.claims, share.length)
            twin = other.backend_state.twin
            if twin is not None and twin.slot is source:
                other.backend_state.twin = _Share(target, target.claims, twin.length)
        self._moves += 1

    def _decode_planned(self, planned: list[tuple[Sequence, int]],
                        twins_of: list[Sequence] | None = None) -> tuple[list[tuple[Sequence, int]], list]:
        """Decode the planned chunks in one batch; if that fails, retry each sequence alone so only culprits fail.
        Returns (sampled, failed) with failed a list of (Sequence, EngineError). `twins_of`: the step's sequences,
        for prompt calls: twins fork from each prompt evaluated (_accept_and_fork)."""
        result = self._decode_batch(planned)
        if result == 0:
            return self._accept_and_fork(planned, twins_of)
        logger.warning("llama_decode returned %d for %d sequences; retrying them one by one", result, len(planned))
        for seq, _ in planned:  # back to what the slot is known to hold (llama.cpp may have kept part of the batch)
            slot = seq.backend_state.slot
            self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.kv_tokens), -1)
        sampled, failed = [], []
        for item in planned:
            result = self._decode_batch([item])
            if result == 0:
                ok, bad = self._accept_and_fork([item], twins_of)
                sampled.extend(ok)
                failed.extend(bad)
            else:
                logger.warning("llama_decode returned %d for slot %d", result, item[0].backend_state.slot.seq_id)
                slot = item[0].backend_state.slot
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, -1, -1)
                slot.kv_tokens, slot.exact = [], 0
                failed.append((item[0], GenerationFailed(self._model_name)))
        return sampled, failed

    def _decode_batch(self, planned: list[tuple[Sequence, int]]) -> int:
        batch, n = self._batch, 0
        throwaway = self._throwaway_slots(planned)
        total = len(throwaway) + sum(size + self._padding(seq.backend_state, size) for seq, size in planned)
        if total > BATCH_TOKENS:  # the batch's arrays hold BATCH_TOKENS rows: never write past them
            raise RuntimeError(f"a decode call of {total} rows planned; at most {BATCH_TOKENS}")
        rows = sorted([(seq.backend_state.slot.seq_id, seq, size) for seq, size in planned] +
                      [(slot.seq_id, None, 1) for slot in throwaway], key=lambda row: row[0])
        for slot_id, seq, size in rows:  # in increasing slot order: one pass
            if seq is None:
                n = self._put_throwaway(self._slots[slot_id], n)
                continue
            state: _SequenceState = seq.backend_state
            slot, start = state.slot, len(state.slot.kv_tokens)
            for offset, token in enumerate(state.pending[:size]):
                batch.token[n] = token
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = 0
                n += 1
            if size == len(state.pending):  # the prompt's last token, or a decoding sequence's token
                batch.logits[n - 1] = 1
            state.logits_index = n - 1 if size == len(state.pending) else None
            for offset in range(size, size + self._padding(state, size)):
                batch.token[n] = state.pending[size - 1]
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = slot.seq_id
                batch.logits[n] = 0
                n += 1
        batch.n_tokens = n
        result = self._llama.llama_decode(self._context, batch)
        for slot in throwaway:
            self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.kv_tokens), -1)
        for seq, size in planned:
            if self._padding(seq.backend_state, size):
                slot = seq.backend_state.slot
                self._llama.llama_memory_seq_rm(self._memory, slot.seq_id, len(slot.kv_tokens) + size, -1)
        if result == 0:  # the decode applied every recorded copy first
            for slot in self._slots:
                slot.copy_pending = False
        return result

    def _padding(self, state: _SequenceState, size: int, offset: int = 0) -> int:
        """Throwaway rows after a prompt's last chunk, evaluated as `size` tokens from `offset` past what the slot
        holds, so that a partial chunk past LONE_ROW_KV_CELLS takes flash attention's tiled path (a multiple of
        PROMPT_CHUNK rows) instead of the slow row-by-row one. A function of the chunk's position only, so cold
        and warm prompts pad alike."""
        start = len(state.slot.kv_tokens) + offset
        if state.prompt_end is not None and start >= state.prompt_end:
            # A decoded token evaluated again alone: a second row keeps it off the split-KV path, as the throwaway
            # tokens beside a decode step did (_throwaway_slots).
            lone = state.prefilling and size == 1 and start >= LONE_ROW_KV_CELLS and not self._lone_rows_exact
            return 1 if lone else 0
        end = len(state.slot.kv_tokens) + len(state.pending) if state.prompt_end is None else state.prompt_end
        return self._prompt_padding(start, size, end) if state.prefilling else 0

    def _prompt_padding(self, start: int, size: int, end: int) -> int:
        """prompt_padding; none where every row is exact (no row takes a tiled kernel)."""
        return 0 if self._rows_exact else prompt_padding(start, size, end, self.context_length)

    def _throwaway_slots(self, planned: list[tuple[Sequence, int]]) -> list[_Slot]:
        """Slots to decode a throwaway token in beside a decode step's sequences once one of them holds 256 cells
        or more: the slots between theirs (llama.cpp passes only consecutive slot ids together), or a
        neighbour of a lone sequence. One query row of one stream over 512+ KV cells takes flash attention's
        split-KV path (other sums), so without them a sequence would decode differently alone than beside
        others. The tokens are removed after the decode. None where lone rows compute as in company (the patched
        kernel, llama_patches.py)."""
        if self._lone_rows_exact or any(size != 1 or seq.backend_state.prefilling for seq, size in planned) or all(
                len(seq.backend_state.slot.kv_tokens) < LONE_ROW_KV_CELLS for seq, _ in planned):
            return []
        ids = {seq.backend_state.slot.seq_id for seq, _ in planned}
        if len(ids) == 1:
            (only,) = ids
            wanted = [[only + 1], [only - 1]]
        else:
            wanted = [[i for i in range(min(ids), max(ids)) if i not in ids]]
        for candidates in wanted:
            if not all(0 <= i < len(self._slots) for i in candidates):
                continue
            slots = [self._slots[i] for i in candidates]  # idle, or busy but not decoding in this call
            if all(not slot.copy_pending or self._apply_copies(slot) for slot in slots):
                return slots
        return []

    def _put_throwaway(self, slot: _Slot, n: int) -> int:
        """Put a token for `slot` at its next position into the batch (removed after the decode)."""
        batch = self._batch
        batch.token[n] = slot.kv_tokens[-1] if slot.kv_tokens else max(self.bos_token_id or 0, 0)
        batch.pos[n] = len(slot.kv_tokens)
        batch.n_seq_id[n] = 1
        batch.seq_id[n][0] = slot.seq_id
        batch.logits[n] = 0
        return n + 1

    def _accept_and_fork(self, planned: list[tuple[Sequence, int]],
                         twins_of: list[Sequence] | None) -> tuple[list, list]:
        """_accept_decoded, then sequences with the very same prompt as one just evaluated fork from it: at once, while
        the context's logits are this call's. After a failed call, each retry's decode replaces the logits of the one
        before: a twin forked after the last retry sampled another prompt's row, or a row that is gone (NULL: a
        crash in llama.cpp's sampler). A resumed sequence evaluated again to where it paused samples nothing, but its
        row is its tokens' next one: a twin of them forks there too (it waited for the source's whole reply)."""
        sampled, failed = self._accept_decoded(planned)
        if twins_of is None:
            return sampled, failed
        failed_seqs = {seq for seq, _ in failed}
        for seq, _ in planned:  # each one with logits in this call evaluated all it had to evaluate
            if seq not in failed_seqs and seq.backend_state.logits_index is not None:
                forked, fork_failed = self._fork_twins(seq, twins_of)
                sampled += forked
                failed += fork_failed
        return sampled, failed

    def _accept_decoded(self, planned: list[tuple[Sequence, int]]) -> tuple[list[tuple[Sequence, int]], list]:
        """Sample each sequence that has logits; an error sampling one fails that one only: (sampled, failed)."""
        sampled, failed = [], []
        for seq, size in planned:
            state = seq.backend_state
            slot = state.slot
            if (state.prefilling or self._rows_exact) and slot.exact == len(slot.kv_tokens):
                # whole aligned chunks, tiled; where every row is exact, every token, decoded ones too
                slot.exact += reusable(size, self._granularity)
                if state.exact_cap is not None:  # a resumed sequence's decoded tokens are never reusable
                    slot.exact = min(slot.exact, state.exact_cap)
            slot.kv_tokens.extend(state.pending[:size])
            del state.pending[:size]
            if state.logits_index is None:
                continue
            if state.resume_next is not None:  # evaluated again up to where it paused: it decodes on from there
                state.pending, state.prefilling = [state.resume_next], False
                state.resume_next = state.prompt_end = None
                continue
            token, error = self._sample_guarded(seq, state)
            if error is not None:
                failed.append((seq, error))
                continue
            state.pending = [token]
            state.prefilling = False
            sampled.append((seq, token))
        return sampled, failed

    def _sample_guarded(self, seq: Sequence, state: _SequenceState) -> tuple[int | None, EngineError | None]:
        """(token, None), or (None, the error) when sampling this sequence failed: it fails that one only."""
        try:
            return self._sample(seq, state), None
        except EngineError as error:
            return None, error
        except Exception:
            logger.exception("sampling a sequence of model %r failed", self._model_name)
            return None, GenerationFailed(self._model_name)
        finally:
            state.logits_context = None  # its next logits are the main context's

    def _sample(self, seq: Sequence, state: _SequenceState) -> int:
        if self.faults is not None and self.faults.sample is not None:
            self.faults.sample(seq)
        context = state.logits_context or self._context
        # Only sequences that asked pay for logprobs; the row is copied before the sampler sees it.
        row = self._logits_row(state.logits_index, context) if seq.params.logprobs is not None else None
        if state.grammar is None:
            token = self._llama.llama_sampler_sample(state.sampler, context, state.logits_index)
        else:
            started = time.thread_time()  # CPU of this thread: what every other stream waits for
            token = self._constrained.sample(context=context, index=state.logits_index,
                                             chain=state.sampler, grammar=state.grammar)
            state.grammar_seconds += time.thread_time() - started
            state.grammar_tokens += 1
            if state.grammar_seconds > GRAMMAR_SECONDS_FIRST + GRAMMAR_SECONDS_PER_TOKEN * state.grammar_tokens:
                raise GrammarTooCostly()
        if row is not None:
            seq.token_logprob = self._token_logprob(row, token, seq.params.logprobs)
        return token

    def _logits_row(self, index: int, context=None):
        """A copy of the raw logits of batch row `index` (before penalties, grammar and temperature); None if absent."""
        pointer = self._llama.llama_get_logits_ith(context or self._context, index)
        if not pointer:  # NULL for a row without logits; wrapping it would crash
            return None
        row = (ctypes.c_float * self._n_vocab)()
        ctypes.memmove(row, pointer, ctypes.sizeof(row))
        return row

    def _token_logprob(self, row, token: int, top: int) -> TokenLogprob:
        """The sampled token's record from the model's distribution at this step: the log-softmax of `row`."""
        logprob, best = log_softmax_top(row, token, top)
        piece = self.token_bytes(token)
        return TokenLogprob(token=piece.decode("utf-8", errors="replace"), logprob=logprob, bytes=piece,
                            top=tuple(self._top_logprob(other, value) for other, value in best))

    def _top_logprob(self, token: int, logprob: float) -> TopLogprob:
        # A control token adds no bytes to a reply; an alternative is shown by its name ("<|im_end|>") instead.
        piece = self.token_bytes(token) or self._token_text(token).encode("utf-8")
        return TopLogprob(token=piece.decode("utf-8", errors="replace"), logprob=logprob, bytes=piece)

    def release(self, seq: Sequence) -> None:
        state: _SequenceState = seq.backend_state
        if state is None:
            return
        if state.side:  # its prompt is not wanted any more: the side context stops after its current chunk
            self._side.cancel()
        if state.slot is not None:  # a suspended sequence has none
            # The slot keeps its KV cells: the next prompt sharing a prefix with them continues from there.
            state.slot.busy = state.slot.waiting = False
            state.slot.last_used = time.monotonic()
        self._suspended.discard(state)
        self._llama.llama_sampler_free(state.sampler)
        if state.grammar is not None:
            self._llama.llama_sampler_free(state.grammar)
        seq.backend_state = None

    def stats(self) -> dict:
        return {
            "prefix_cache_entries": len(self._cache),
            "prefix_cache_bytes": self._cache.total_bytes,
            "decode_seconds": self._decode_seconds,  # time inside llama_decode
            "prompt_tokens_evaluated": self._prompt_tokens_evaluated,
            "shared_prefixes": self._shared_prefixes,
            "forked_sequences": self._forks,
            "side_prefills": self._side_prefills,
            "slot_moves": self._moves,
            "suspended_sequences": len(self._suspended),
            "resumes_restored": self._resumes_restored,
            "resumes_evaluated": self._resumes_evaluated,
            # states not written to disk because the writer was behind (the decode loop never waits for it)
            "state_writes_dropped": self._disk.dropped_writes if self._disk is not None else 0,
        }

    def close(self) -> None:
        if self._context is None:
            return
        if self._disk is not None:  # at shutdown every slot's conversation goes to disk
            for slot in self._slots:
                if len(slot.kv_tokens) >= MIN_SAVE_TOKENS:
                    self._save_to_cache(slot, disk_wait=SHUTDOWN_WRITE_WAIT)
            self._disk.close()
        self._cache.clear()
        for state in self._suspended:  # sequences still suspended when the engine closed
            self._llama.llama_sampler_free(state.sampler)
            if state.grammar is not None:
                self._llama.llama_sampler_free(state.grammar)
        self._suspended.clear()
        if self._side is not None:
            self._side.close()
        self._llama.llama_batch_free(self._batch)
        self._llama.llama_free(self._context)
        self._llama.llama_model_free(self._model)
        self._context = self._model = None
