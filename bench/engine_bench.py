"""Engine benchmark: the scheduler against bare llama.cpp loops on the same model, side by side.

    .venv/bin/python -m bench.engine_bench [--model PATH] [--reps 7] [--tokens 64] [--json out.json] [--skip-formats]
    .venv/bin/python -m bench.engine_bench --kv-layout-only [--reps 3] [--tokens 16]   # KV layout / batch order only

Measures, in one run and interleaved so that machine noise hits every variant alike:
  * backend alone, one sequence: a bare low-level decode loop (and llama-cpp-python's high-level
    `Llama` for reference);
  * bare batched decode of 8 sequences with the low-level API: the ceiling for the scheduler;
  * the engine's scheduler with 1, 2, 4 and 8 concurrent requests (aggregate decode tokens/s), the
    requests submitted in a scrambled order so that, as in real traffic, they land on scattered slots;
  * KV layout: one decode step of bare llama.cpp with a split (per-sequence) or unified KV cache,
    sequences in id order, shuffled, or on scattered (non-consecutive) ids;
  * time to first token with a ~1,000-token shared prefix: cold, reused from an idle slot's KV
    cells, and restored from the saved-state prefix cache.
Decode rates exclude prompt evaluation in every variant: bare loops time decode steps only; for the
scheduler the window starts when every request has received its first token. All variants decode
greedily with the same llama.cpp sampler chain (top-k 40, greedy) on raw prompts that the model
continues by counting, so that no sequence stops early.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

from chat.engine import ModelRegistry, ModelSpec, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"
THREADS = os.cpu_count() or 1
GREEDY_TOP_K = 40  # what the engine's greedy chain uses
# Submission order of the scheduler runs: prompt i reuses the slot that last held it, so a subset in this
# order lands on non-consecutive slots in non-increasing order, as after a while of real traffic.
SCATTERED = [5, 2, 7, 0, 3, 6, 1, 4]
# Slot layouts of the KV-layout comparison: (name, seq ids in batch order).
LAYOUTS = [
    ("8 seqs, ids in order", [0, 1, 2, 3, 4, 5, 6, 7]),
    ("8 seqs, ids shuffled", [3, 6, 0, 5, 2, 7, 1, 4]),
    ("4 seqs, consecutive ids", [0, 1, 2, 3]),
    ("4 seqs, scattered ids (sorted)", [0, 2, 5, 7]),
]


def counting_prompt(index: int) -> str:
    """A raw (non-chat) prompt that the model continues by counting: no sequence stops early."""
    start = 1 + 100 * index
    return ", ".join(str(n) for n in range(start, start + 12)) + ","


# -- bare llama.cpp loops (no engine) ------------------------------------------------------------


class BareLlama:
    """The minimum a caller of the low-level API must do: one context, a batch, a sampler chain per sequence."""

    def __init__(self, model_path: Path, n_seq: int, n_ctx_per_seq: int = 512, kv_unified: bool = False,
                 flash_attention: bool = False, repack: bool | None = None):
        import llama_cpp as llama

        from chat.engine.backends.llama_cpp import _llama, model_params_for
        from chat.engine.types import ModelSpec

        _llama()  # same process-wide init and quiet logging as the engine
        self.llama = llama
        model_params = model_params_for(llama, ModelSpec(name="bench", path=str(model_path)), str(model_path))  # the engine's layout
        if repack is not None:  # e.g. the plain layout against the AMX one (bench.weights_quality --amx)
            model_params.use_extra_bufts = repack
        self.model = llama.llama_model_load_from_file(os.fsencode(model_path), model_params)
        params = llama.llama_context_default_params()
        params.n_ctx = n_seq * n_ctx_per_seq
        params.n_seq_max = n_seq
        params.kv_unified = kv_unified
        params.n_batch = params.n_ubatch = 512
        params.n_threads = params.n_threads_batch = THREADS
        params.no_perf = True
        params.flash_attn_type = (llama.LLAMA_FLASH_ATTN_TYPE_ENABLED if flash_attention  # the engine's default
                                  else llama.LLAMA_FLASH_ATTN_TYPE_DISABLED)
        self.ctx = llama.llama_init_from_model(self.model, params)
        self.vocab = llama.llama_model_get_vocab(self.model)
        self.memory = llama.llama_get_memory(self.ctx)
        self.batch = llama.llama_batch_init(512, 0, 1)
        self.decode_seconds = 0.0
        self.last_outside_decode = 0.0  # share of the last timed loop spent outside llama_decode

    def tokenize(self, text: str) -> list[int]:
        data = text.encode()
        buffer = (self.llama.llama_token * (len(data) + 8))()
        count = self.llama.llama_tokenize(self.vocab, data, len(data), buffer, len(buffer), False, True)
        return buffer[:count]

    def _decode(self, items):
        batch = self.batch
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        started = time.perf_counter()
        assert self.llama.llama_decode(self.ctx, batch) == 0
        self.decode_seconds += time.perf_counter() - started

    def _greedy_chain(self):
        llama = self.llama
        chain = llama.llama_sampler_chain_init(llama.llama_sampler_chain_default_params())
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_top_k(GREEDY_TOP_K))
        llama.llama_sampler_chain_add(chain, llama.llama_sampler_init_greedy())
        return chain

    def decode_rate(self, prompts: list[list[int]], n_tokens: int) -> float:
        """Aggregate decode tokens/s of len(prompts) sequences decoded together (prompt evaluation untimed)."""
        llama = self.llama
        n = len(prompts)
        for seq in range(n):
            llama.llama_memory_seq_rm(self.memory, seq, -1, -1)
        items, logits_index = [], []
        for seq, prompt in enumerate(prompts):
            items += [(t, i, seq, i == len(prompt) - 1) for i, t in enumerate(prompt)]
            logits_index.append(len(items) - 1)
        self._decode(items)
        chains = [self._greedy_chain() for _ in prompts]
        positions = [len(p) for p in prompts]
        started = time.perf_counter()
        self.decode_seconds = 0.0
        for _ in range(n_tokens):
            tokens = [llama.llama_sampler_sample(chains[s], self.ctx, logits_index[s]) for s in range(n)]
            self._decode([(tokens[s], positions[s], s, True) for s in range(n)])
            positions = [p + 1 for p in positions]
            logits_index = list(range(n))
        elapsed = time.perf_counter() - started
        self.last_outside_decode = 1 - self.decode_seconds / elapsed
        for chain in chains:
            llama.llama_sampler_free(chain)
        return n * n_tokens / elapsed

    def step_seconds(self, prompt: list[int], seq_ids: list[int], n_steps: int) -> float:
        """Median time of one decode step (one token per sequence) with the sequences at `seq_ids`, in that batch order."""
        llama = self.llama
        for seq in range(8):
            llama.llama_memory_seq_rm(self.memory, seq, -1, -1)
        for seq in seq_ids:
            self._decode([(t, i, seq, False) for i, t in enumerate(prompt)])
        times, token = [], prompt[-1]
        for step in range(n_steps):
            started = time.perf_counter()
            self._decode([(token, len(prompt) + step, seq, True) for seq in seq_ids])
            times.append(time.perf_counter() - started)
        return statistics.median(times)

    def prefill_rate(self, prompt: list[int]) -> float:
        """Prompt evaluation tokens/s of one sequence (in chunks of 512)."""
        self.llama.llama_memory_seq_rm(self.memory, 0, -1, -1)
        started = time.perf_counter()
        for start in range(0, len(prompt), 512):
            chunk = prompt[start : start + 512]
            self._decode([(t, start + i, 0, start + i == len(prompt) - 1) for i, t in enumerate(chunk)])
        return len(prompt) / (time.perf_counter() - started)

    def close(self):
        self.llama.llama_batch_free(self.batch)
        self.llama.llama_free(self.ctx)
        self.llama.llama_model_free(self.model)


def high_level_rate(llm, prompt: str, n_tokens: int) -> float:
    """llama-cpp-python's high-level Llama, one sequence, decode only (first token excluded)."""
    times = []
    for _ in llm.create_completion(prompt, max_tokens=n_tokens, temperature=0, top_k=GREEDY_TOP_K,
                                   repeat_penalty=1.0, stream=True):
        times.append(time.perf_counter())
    return (len(times) - 1) / (times[-1] - times[0])


