"""Per-conversation KV on disk through the engine: restored after a restart (the real SmolLM2 model), found
beside other conversations in memory, read outside the scheduler thread, dropped when llama.cpp rejects it
(the tiny model)."""

from __future__ import annotations

import dataclasses
import struct
import threading
import time

import pytest

from chat.engine import ModelRegistry, ModelSpec, SamplingParams
from chat.engine.backends.llama_cpp import PROMPT_CHUNK
from chat.engine.state_store import StateStore

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


@pytest.mark.smollm2
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
    # TTFT is measured by bench/kv_on_disk.py (docs/BENCHMARKS.md), not asserted: the work it stands for is.
    # The last chunk (1-64 tokens) is always evaluated, as a cold prompt evaluates it.
    assert evaluated <= PROMPT_CHUNK


GREEDY = SamplingParams(max_tokens=4, temperature=0.0)
PERSONA = "<|im_start|>system\n" + "You are Mira, the harbour's record keeper. " * 12 + "<|im_end|>\n"


def turn(question: str, answer: str = "") -> str:
    return f"<|im_start|>user\n{question}<|im_end|>\n<|im_start|>assistant\n{answer}"


def tiny_spec(tiny_gguf, tmp_path, name="tiny-kv") -> ModelSpec:
    return ModelSpec(name, str(tiny_gguf), context_length=2048, parallel=1, prefill_step_ms=0,
                     state_dir=str(tmp_path / "states"), state_cache_mb=256)


def evaluated_for(engine, prompt: str) -> int:
    before = engine.stats()["prompt_tokens_evaluated"]
    assert "".join(engine.submit(prompt, GREEDY)) is not None
    return engine.stats()["prompt_tokens_evaluated"] - before


def conversation_on_disk(spec, prompt: str) -> None:
    """Run `prompt` in an engine, then shut it down: its slot's state goes to disk."""
    registry, engine = engine_in([spec])
    try:
        evaluated_for(engine, prompt)
    finally:
        registry.close()


def test_a_conversation_on_disk_is_restored_while_another_with_the_same_persona_is_in_memory(tiny_gguf, tmp_path):
    spec = tiny_spec(tiny_gguf, tmp_path)
    first = PERSONA + turn("Tell me about the ledger. " * 40, "It lists ships.<|im_end|>\n") + turn("And tides?")
    conversation_on_disk(spec, first)
    registry, engine = engine_in([spec])  # a restart
    try:
        assert len(engine.prompt_tokens(PERSONA)) >= 2 * PROMPT_CHUNK
        evaluated_for(engine, PERSONA + turn("Who are you?"))  # the same persona...
        evaluated_for(engine, turn("Something else entirely. " * 20))  # ...moved from its slot to the memory cache
        assert engine.stats()["prefix_cache_entries"] >= 1
        resumed = len(engine.prompt_tokens(first))
        evaluated = evaluated_for(engine, first)
    finally:
        registry.close()
    assert resumed > 6 * PROMPT_CHUNK
    assert evaluated <= PROMPT_CHUNK  # restored from disk, not from the persona on


def test_states_are_read_from_disk_in_the_requests_thread_never_the_schedulers(tiny_gguf, tmp_path, monkeypatch):
    spec = tiny_spec(tiny_gguf, tmp_path)
    conversation = PERSONA + turn("Tell me about the ledger. " * 40)
    conversation_on_disk(spec, conversation)
    readers = []
    original = StateStore._read
    monkeypatch.setattr(StateStore, "_read",
                        lambda store, path: (readers.append(threading.current_thread().name), original(store, path))[1])
    registry, engine = engine_in([spec])
    try:
        evaluated = evaluated_for(engine, conversation)
    finally:
        registry.close()
    assert readers and evaluated <= PROMPT_CHUNK  # it was read, and restored
    assert not [name for name in readers if name.startswith("engine-")]


