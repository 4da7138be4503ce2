"""Idle prefill of W4's long prompt (~1,790 tokens), flash attention off and on, here and in llama-server.

Explains most of the W4 idle-prefill gap (docs/BENCHMARKS.md): llama-server's default `-fa auto`
turns flash attention on for CPU, while this engine keeps it off unless config.yaml sets
`flash_attention: true`. Each figure is the median of REPS fresh prompts (nothing cached), one at a
time on an otherwise idle server, with the same model file, slots, context and threads.

    .venv/bin/python -m bench.prefill_flash_attention
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import httpx

from bench.servers import MODEL, EngineShape
from bench.workloads import Sizes, long_prompt_messages
from chat.engine import ModelRegistry, ModelSpec, SamplingParams
from tests.live import free_port
from tests.llama_server import LlamaServer, find_llama_server

REPS = 3


def ours(shape: EngineShape, *, flash_attention: bool) -> tuple[float, int, list[str]]:
    spec = ModelSpec("bench", str(MODEL), context_length=shape.context_length, parallel=shape.parallel,
                     threads=shape.threads, flash_attention=flash_attention)
    registry = ModelRegistry([spec])
    try:
        engine = registry.get()
        engine.generate("warm up", SamplingParams(max_tokens=1))
        texts = [engine.render_chat(long_prompt_messages(Sizes())) for _ in range(REPS)]
        seconds = []
        for text in texts:
            started = time.perf_counter()
            engine.generate(text, SamplingParams(max_tokens=1, temperature=0))
            seconds.append(time.perf_counter() - started)
        return statistics.median(seconds), len(engine.prompt_tokens(texts[0])), texts
    finally:
        registry.close()


def llama_server(shape: EngineShape, texts: list[str], *, flash_attention: str, workdir: Path) -> tuple[float, int]:
    binary, missing = find_llama_server()
    if binary is None:
        raise SystemExit(missing)
    server = LlamaServer(binary, MODEL, port=free_port(), log_path=workdir / f"llama-server-fa-{flash_attention}.log",
                         context=shape.parallel * shape.context_length, parallel=shape.parallel,
                         threads=shape.threads, extra=("--flash-attn", flash_attention))
    server.start()
    try:
        server.wait_until_ready()
        httpx.post(server.url + "/completion", json={"prompt": "warm up", "n_predict": 1}, timeout=120)
        seconds, tokens = [], 0
        for text in texts:
            started = time.perf_counter()
            reply = httpx.post(server.url + "/completion", json={"prompt": text, "n_predict": 1, "cache_prompt": False},
                               timeout=300).json()
            seconds.append(time.perf_counter() - started)
            tokens = reply["timings"]["prompt_n"]
        return statistics.median(seconds), tokens
    finally:
        server.stop()


def main() -> None:
    shape = EngineShape.from_config()
    rows = []
    with tempfile.TemporaryDirectory() as workdir:
        for flash_attention in (False, True):
            seconds, tokens, texts = ours(shape, flash_attention=flash_attention)
            rows.append((f"this engine, flash_attention: {str(flash_attention).lower()}", seconds, tokens))
        for mode in ("off", "auto"):
            seconds, tokens = llama_server(shape, texts, flash_attention=mode, workdir=Path(workdir))
            rows.append((f"llama-server -fa {mode}", seconds, tokens))
    print(f"Idle prefill of W4's long prompt, median of {REPS} ({dataclasses.asdict(shape)}):")
    for label, seconds, tokens in rows:
        print(f"  {label:40s} {seconds:6.2f} s  {tokens} tokens  {tokens / seconds:5.0f} tok/s")


if __name__ == "__main__":
    main()