# -- the engine ----------------------------------------------------------------------------------


def scheduler_rate(engine, n_requests: int, n_tokens: int) -> tuple[float, list[int], float]:
    """Aggregate decode tokens/s of n concurrent requests, from when all have their first token.

    The prompts are submitted in SCATTERED order (they land on scattered slots). Also returns the share
    of the scheduler thread's busy time spent outside llama_decode.
    """
    params = SamplingParams(max_tokens=n_tokens, temperature=0, repetition_penalty=1.0)
    before = engine.stats()
    generations = [engine.submit(counting_prompt(i), params) for i in SCATTERED[:n_requests]]
    stamps: list[list[float]] = [[] for _ in generations]

    def consume(index):
        for _ in generations[index]:
            stamps[index].append(time.perf_counter())

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(n_requests)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    window_start = max(s[0] for s in stamps)
    window_end = max(s[-1] for s in stamps)
    tokens = sum(sum(1 for t in s if t > window_start) for s in stamps)
    after = engine.stats()
    busy = after["busy_seconds"] - before["busy_seconds"]
    outside_decode = 1 - (after["decode_seconds"] - before["decode_seconds"]) / busy
    return tokens / (window_end - window_start), [g.result.completion_tokens for g in generations], outside_decode


def time_to_first_token(engine, prompt: str) -> tuple[float, int]:
    started = time.perf_counter()
    generation = engine.submit(prompt, SamplingParams(max_tokens=2, temperature=0))
    stream = iter(generation)
    next(stream)
    elapsed = time.perf_counter() - started
    for _ in stream:
        pass
    return elapsed, generation.result.cached_prompt_tokens