def test_a_state_llama_cpp_rejects_is_removed_and_the_prompt_evaluated(tiny_gguf, tmp_path):
    spec = tiny_spec(tiny_gguf, tmp_path)
    conversation = PERSONA + turn("Tell me about the ledger. " * 40)
    registry, engine = engine_in([spec])
    try:
        tokens = engine.prompt_tokens(conversation)
        store = engine._backend._disk
        store.put(tokens[: 4 * PROMPT_CHUNK], b"\x01\x00\x00\x00" + bytes(12))  # whole file, checksum right: junk
        store.flush()
        assert len(store) == 1
        evaluated = evaluated_for(engine, conversation)
        assert len(store) == 0
    finally:
        registry.close()
    assert evaluated == len(tokens)
    assert not [path for path in (tmp_path / "states").glob("*.kv") if path.stat().st_size < 100]


def test_a_conversation_whose_slot_is_reclaimed_is_written_to_disk_and_restored_from_it(tiny_gguf, tmp_path):
    """No restart: the only slot goes to another conversation, memory keeps no saved states (prefix_cache_mb 0),
    so what brings the first conversation back is the file written when its slot was reclaimed."""
    spec = ModelSpec("tiny-reclaim", str(tiny_gguf), context_length=2048, parallel=1, prefill_step_ms=0,
                     prefix_cache_mb=0, state_dir=str(tmp_path / "states"), state_cache_mb=256)
    first = PERSONA + turn("Tell me about the ledger. " * 40)
    registry, engine = engine_in([spec])
    try:
        evaluated_for(engine, first)
        assert not list((tmp_path / "states").glob("*.kv"))  # nothing written while the slot holds it
        evaluated_for(engine, turn("Something else entirely. " * 30))  # takes the slot: the first is written
        engine._backend._disk.flush()
        assert list((tmp_path / "states").glob("*.kv"))
        resumed = len(engine.prompt_tokens(first))
        evaluated = evaluated_for(engine, first)
    finally:
        registry.close()
    assert resumed > 6 * PROMPT_CHUNK
    assert evaluated <= PROMPT_CHUNK  # restored from the file, not evaluated again


@pytest.mark.parametrize("parallel", [1, 3])  # one stream: the memory is cleared; more: the slot's own stream
def test_a_state_with_a_cell_beyond_its_prefix_is_removed_not_kept_failing(tiny_gguf, tmp_path, parallel):
    """llama.cpp takes a state whose cell was moved to the largest position (a damaged or hostile file with a
    right checksum); trimming to the prefix keeps that cell, and every later decode of the slot failed while the
    file stayed on disk. The restored sequence must end where its prefix ends, or the file goes."""
    spec = dataclasses.replace(tiny_spec(tiny_gguf, tmp_path), parallel=parallel)
    conversation = PERSONA + turn("Tell me about the ledger. " * 40)
    conversation_on_disk(spec, conversation)
    registry, engine = engine_in([spec])
    try:
        store = engine._backend._disk
        (path,) = (tmp_path / "states").glob("*.kv")
        saved = store._read(path)
        state = bytearray(saved.state)
        # llama.cpp's layout (pinned version): per cell its position, its count of sequences, the sequence.
        first_cells = struct.pack("<9i", 0, 1, 0, 1, 1, 0, 2, 1, 0)
        start = bytes(state).index(first_cells)
        struct.pack_into("<i", state, start + 5 * 12, 2**31 - 1)  # cell 5 now at the largest position
        store.put(saved.tokens, bytes(state))
        store.flush()
        tokens = engine.prompt_tokens(conversation)
        assert evaluated_for(engine, conversation) == len(tokens)  # evaluated, not restored
        assert evaluated_for(engine, conversation) <= PROMPT_CHUNK  # and the slot decodes again
        assert len(store) == 0 or store._read(path) is None or store._read(path).state != bytes(state)
    finally:
        registry.close()
