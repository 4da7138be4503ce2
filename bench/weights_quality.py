"""What `weights` (config.yaml) costs and gives: the shipped file against copies of it re-quantized to other
types, on the same text and the same bare llama.cpp loops.

    .venv/bin/python -m bench.weights_quality                 # Q8_0, Q4_0, Q5_0, IQ4_NL; about 3 minutes
    .venv/bin/python -m bench.weights_quality --types q8_0 --reps 5
    .venv/bin/python -m bench.weights_quality --types q8_0 --amx  # each file also in the AMX layout

Quality: every next-token distribution over a fixed text (this project's README and docs/ARCHITECTURE.md, the
first 2,000 tokens) from the file and from each copy: mean and p99 KL divergence from the file's, how often the
most likely token is the same, and perplexity. Speed: bare decode tokens/s with 1, 4 and 8 sequences and prompt
evaluation of 500 tokens, flash attention on as in the engine, interleaved, medians.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import numpy as np

from bench.engine_bench import BareLlama, counting_prompt
from bench.servers import MODEL, ROOT

TEXT_FILES = ("README.md", "docs/ARCHITECTURE.md")
TEXT_TOKENS = 2000


def copy_of(model: Path, weights: str) -> Path:
    """The engine's own copy (chat/engine/backends/weights.py), made once."""
    from chat.engine.backends.llama_cpp import _llama
    from chat.engine.backends.weights import weights_path
    from chat.engine.types import ModelSpec

    return Path(weights_path(_llama(), ModelSpec(name="bench", path=str(model), weights=weights)))


def all_logits(bare: BareLlama, tokens: list[int]) -> np.ndarray:
    rows = []
    n_vocab = bare.llama.llama_vocab_n_tokens(bare.vocab)
    bare.llama.llama_memory_seq_rm(bare.memory, 0, -1, -1)
    for start in range(0, len(tokens), 512):
        chunk = tokens[start:start + 512]
        bare._decode([(token, start + i, 0, True) for i, token in enumerate(chunk)])
        logits = np.ctypeslib.as_array(bare.llama.llama_get_logits(bare.ctx), shape=(len(chunk), n_vocab))
        rows.append(logits.astype(np.float64))
    return np.concatenate(rows)


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def quality(reference: np.ndarray, other: np.ndarray, tokens: list[int]) -> dict[str, float]:
    log_p, log_q = log_softmax(reference), log_softmax(other)
    kl = (np.exp(log_p) * (log_p - log_q)).sum(axis=1)
    targets = np.arange(len(tokens) - 1), tokens[1:]
    return {"kl_mean": float(kl.mean()), "kl_p99": float(np.percentile(kl, 99)),
            "top1_same": float((reference.argmax(1) == other.argmax(1)).mean()),
            "perplexity": float(np.exp(-log_q[targets].mean()))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--types", default="q8_0,q4_0,q5_0,iq4_nl", help="comma-separated weight types")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--amx", action="store_true",
                        help="also each file repacked for AMX (a CPU with AMX and a build that passes its probe)")
    args = parser.parse_args()
    files = {"as shipped": MODEL, **{kind: copy_of(MODEL, kind) for kind in args.types.split(",") if kind}}
    if args.amx:
        files.update({f"{name}, AMX": path for name, path in list(files.items())})
    # The reference and the copies in the plain layout; "..., AMX" repacked (chat/engine/backends/amx.py).
    bares = {name: BareLlama(path, n_seq=8, n_ctx_per_seq=2048, flash_attention=True, repack=name.endswith(", AMX"))
             for name, path in files.items()}
    shipped = bares["as shipped"]
    text = "\n".join((ROOT / name).read_text() for name in TEXT_FILES)
    tokens = shipped.tokenize(text)[:TEXT_TOKENS]
    reference = all_logits(shipped, tokens)
    scores = {name: quality(reference, all_logits(bare, tokens), tokens) for name, bare in bares.items()}
    prompts = [shipped.tokenize(counting_prompt(i)) for i in range(8)]
    long_prompt = shipped.tokenize(" ".join(str(n) for n in range(1, 400)))[:500]
    speeds: dict[str, dict[str, list[float]]] = {}
    for _ in range(args.reps):
        for name, bare in bares.items():  # interleaved, so that noise hits all alike
            figures = speeds.setdefault(name, {"decode_1": [], "decode_4": [], "decode_8": [], "prefill": []})
            for count in (1, 4, 8):
                figures[f"decode_{count}"].append(bare.decode_rate(prompts[:count], 48))
            figures["prefill"].append(bare.prefill_rate(long_prompt))
    print(f"{len(tokens)} tokens of text; speeds: medians of {args.reps}, tokens/s (ratio to the file as shipped)")
    print("| weights | MB | KL mean / p99 | top token same | perplexity | decode 1 / 4 / 8 sequences | prompt (500) |")
    print("|---|---:|---|---:|---:|---|---:|")
    base = {key: statistics.median(values) for key, values in speeds["as shipped"].items()}
    for name, path in files.items():
        s, q = {key: statistics.median(values) for key, values in speeds[name].items()}, scores[name]
        decode = " / ".join(f"{s[f'decode_{c}']:.0f} ({s[f'decode_{c}'] / base[f'decode_{c}']:.2f}x)" for c in (1, 4, 8))
        print(f"| {name} | {path.stat().st_size / 1e6:.0f} | {q['kl_mean']:.4f} / {q['kl_p99']:.3f} | "
              f"{q['top1_same']:.1%} | {q['perplexity']:.2f} | {decode} | "
              f"{s['prefill']:.0f} ({s['prefill'] / base['prefill']:.2f}x) |")
    for bare in bares.values():
        bare.close()


if __name__ == "__main__":
    main()
