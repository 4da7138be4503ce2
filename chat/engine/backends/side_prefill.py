"""A long prompt evaluated in a second llama.cpp context, on a thread of its own, while the main context decodes.

Measured on 2 cores (SmolLM2, flash attention, docs/BENCHMARKS.md "A second context for long prompts"): a 64-row
prompt chunk near 1,800 KV cells takes about as long on one thread as on two (flash attention's tiled kernel
gives one sequence's rows to one thread), and every stream waits for it: 0.4 s. Here one thread evaluates the
prompt in the side context while the main context decodes the streams on the others (a step of four streams:
22 ms on two threads, about 41 ms on one, no pause). The sequence's cells then move into its slot as a saved
state (a few ms), and its first token is sampled from the side context's logits: the chunks have the shapes
the main context gives them (whole aligned chunks, the last padded or row by row: `prompt_padding`), so the
logits are the same to the last bit (tested).
"""

from __future__ import annotations

import ctypes
import logging
import struct
import threading
from dataclasses import dataclass, field

from .state_buffer import state_buffer

logger = logging.getLogger(__name__)

STATE_HEADER = 8  # a sequence state starts with llama.cpp's magic and the sequence id, then the KV cache's streams


@dataclass(eq=False)
class SideJob:
    """One prompt evaluated in the side context. Written by its thread until `done` is set; read after."""

    seq: object  # the Sequence (only the scheduler's thread touches it)
    tokens: list[int]
    chunks: list[tuple[int, int, int]]  # (start, size, padding rows) of each llama_decode call
    done: threading.Event = field(default_factory=threading.Event)
    cancelled: bool = False  # set by the scheduler's thread: stop at the next chunk, the result is not wanted
    state: object = None  # the sequence's cells as a saved state, in the main context's stream layout
    size: int = 0
    logits_index: int | None = None  # the side batch row of the prompt's last token
    failed: bool = False
    # Threads for its next chunks, set by the scheduler's thread: 1 while the main context decodes on the others,
    # all of them while it has nothing else to do (the streams ended); taken up between chunks.
    threads: int = 1


