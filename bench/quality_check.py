"""Reference questions answered by two copies of a model (e.g. Q4_1 as shipped vs a Q4_0 re-quantization).

    .venv/bin/python -m bench.quality_check [--a models/X.Q4_1.gguf] [--b models/X.Q4_0.gguf]

Greedy answers must contain an expected word. Together with bench/engine_bench.py's speed figures
this decides whether `make run` should serve the faster copy (docs/BENCHMARKS.md records the call).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from chat.engine import ModelRegistry, ModelSpec, SamplingParams

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = [("What is the capital of France?", "paris"), ("What is 2 plus 2?", "4"),
             ("What color is the sky on a clear day?", "blue"), ("Which planet is known as the Red Planet?", "mars"),
             ("What is the largest ocean on Earth?", "pacific"), ("How many days are in a week?", "seven|7")]


def passed(answer: str, expected: str) -> bool:
    return any(word in answer.lower() for word in expected.split("|"))


def score(path: Path) -> tuple[int, list[str]]:
    engine = ModelRegistry([ModelSpec(name=path.stem, path=str(path))]).get()
    lines, correct = [], 0
    for question, expected in REFERENCE:
        answer = engine.generate(engine.render_chat([{"role": "user", "content": question}]),
                                 SamplingParams(max_tokens=32, temperature=0)).text
        ok = passed(answer, expected)
        correct += ok
        lines.append(f"  [{'x' if ok else ' '}] {question} -> {' '.join(answer.split())[:80]}")
    engine.close()
    return correct, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--a", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"))
    parser.add_argument("--b", default=str(ROOT / "models" / "SmolLM2-135M-Instruct.Q4_0.gguf"))
    args = parser.parse_args()
    for path in (Path(args.a), Path(args.b)):
        correct, lines = score(path)
        print(f"{path.name}: {correct}/{len(REFERENCE)} reference questions answered")
        print("\n".join(lines))


if __name__ == "__main__":
    main()