def character_prefix(engine, session: int, target_tokens: int = 1000) -> str:
    """A ~1,000-token system prompt, unique per session so that a cold run shares nothing cached."""
    text = f"Session {session}. You are Captain Mara Ellison, a retired sailor from the northern isles. "
    facts = [
        "She sailed for forty years on merchant ships and fishing boats.",
        "She tells stories about storms, lighthouses, whales and old harbours.",
        "She speaks kindly, briefly, and never uses modern slang.",
        "She keeps a journal of every port she visited and the people she met there.",
        "She distrusts steam engines but admires a well-trimmed sail.",
    ]
    i = 0
    while engine.count_tokens(text) < target_tokens:
        text += f"Fact {i}: {facts[i % len(facts)]} "
        i += 1
    return text


def ttft_runs(engine, single_slot_engine, reps: int) -> dict[str, list[float]]:
    results = {"cold": [], "reused_idle_slot": [], "restored_saved_state": [], "prefix_tokens": []}
    for rep in range(reps):
        prefix = character_prefix(engine, session=1000 + rep)
        ask = lambda question: engine.render_chat(  # noqa: E731
            [{"role": "system", "content": prefix}, {"role": "user", "content": question}]
        )
        cold, cached = time_to_first_token(engine, ask("Who are you?"))
        assert cached < 50, cached  # nothing of this session's prefix was cached
        warm, cached = time_to_first_token(engine, ask("Where did you sail?"))
        results["cold"].append(cold)
        results["reused_idle_slot"].append(warm)
        results["prefix_tokens"].append(cached)

        # One slot: another character evicts this one into the saved-state cache, then it comes back.
        other = character_prefix(engine, session=2000 + rep, target_tokens=300)
        single_ask = lambda system, question: single_slot_engine.render_chat(  # noqa: E731
            [{"role": "system", "content": system}, {"role": "user", "content": question}]
        )
        time_to_first_token(single_slot_engine, single_ask(prefix, "Who are you?"))
        time_to_first_token(single_slot_engine, single_ask(other, "Hello"))
        restored, cached = time_to_first_token(single_slot_engine, single_ask(prefix, "What do you fear?"))
        assert cached > 900, cached
        results["restored_saved_state"].append(restored)
    return results


def weight_format_comparison(q4_1: Path, reps: int, n_tokens: int) -> dict[str, dict[str, float]]:
    """The same model as Q4_1 and re-quantized to Q4_0 (which has repacked CPU kernels): bare decode and prefill."""
    from chat.engine.quantize import quantize_model

    q4_0 = q4_1.with_name(q4_1.name.replace("Q4_1", "Q4_0")) if "Q4_1" in q4_1.name else q4_1.with_suffix(".q4_0.gguf")
    if not q4_0.exists():
        quantize_model(q4_1, q4_0, "q4_0")
    results = {}
    bares = {name: BareLlama(path, n_seq=8, n_ctx_per_seq=1024) for name, path in (("Q4_1", q4_1), ("Q4_0", q4_0))}
    prompts = [bares["Q4_1"].tokenize(counting_prompt(i)) for i in range(8)]
    long_prompt = bares["Q4_1"].tokenize(" ".join(str(n) for n in range(1, 400)))[:500]
    for _ in range(reps):
        for name, bare in bares.items():  # interleaved, so that noise hits both alike
            figures = results.setdefault(name, {"decode_1": [], "decode_8": [], "prefill": []})
            figures["decode_1"].append(bare.decode_rate(prompts[:1], n_tokens))
            figures["decode_8"].append(bare.decode_rate(prompts, n_tokens))
            figures["prefill"].append(bare.prefill_rate(long_prompt))
    for bare in bares.values():
        bare.close()
    return {name: {k: median(v) for k, v in figures.items()} for name, figures in results.items()}


