"""TTFT of a regenerate and of an edit on a ~1,500-token conversation, against a cold prompt of the same length.

A regenerate sends the old reply's prompt again (the path to its user message, docs/PROMPTS.md); an edit
changes the last user message. Both are measured right after the first reply, so the slot that served it
still holds its KV and prefix reuse can skip the shared history; a cold prompt is a different conversation
of the same length. SmolLM2, one engine in this process, median of REPS conversations.

    .venv/bin/python -m bench.regenerate_ttft
"""

from __future__ import annotations

import random
import statistics
import time

from bench.servers import MODEL
from chat.engine import ModelRegistry, ModelSpec, SamplingParams

REPS = 3
TARGET_TOKENS = 1500
WORDS = ("harbour storm sail rope lantern gull tide anchor compass deck mast keel chart reef island wind "
         "captain crew rum cargo fog bell starboard port lighthouse current wave cliff map treasure").split()


def conversation(engine, seed: int) -> list[dict]:
    """Alternating turns of varied words, about TARGET_TOKENS long, ending with a user message."""
    rng = random.Random(seed)
    messages = [{"role": "system", "content": f"Voyage log {seed}. You are Captain Mira, terse and kind."}]
    while True:
        for role in ("user", "assistant"):
            messages.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(40)) + "."})
        messages.append({"role": "user", "content": f"What now, captain? ({seed})"})
        if len(engine.prompt_tokens(engine.render_chat(messages))) >= TARGET_TOKENS:
            return messages
        messages.pop()


def ttft(engine, messages: list[dict], seed: int) -> float:
    started = time.perf_counter()
    generation = engine.submit(engine.render_chat(messages), SamplingParams(max_tokens=8, seed=seed))
    for delta in generation:
        if delta:
            seconds = time.perf_counter() - started
            generation.cancel()
            return seconds
    return time.perf_counter() - started


def main() -> None:
    spec = ModelSpec("bench", str(MODEL), context_length=2048, parallel=4)
    registry = ModelRegistry([spec])
    try:
        engine = registry.get()
        engine.generate("warm up", SamplingParams(max_tokens=1))
        cold, regenerate, edit, lengths = [], [], [], []
        for rep in range(REPS):
            messages = conversation(engine, seed=1000 + rep)
            lengths.append(len(engine.prompt_tokens(engine.render_chat(messages))))
            cold.append(ttft(engine, messages, seed=1))               # the first reply: nothing cached
            regenerate.append(ttft(engine, messages, seed=2))         # the same prompt, another seed
            edited = [*messages[:-1], {"role": "user", "content": "Where to, captain? Tell me."}]
            edit.append(ttft(engine, edited, seed=3))                 # the last user message changed
        stats = engine.stats()
        print(f"prompt tokens (median): {statistics.median(lengths):.0f}")
        for name, values in (("cold", cold), ("regenerate", regenerate), ("edit last message", edit)):
            print(f"{name:>18}: TTFT {statistics.median(values) * 1000:7.1f} ms   "
                  f"({', '.join(f'{v * 1000:.0f}' for v in values)})")
        print(f"engine: prefix hits {stats.get('prefix_hits')}, prompt tokens evaluated "
              f"{stats.get('prompt_tokens_evaluated')}, cached {stats.get('cached_prompt_tokens')}")
    finally:
        registry.close()


if __name__ == "__main__":
    main()
