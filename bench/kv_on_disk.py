"""TTFT of a ~1,700-token conversation resumed after a restart from its state on disk, against the cold prompt.

Per run: a fresh `state_dir`; the conversation's first reply (cold TTFT: nothing cached), its continuation while
the slot still holds it, a shutdown (the slot's state goes to disk), a new engine (a restart), and the same
continuation again (restored TTFT, prompt tokens evaluated). SmolLM2, one slot, median of RUNS runs.
The test (tests/chat/engine/test_state_store_engine.py) asserts the work and the reply; this measures the time.

    .venv/bin/python -m bench.kv_on_disk
"""

from __future__ import annotations

import statistics
import tempfile
import time

from bench.servers import MODEL
from chat.engine import ModelRegistry, ModelSpec, SamplingParams

RUNS = 3
SEEDED = SamplingParams(max_tokens=16, temperature=0.8, seed=26)
TOPIC = ("The harbour town kept a ledger of every ship that came in: its name, its captain, its cargo, the "
         "weather on the day it arrived and the tide it left on. ")


def reply_and_ttft(engine, prompt: str) -> tuple[str, float]:
    started, first, parts = time.perf_counter(), None, []
    for piece in engine.submit(prompt, SEEDED):
        if first is None:
            first = time.perf_counter() - started
        parts.append(piece)
    return "".join(parts), first


def one_run(run: int) -> dict:
    with tempfile.TemporaryDirectory() as states:
        spec = ModelSpec("kv", str(MODEL), context_length=2048, parallel=1, prefill_step_ms=0, state_dir=states,
                         state_cache_mb=512)
        opening = (f"<|im_start|>user\nLedger {run}. " + TOPIC * 50 + "Summarise the ledger.<|im_end|>\n"
                   "<|im_start|>assistant\n")
        registry = ModelRegistry([spec])
        try:
            engine = registry.get()
            reply, cold = reply_and_ttft(engine, opening)
            resumed = opening + reply + "<|im_end|>\n<|im_start|>user\nAnd the tides?<|im_end|>\n<|im_start|>assistant\n"
            in_memory, _ = reply_and_ttft(engine, resumed)
            cold_tokens = len(engine.prompt_tokens(opening))
        finally:
            registry.close()
        registry = ModelRegistry([spec])
        try:
            engine = registry.get()
            before = engine.stats()["prompt_tokens_evaluated"]
            restored_reply, restored = reply_and_ttft(engine, resumed)
            evaluated = engine.stats()["prompt_tokens_evaluated"] - before
            tokens = len(engine.prompt_tokens(resumed))
        finally:
            registry.close()
    result = {"cold_ttft": cold, "cold_tokens": cold_tokens, "restored_ttft": restored, "tokens": tokens,
              "evaluated": evaluated, "same_reply": restored_reply == in_memory}
    print(f"run {run + 1}: cold {cold * 1000:.0f} ms ({cold_tokens} tokens), restored {restored * 1000:.0f} ms "
          f"({restored / cold:.1%}), {evaluated} of {tokens} prompt tokens evaluated, same reply: "
          f"{result['same_reply']}", flush=True)
    return result


def main() -> None:
    runs = [one_run(run) for run in range(RUNS)]
    cold = statistics.median(run["cold_ttft"] for run in runs)
    restored = statistics.median(run["restored_ttft"] for run in runs)
    print(f"median of {RUNS}: cold TTFT {cold * 1000:.0f} ms, restored {restored * 1000:.0f} ms ({restored / cold:.1%})")


if __name__ == "__main__":
    main()