def kv_layout_comparison(model: Path, reps: int, n_steps: int) -> dict[str, dict[str, float]]:
    """Median decode-step seconds per KV cache kind and slot layout, interleaved so that noise hits all alike."""
    contexts = {"split": BareLlama(model, n_seq=8, kv_unified=False), "unified": BareLlama(model, n_seq=8, kv_unified=True)}
    prompt = contexts["split"].tokenize(counting_prompt(0))
    times: dict[str, dict[str, list[float]]] = {kind: {name: [] for name, _ in LAYOUTS} for kind in contexts}
    for _ in range(reps):
        for name, seq_ids in LAYOUTS:
            for kind, bare in contexts.items():
                times[kind][name].append(bare.step_seconds(prompt, seq_ids, n_steps))
    for bare in contexts.values():
        bare.close()
    return {kind: {name: median(values) for name, values in by_layout.items()} for kind, by_layout in times.items()}


def print_kv_layouts(layouts: dict[str, dict[str, float]]) -> None:
    print()
    print(f"{'decode step (ms), KV cache:':<34} {'split':>8} {'unified':>8}")
    for name, _ in LAYOUTS:
        print(f"{name:<34} {layouts['split'][name] * 1000:>8.1f} {layouts['unified'][name] * 1000:>8.1f}")


