"""How batch shape changes logits and speed with flash attention on CPU (the measurements behind the engine's
aligned-chunk rule, docs/BENCHMARKS.md "Issue 22: what was built").

    .venv/bin/python -m bench.flash_attention_shapes

SmolLM2 through llama.cpp's low-level API, split KV cache (as the engine runs it), 2 threads:
1. the logits after a ~300-token prompt evaluated in chunks of different sizes, alone or beside a second
   sequence's chunks, then 6 greedy decode steps, each against the reference (48-token chunks, alone);
2. prompt evaluation speed of a 1,000-token prompt by chunk size, flash attention on and off;
3. a prompt's last, partial chunk far past 256 cells: row by row, or padded to 64 rows (tiled), by its rows (the
   measurement behind ROW_BY_ROW_TAIL).
Loads the file this project's engine loads (config.yaml's, or its copy in `weights`' type).
"""

from __future__ import annotations

import time

import numpy as np

from chat.engine.backends.llama_cpp import _llama, model_params_for
from chat.engine.types import ModelSpec
from bench.servers import EngineShape

SEQUENCES, CELLS = 4, 2048


class Probe:
    def __init__(self):
        self.llama = llama = _llama()
        self.path = str(EngineShape.from_config().loaded_file())
        spec = ModelSpec("probe", self.path, context_length=CELLS, parallel=SEQUENCES)
        self.model = llama.llama_model_load_from_file(self.path.encode(), model_params_for(llama, spec, spec.path))
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.n_vocab = llama.llama_vocab_n_tokens(self.vocab)
        self.batch = llama.llama_batch_init(512, 0, 1)

    def context(self, flash: bool):
        llama = self.llama
        params = llama.llama_context_default_params()
        params.n_ctx, params.n_seq_max, params.kv_unified = SEQUENCES * CELLS, SEQUENCES, False
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = 2
        params.flash_attn_type = llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED
        return llama.llama_init_from_model(self.model, params)

    def tokens(self, text: str) -> list[int]:
        buffer = (self.llama.llama_token * 4096)()
        n = self.llama.llama_tokenize(self.vocab, text.encode(), len(text.encode()), buffer, 4096, True, False)
        return list(buffer[:n])

    def decode(self, context, items) -> list[np.ndarray]:
        """items: (sequence id, tokens, first position); returns the logits of each item's last token."""
        batch, n, rows = self.batch, 0, []
        for seq, tokens, start in items:
            for offset, token in enumerate(tokens):
                batch.token[n], batch.pos[n], batch.n_seq_id[n] = token, start + offset, 1
                batch.seq_id[n][0], batch.logits[n] = seq, int(offset == len(tokens) - 1)
                n += 1
            rows.append(n - 1)
        batch.n_tokens = n
        assert self.llama.llama_decode(context, batch) == 0
        return [np.ctypeslib.as_array(self.llama.llama_get_logits_ith(context, row), shape=(self.n_vocab,)).copy()
                for row in rows]


def logits_by_shape(probe: Probe) -> dict:
    prompt = probe.tokens("You are Captain Mara, a retired sailor who answers kindly and at length about ships. " * 16
                          + "What is the sea?")
    other = probe.tokens("You are a gardener who grows roses and talks about soil and rain. " * 14 + "What grows in June?")

    def run(chunk: int, beside: int | None) -> list[np.ndarray]:
        context = probe.context(flash=True)
        mine = theirs = 0
        while mine < len(prompt):
            items = [(0, prompt[mine:mine + chunk], mine)]
            if beside and theirs < len(other):
                items.append((1, other[theirs:theirs + beside], theirs))
            last = probe.decode(context, items)[0]
            mine += len(items[0][1])
            theirs += len(items[1][1]) if len(items) > 1 else 0
        steps, token = [last], int(np.argmax(last))
        while beside and theirs < len(other):
            probe.decode(context, [(1, other[theirs:theirs + beside], theirs)])
            theirs += len(other[theirs:theirs + beside])
        for _ in range(6):
            items = [(0, [token], mine)] + ([(1, [other[-1]], theirs)] if beside else [])
            steps.append(probe.decode(context, items)[0])
            mine, theirs, token = mine + 1, theirs + 1, int(np.argmax(steps[-1]))
        probe.llama.llama_free(context)
        return steps

    reference = run(48, None)
    found = {"prompt_tokens": len(prompt)}
    for name, chunk, beside in (("48 rows beside another sequence", 48, 48), ("32 rows alone", 32, None),
                                ("17 rows beside 30", 17, 30), ("64 rows alone", 64, None), ("256 rows alone", 256, None)):
        found[name] = [round(float(np.max(np.abs(a - b))), 3) for a, b in zip(reference, run(chunk, beside))]
    return found


def prefill_speed(probe: Probe) -> dict:
    prompt = probe.tokens("You are Captain Mara, a retired sailor who answers kindly and at length about ships. " * 60)[:1000]
    found = {}
    for chunk, flash in ((63, True), (64, True), (256, True), (512, True), (63, False), (512, False)):
        context = probe.context(flash)
        started = time.perf_counter()
        for start in range(0, len(prompt), chunk):
            probe.decode(context, [(0, prompt[start:start + chunk], start)])
        found[f"{chunk} rows, flash attention {'on' if flash else 'off'}"] = round(
            len(prompt) / (time.perf_counter() - started))
        probe.llama.llama_free(context)
    return found


def last_chunk_cost(probe: Probe, reps: int = 3) -> dict:
    """Median ms of a last chunk of `rows` rows evaluated row by row vs padded to PROMPT_CHUNK rows, at two depths."""
    text = " ".join(f"Fact {n}: the archivist remembers year {1700 + n} on shelf {n % 40} in the east wing."
                    for n in range(100))
    tokens = probe.tokens(text)
    memory = probe.llama.llama_get_memory
    found = {}
    for cells in (960, 1792):
        context = probe.context(flash=True)
        for start in range(0, cells, 512):
            probe.decode(context, [(0, tokens[start:min(cells, start + 512)], start)])

        def timed(size: int) -> float:
            spent = []
            for _ in range(reps):
                probe.llama.llama_memory_seq_rm(memory(context), 0, cells, -1)
                started = time.perf_counter()
                probe.decode(context, [(0, tokens[cells:cells + size], cells)])
                spent.append(time.perf_counter() - started)
            return round(sorted(spent)[len(spent) // 2] * 1000, 1)

        padded = timed(64)
        for rows in (8, 16, 24, 32, 40, 48):
            found[f"{rows} rows at {cells} cells: row by row / padded, ms"] = (timed(rows), padded)
        probe.llama.llama_free(context)
    return found


def main() -> None:
    probe = Probe()
    print(f"model file: {probe.path}")
    print("max |logit difference| against 48-row chunks alone (prompt's last token, then 6 decode steps):")
    for name, value in logits_by_shape(probe).items():
        print(f"  {name}: {value}")
    print("prompt evaluation, 1,000 tokens, tokens/s:")
    for name, value in prefill_speed(probe).items():
        print(f"  {name}: {value}")
    print("a prompt's last chunk (ROW_BY_ROW_TAIL):")
    for name, value in last_chunk_cost(probe).items():
        print(f"  {name}: {value}")


if __name__ == "__main__":
    main()
