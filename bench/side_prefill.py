"""Why long prompts go to a second context (chat/engine/backends/side_prefill.py; docs/BENCHMARKS.md).

    .venv/bin/python -m bench.side_prefill

SmolLM2 (the shipped Q8_0 copy when it exists, else the file), flash attention, split KV, through llama.cpp's
low-level API:
1. today's main context, 2 threads: a decode step of 4 streams alone, and with a 64-row prompt chunk of a fifth
   sequence at 1,792 cells (what every stream waits for);
2. the main context on 1 thread decoding the 4 streams while a second context, 1 thread, evaluates such chunks on
   another thread: the streams' step times meanwhile, and the chunks';
3. the sequence's state moved from the second context into the main one (its stream count patched), and the
   logits of its next token against the same prompt evaluated in the main context: the difference.
"""

from __future__ import annotations

import statistics
import threading
import time

import numpy as np

from bench.servers import MODEL
from chat.engine.backends.llama_cpp import _llama, model_file_for
from chat.engine.backends.side_prefill import SidePrefill
from chat.engine.types import ModelSpec

STREAMS, CELLS, CHUNK, LONG = 4, 2048, 64, 1792


class Contexts:
    def __init__(self):
        self.llama = llama = _llama()
        spec = ModelSpec("probe", str(MODEL), context_length=CELLS, parallel=STREAMS + 1, weights="q8_0")
        path, params = model_file_for(llama, spec)
        self.model = llama.llama_model_load_from_file(str(path).encode(), params)
        self.n_vocab = llama.llama_vocab_n_tokens(llama.llama_model_get_vocab(self.model))
        self.tokens = [(i * 37) % 40000 + 100 for i in range(CELLS)]
        self.main = self.context(STREAMS + 1, threads=2)
        self.main_batch = llama.llama_batch_init(512, 0, 1)
        self.position = 320

    def context(self, sequences: int, threads: int):
        llama = self.llama
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = sequences * CELLS, sequences, False
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = threads
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_AUTO
        return llama.llama_init_from_model(self.model, params)

    def decode(self, context, batch, items, logits_row: int | None = None) -> None:
        n = 0
        for seq, tokens, start in items:
            for offset, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + offset, 1
                batch.seq_id[n][0], batch.logits[n] = seq, int(n == logits_row)
                n += 1
        batch.n_tokens = n
        assert self.llama.llama_decode(context, batch) == 0

    def prompt(self, context, batch, seq: int, length: int) -> None:
        for start in range(0, length, CHUNK):
            self.decode(context, batch, [(seq, self.tokens[start:start + CHUNK], start)])

    def step(self, extra=()) -> float:
        """One decode step of the streams (and `extra` items); its seconds."""
        started = time.perf_counter()
        self.decode(self.main, self.main_batch,
                    [(seq, [self.tokens[self.position]], self.position) for seq in range(STREAMS)] + list(extra))
        self.position += 1
        return time.perf_counter() - started


def main() -> None:
    probe = Contexts()
    llama, memory = probe.llama, probe.llama.llama_get_memory(probe.main)
    for seq in range(STREAMS):
        probe.prompt(probe.main, probe.main_batch, seq, 320)
    probe.prompt(probe.main, probe.main_batch, STREAMS, LONG)
    alone = [probe.step() for _ in range(10)]
    with_chunk = []
    for _ in range(3):
        with_chunk.append(probe.step([(STREAMS, probe.tokens[LONG:LONG + CHUNK], LONG)]))
        llama.llama_memory_seq_rm(memory, STREAMS, LONG, -1)
    print(f"main context, 2 threads: a step of {STREAMS} streams {1000 * statistics.median(alone):.1f} ms; "
          f"with a {CHUNK}-row chunk at {LONG} cells {[round(1000 * t) for t in with_chunk]} ms")

    llama.llama_set_n_threads(probe.main, 1, 1)
    alone_one = [probe.step() for _ in range(10)]
    side = SidePrefill(llama, probe.model, context_length=CELLS, flash_attn_type=llama.LLAMA_FLASH_ATTN_TYPE_AUTO,
                       streams=STREAMS + 1, batch_tokens=512)
    side._create()
    side_batch = llama.llama_batch_init(512, 0, 1)
    probe.prompt(side.context, side_batch, 0, LONG)
    side_memory = llama.llama_get_memory(side.context)
    chunk_times, done = [], threading.Event()

    def chunks():
        for _ in range(4):
            started = time.perf_counter()
            probe.decode(side.context, side_batch, [(0, probe.tokens[LONG:LONG + CHUNK], LONG)])
            chunk_times.append(time.perf_counter() - started)
            llama.llama_memory_seq_rm(side_memory, 0, LONG, -1)
        done.set()

    thread = threading.Thread(target=chunks)
    thread.start()
    meanwhile = []
    while not done.is_set():
        meanwhile.append(probe.step())
    thread.join()
    print(f"main context, 1 thread: a step {1000 * statistics.median(alone_one):.1f} ms alone; beside the side "
          f"context's chunks median {1000 * statistics.median(meanwhile):.1f}, longest {1000 * max(meanwhile):.1f} ms "
          f"({len(meanwhile)} steps); the side's chunks {[round(1000 * t) for t in chunk_times]} ms")

    llama.llama_set_n_threads(probe.main, 2, 2)
    started = time.perf_counter()
    state, size = side._saved_state()
    taken_at = time.perf_counter()
    llama.llama_memory_seq_rm(memory, STREAMS, -1, -1)
    assert llama.llama_state_seq_set_data(probe.main, state, size, STREAMS) == size
    moved_at = time.perf_counter()
    print(f"moving {LONG} tokens' cells: {size / 1e6:.1f} MB, read from the side {1000 * (taken_at - started):.0f} ms "
          f"(its own thread), written into the main context {1000 * (moved_at - taken_at):.1f} ms")

    def next_logits(seq: int) -> np.ndarray:
        probe.decode(probe.main, probe.main_batch, [(seq, [probe.tokens[LONG]], LONG)], logits_row=0)
        row = np.ctypeslib.as_array(llama.llama_get_logits_ith(probe.main, 0), shape=(probe.n_vocab,)).copy()
        llama.llama_memory_seq_rm(memory, seq, LONG, -1)
        return row

    moved = next_logits(STREAMS)
    llama.llama_memory_seq_rm(memory, 0, -1, -1)
    probe.prompt(probe.main, probe.main_batch, 0, LONG)
    print(f"max |logit difference|, evaluated aside and moved vs in the main context: "
          f"{float(np.max(np.abs(moved - next_logits(0)))):g}")
    side.close()


if __name__ == "__main__":
    main()
