"""Per-conversation KV on disk with the real SmolLM2 model: a long conversation resumed after a restart."""

from __future__ import annotations

import time

import pytest

from chat.engine import ModelRegistry, ModelSpec, SamplingParams

pytestmark = pytest.mark.smollm2

SEEDED = SamplingParams(max_tokens=16, temperature=0.8, seed=26)
TOPIC = ("The harbour town kept a ledger of every ship that came in: its name, its captain, its cargo, the "
         "weather on the day it arrived and the tide it left on. ")


def engine_in(registry_specs):
    registry = ModelRegistry(registry_specs)
    return registry, registry.get(registry_specs[0].name)


def reply_and_ttft(engine, prompt: str) -> tuple[str, float]:
    started = time.perf_counter()
    first = None
    parts = []
    for piece in engine.submit(prompt, SEEDED):
        if first is None:
            first = time.perf_counter() - started
        parts.append(piece)
    return "".join(parts), first


def test_a_1500_token_conversation_resumed_after_a_restart_is_restored_not_evaluated(tmp_path, smollm2_gguf, capsys):
    spec = ModelSpec("kv", str(smollm2_gguf), context_length=2048, parallel=1, prefill_step_ms=0,
                     state_dir=str(tmp_path / "states"), state_cache_mb=512)
    registry, engine = engine_in([spec])
    try:
        opening = "<|im_start|>user\n" + TOPIC * 50 + "Summarise the ledger.<|im_end|>\n<|im_start|>assistant\n"
        assert 1400 <= len(engine.prompt_tokens(opening)) <= 1900
        reply, cold_ttft = reply_and_ttft(engine, opening)
        resumed = opening + reply + "<|im_end|>\n<|im_start|>user\nAnd the tides?<|im_end|>\n<|im_start|>assistant\n"
        in_memory_reply, _ = reply_and_ttft(engine, resumed)  # the slot still holds the conversation
    finally:
        registry.close()  # shutdown: the slot's state goes to disk
    assert list((tmp_path / "states").glob("*.kv"))

    registry, engine = engine_in([spec])  # a restart: a new process would find the same files
    try:
        resumed_tokens = len(engine.prompt_tokens(resumed))
        before = engine.stats()["prompt_tokens_evaluated"]
        restored_reply, restored_ttft = reply_and_ttft(engine, resumed)
        evaluated = engine.stats()["prompt_tokens_evaluated"] - before
    finally:
        registry.close()
    with capsys.disabled():
        print(f"\nKV on disk: cold TTFT {cold_ttft * 1000:.0f} ms, restored after restart {restored_ttft * 1000:.0f} ms "
              f"({restored_ttft / cold_ttft:.1%}); {evaluated} of {resumed_tokens} prompt tokens "
              "evaluated")
    assert restored_reply == in_memory_reply
    assert evaluated <= 0.1 * resumed_tokens