class SidePrefill:
    """The side context (created at first use) and its one job at a time."""

    def __init__(self, llama, model, *, context_length: int, flash_attn_type: int, streams: int, batch_tokens: int):
        self._llama = llama
        self._model = model
        self._context_length = context_length
        self._flash_attn_type = flash_attn_type
        self._streams = streams  # the main context's KV streams (one per slot): the saved state names them
        self._batch_tokens = batch_tokens
        self._context = None
        self._batch = None
        self.job: SideJob | None = None
        self._thread: threading.Thread | None = None

    @property
    def context(self):
        return self._context

    @property
    def busy(self) -> bool:
        return self.job is not None

    def start(self, seq, tokens: list[int], chunks: list[tuple[int, int, int]]) -> SideJob | None:
        """Evaluate `tokens` in `chunks` on a new thread; None when the side context cannot be created."""
        if self._context is None and not self._create():
            return None
        job = SideJob(seq=seq, tokens=list(tokens), chunks=list(chunks))
        thread = threading.Thread(target=self._run, args=(job,), name="side-prefill", daemon=True)
        try:
            thread.start()
        except RuntimeError:  # no thread to be had (a process limit): not busy forever
            logger.warning("could not start the side context's thread; long prompts stay in the main context")
            return None
        self.job, self._thread = job, thread
        return job

    def finished(self) -> SideJob | None:
        """The job, once its thread is done with the side context (its result or its failure); it is no longer
        the current one. None while it runs."""
        job = self.job
        if job is None or not job.done.is_set():
            return None
        self._thread.join()
        self.job = self._thread = None
        return job

    def wait(self, seconds: float) -> None:
        if self.job is not None:
            self.job.done.wait(seconds)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancelled = True

    def close(self) -> None:
        """Stop the job (after its current chunk) and free the side context."""
        self.cancel()
        if self._thread is not None:
            self._thread.join()
        self.job = self._thread = None
        if self._context is not None:
            self._llama.llama_batch_free(self._batch)
            self._llama.llama_free(self._context)
            self._context = self._batch = None

    def _create(self) -> bool:
        llama = self._llama
        params = llama.llama_context_default_params()
        params.n_ctx = self._context_length
        params.n_seq_max = 1
        params.kv_unified = False
        params.n_batch = params.n_ubatch = self._batch_tokens
        params.n_threads = params.n_threads_batch = 1
        params.no_perf = True
        params.flash_attn_type = self._flash_attn_type
        context = llama.llama_init_from_model(self._model, params)
        if not context:
            logger.warning("could not create the side context for long prompts; they are evaluated in the main one")
            return False
        self._context = context
        self._batch = llama.llama_batch_init(self._batch_tokens, 0, 1)
        return True

    def _run(self, job: SideJob) -> None:
        try:
            if self._evaluate(job) and not job.cancelled:
                job.state, job.size = self._saved_state()
                job.failed = job.state is None
        except Exception:
            logger.exception("evaluating a prompt in the side context failed")
            job.failed = True
        finally:
            job.done.set()

    def _evaluate(self, job: SideJob) -> bool:
        llama, batch, context = self._llama, self._batch, self._context
        memory = llama.llama_get_memory(context)
        llama.llama_memory_clear(memory, True)
        tokens, threads = job.tokens, None
        for number, (start, size, padding) in enumerate(job.chunks):
            if job.cancelled:
                return False
            if job.threads != threads:
                threads = job.threads
                llama.llama_set_n_threads(context, threads, threads)
            last = number == len(job.chunks) - 1
            n = 0
            for offset in range(size + padding):  # padding rows repeat the last token after it (removed below)
                batch.token[n] = tokens[start + min(offset, size - 1)]
                batch.pos[n] = start + offset
                batch.n_seq_id[n] = 1
                batch.seq_id[n][0] = 0
                batch.logits[n] = int(last and offset == size - 1)
                n += 1
            batch.n_tokens = n
            result = llama.llama_decode(context, batch)
            if padding:
                llama.llama_memory_seq_rm(memory, 0, start + size, -1)
            if result != 0:
                logger.warning("llama_decode returned %d in the side context", result)
                job.failed = True
                return False
            if last:
                job.logits_index = size - 1
        return True

    def _saved_state(self):
        """The side sequence's cells as a state the main context takes for one of its slots: llama.cpp writes a
        stream count and each stream's cells, and reads only states of its own stream count, so the side's one
        stream is written as the main context's last, the others empty (the reader puts the cells into the
        destination slot's stream whichever stream carried them)."""
        llama, context = self._llama, self._context
        size = llama.llama_state_seq_get_size(context, 0)
        # N streams, the first N - 1 holding no cell (a count of 0 each), then the side's one stream as the last.
        # llama.cpp writes the state `empty` bytes into the buffer, where its stream's cells already sit in their
        # final place; only the header moves to the front. Tens of MB copied in Python (bytes, slices, a join)
        # held the GIL long enough to pause every stream and the event loop (0.4 s measured on a Xeon).
        empty = 4 * (self._streams - 1)
        buffer = state_buffer(size + empty)
        written_at = (ctypes.c_uint8 * size).from_buffer(buffer, empty)  # a view of the buffer, not a copy
        if llama.llama_state_seq_get_data(context, written_at, size, 0) != size:
            return None, 0
        (streams,) = struct.unpack_from("<I", buffer, empty + STATE_HEADER)
        if streams != 1:
            logger.warning("unexpected side state layout (%d streams); evaluating in the main context", streams)
            return None, 0
        ctypes.memmove(buffer, ctypes.byref(buffer, empty), STATE_HEADER)
        struct.pack_into("<I", buffer, STATE_HEADER, self._streams)
        ctypes.memset(ctypes.byref(buffer, STATE_HEADER + 4), 0, empty)
        return buffer, size + empty