def median(values):
    return statistics.median(values)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--tokens", type=int, default=64, help="decode steps per sequence")
    parser.add_argument("--json", help="also write the raw figures here")
    parser.add_argument("--skip-formats", action="store_true", help="skip the Q4_1 vs Q4_0 comparison")
    parser.add_argument("--kv-layout-only", action="store_true", help="only the KV layout / batch order comparison")
    args = parser.parse_args(argv)
    model = Path(args.model)
    if args.kv_layout_only:
        print(f"model {model.name}, {THREADS} threads, {args.reps} interleaved repetitions of {args.tokens} steps")
        print_kv_layouts(kv_layout_comparison(model, args.reps, args.tokens))
        return

    registry = ModelRegistry([
        ModelSpec("bench", str(model), context_length=2048, parallel=8),
        ModelSpec("bench-1slot", str(model), context_length=2048, parallel=1),
    ])
    engine = registry.get("bench")
    single_slot = registry.get("bench-1slot")
    # The bare loops use the engine's context configuration (8 sequences x 2,048 cells), so that the
    # comparison isolates what the scheduler adds.
    bare1 = bare8 = BareLlama(model, n_seq=8, n_ctx_per_seq=2048)
    from llama_cpp import Llama

    high_level = Llama(str(model), n_ctx=512, n_threads=THREADS, n_threads_batch=THREADS, verbose=False)

    prompts = [bare1.tokenize(counting_prompt(i)) for i in range(8)]
    rates: dict[str, list[float]] = {k: [] for k in ("bare_1", "high_level_1", "bare_8", "sched_1", "sched_2", "sched_4", "sched_8")}
    completion_counts = {}
    outside: dict[str, list[float]] = {"bare_1": [], "sched_1": [], "bare_8": []}
    print(f"model {model.name}, {THREADS} threads, {args.tokens} decode steps per sequence, {args.reps} repetitions")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    scheduler_rate(engine, 1, 8)  # warm-up
    for rep in range(args.reps):
        # Each scheduler run right after the bare run it is compared with: noise on this machine
        # changes within seconds, so the paired ratio is steadier than a ratio of medians.
        rates["bare_1"].append(bare1.decode_rate(prompts[:1], args.tokens))
        outside["bare_1"].append(bare1.last_outside_decode)
        rate, _, share = scheduler_rate(engine, 1, args.tokens)
        rates["sched_1"].append(rate)
        outside["sched_1"].append(share)
        rates["bare_8"].append(bare8.decode_rate(prompts, args.tokens))
        outside["bare_8"].append(bare8.last_outside_decode)
        for n in (8, 2, 4):
            rate, counts, share = scheduler_rate(engine, n, args.tokens)
            rates[f"sched_{n}"].append(rate)
            outside.setdefault(f"sched_{n}", []).append(share)
            completion_counts[n] = counts
        rates["high_level_1"].append(high_level_rate(high_level, counting_prompt(0), args.tokens))
        print(f"  repetition {rep + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items()), flush=True)
    ttft = ttft_runs(engine, single_slot, args.reps)
    bare8.close()
    del high_level
    registry.close()

    load_after = os.getloadavg()
    m = {k: median(v) for k, v in rates.items()}
    paired = {
        n: median([s / b for s, b in zip(rates[f"sched_{n}"], rates[f"bare_{n}"])]) for n in (1, 8)
    }
    t = {k: median(v) for k, v in ttft.items()}
    rows = [
        ("backend alone, 1 seq (bare low-level loop)", f"{m['bare_1']:.1f} tok/s", ""),
        ("llama-cpp-python high-level Llama, 1 seq", f"{m['high_level_1']:.1f} tok/s", f"{m['high_level_1'] / m['bare_1']:.2f}x bare"),
        ("bare batched decode, 8 seqs (ceiling)", f"{m['bare_8']:.1f} tok/s", f"{m['bare_8'] / m['bare_1']:.2f}x bare 1"),
    ] + [
        (f"scheduler, {n} concurrent", f"{m[f'sched_{n}']:.1f} tok/s",
         f"{m[f'sched_{n}'] / m['bare_1']:.2f}x bare 1"
         + (f", paired {paired[1]:.1%} of bare 1" if n == 1 else "")
         + (f", paired {paired[8]:.1%} of ceiling" if n == 8 else ""))
        for n in (1, 2, 4, 8)
    ] + [
        (f"TTFT cold, {t['prefix_tokens']:.0f}-token prefix", f"{t['cold'] * 1000:.0f} ms", ""),
        ("TTFT reused (idle slot KV)", f"{t['reused_idle_slot'] * 1000:.0f} ms", f"{t['reused_idle_slot'] / t['cold']:.1%} of cold"),
        ("TTFT reused (restored saved state)", f"{t['restored_saved_state'] * 1000:.0f} ms", f"{t['restored_saved_state'] / t['cold']:.1%} of cold"),
    ]
    o = {k: median(v) for k, v in outside.items()}
    rows += [
        ("time outside llama_decode, 1 seq", f"{o['sched_1']:.1%}", f"bare loop {o['bare_1']:.1%}"),
        ("time outside llama_decode, 8 seqs", f"{o['sched_8']:.1%}", f"bare loop {o['bare_8']:.1%}"),
    ]
    width = max(len(r[0]) for r in rows)
    print()
    print(f"{'what'.ljust(width)}  {'median':>14}  ratio")
    for name, value, ratio in rows:
        print(f"{name.ljust(width)}  {value:>14}  {ratio}")
    targets = [
        ("scheduler 1 seq within 5% of backend alone (median paired ratio)", paired[1] >= 0.95, f"{paired[1]:.1%}"),
        ("scheduler 8 seqs on scattered slots >= 90% of bare ceiling (median paired ratio)", paired[8] >= 0.90, f"{paired[8]:.1%}"),
        ("reused-prefix TTFT < 10% of cold (idle slot)", t["reused_idle_slot"] < 0.10 * t["cold"], f"{t['reused_idle_slot'] / t['cold']:.1%}"),
        ("reused-prefix TTFT < 10% of cold (saved state)", t["restored_saved_state"] < 0.10 * t["cold"], f"{t['restored_saved_state'] / t['cold']:.1%}"),
    ]
    print()
    for name, met, value in targets:
        print(f"{'MET    ' if met else 'NOT MET'}  {name}: {value}")
    print(f"completion tokens per request in the last scheduler runs: {completion_counts}")
    print(f"load average after: {' '.join(f'{x:.2f}' for x in load_after)}")

    layouts = kv_layout_comparison(model, args.reps, args.tokens)
    print_kv_layouts(layouts)

    formats = {}
    if not args.skip_formats:
        formats = weight_format_comparison(model, args.reps, args.tokens)
        print()
        print("weight format (bare low-level loops)   decode 1 seq   decode 8 seqs   prefill")
        for name, f in formats.items():
            print(f"{name:<38} {f['decode_1']:>8.1f} tok/s {f['decode_8']:>9.1f} tok/s {f['prefill']:>7.0f} tok/s")
        if {"Q4_0", "Q4_1"} <= formats.keys():
            ratio = {k: formats["Q4_0"][k] / formats["Q4_1"][k] for k in formats["Q4_0"]}
            print(f"{'Q4_0 / Q4_1':<38} {ratio['decode_1']:>8.2f}x      {ratio['decode_8']:>9.2f}x      {ratio['prefill']:>7.2f}x")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {"rates": rates, "paired": paired, "outside_decode": outside, "ttft": ttft, "medians": m, "ttft_medians": t, "formats": formats,
                 "kv_layouts": layouts},
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
