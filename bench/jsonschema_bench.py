"""JSONSchemaBench (Geng et al. 2025) through the API: this project next to llama.cpp's llama-server.

    .venv/bin/python -m bench.jsonschema_bench PATH/TO/jsonschemabench [--per-dataset 12] [--json out.json]

PATH is a checkout of github.com/guidance-ai/jsonschemabench (its data/<dataset>/*.json, or that data/
folder itself); nothing of it is copied here. A fixed sample (seeded) of each data set is sent to both
servers, a few requests at a time, each asking SmolLM2 for JSON under `response_format` json_schema with
`max_tokens` 400. Per server it reports the share of schemas compiled (not refused), of replies that
validate (jsonschema, with format checks), that break their schema, that are not JSON, that were cut by
`max_tokens`, and the keywords named in refusals.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema

from bench.servers import EngineShape, start_llama_server, start_ours
from bench.streams import MODEL_NAME

DATASETS = ("Glaiveai2K", "Github_trivial", "Github_easy", "Github_medium", "Github_hard", "Snowplow",
            "Kubernetes", "WashingtonPost", "JsonSchemaStore", "Github_ultra")
PROMPT = "Reply with JSON that matches this JSON Schema:\n{schema}"
SCHEMA_CHARS_IN_PROMPT = 1200
OUTCOMES = ("valid", "invalid", "not_json", "cut", "refused", "error")


def load_sample(root: Path, datasets: list[str], per_dataset: int, seed: int) -> list[tuple[str, str, dict]]:
    """(dataset, file name, schema) for a fixed sample of each data set; schemas jsonschema rejects are skipped."""
    data = root / "data" if (root / "data").is_dir() else root
    sample = []
    for dataset in datasets:
        files = sorted((data / dataset).glob("*.json"))
        random.Random(f"{seed}-{dataset}").shuffle(files)
        taken = 0
        for path in files:
            if taken == per_dataset:
                break
            try:
                schema = json.loads(path.read_text())
                jsonschema.validators.validator_for(schema).check_schema(schema)
            except Exception:  # unreadable, or not a valid schema: not a fair test of either server
                continue
            sample.append((dataset, path.name, schema))
            taken += 1
    return sample


def judge(schema: dict, status: int, body: dict) -> tuple[str, str]:
    """(outcome, detail): the refusal's keyword, or the validation error."""
    if status == 400:
        message = body.get("error", {}).get("message", "")
        keyword = re.search(r"keyword '([^']+)'", message)
        return "refused", keyword.group(1) if keyword else message[:80]
    if status != 200:
        return "error", f"{status}: {json.dumps(body)[:120]}"
    choice = body["choices"][0]
    if choice.get("finish_reason") == "length":
        return "cut", ""
    text = choice["message"].get("content") or ""
    try:
        value = json.loads(text)
    except ValueError:
        return "not_json", text[:120]
    cls = jsonschema.validators.validator_for(schema)
    validator = cls(schema, format_checker=cls.FORMAT_CHECKER)  # the formats of the schema's own draft
    error = jsonschema.exceptions.best_match(validator.iter_errors(value))
    return ("valid", "") if error is None else ("invalid", error.message[:120])


def run(url: str, headers: dict, sample, *, max_tokens: int, concurrency: int, progress: Path | None = None) -> list[dict]:
    def one(index_item):
        index, (dataset, name, schema) = index_item
        text = json.dumps(schema, separators=(",", ":"))[:SCHEMA_CHARS_IN_PROMPT]
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPT.format(schema=text)}],
                "max_tokens": max_tokens, "temperature": 1.0, "seed": index,
                "response_format": {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}}
        started = time.monotonic()
        try:
            response = httpx.post(url + "/v1/chat/completions", json=body, headers=headers, timeout=600)
            status, reply = response.status_code, response.json()
        except (httpx.HTTPError, ValueError) as exc:
            status, reply = 0, {"error": repr(exc)}
        outcome, detail = judge(schema, status, reply)
        row = {"dataset": dataset, "file": name, "outcome": outcome, "detail": detail,
               "seconds": round(time.monotonic() - started, 2)}
        if progress is not None:  # one line per reply as it comes: a long run that is stopped keeps its results
            with progress.open("a") as out:
                out.write(json.dumps(row) + "\n")
        return row

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        return list(pool.map(one, enumerate(sample)))


def summary(results: list[dict]) -> dict:
    counts = Counter(r["outcome"] for r in results)
    total = len(results)
    return {"total": total, **{k: counts[k] for k in OUTCOMES},
            "compiled_share": round(1 - counts["refused"] / total, 3) if total else 0,
            "refused_keywords": dict(Counter(r["detail"] for r in results if r["outcome"] == "refused"))}


def table(summaries: dict) -> str:
    lines = ["| server | schemas | compiled | valid | break schema | not JSON | cut by length | refused (keywords) |",
             "|---|---|---|---|---|---|---|---|"]
    for name, s in summaries.items():
        keywords = ", ".join(f"{k} {v}" for k, v in sorted(s["refused_keywords"].items(), key=lambda kv: -kv[1]))
        lines.append(f"| {name} | {s['total']} | {s['compiled_share']:.0%} | {s['valid']} | {s['invalid']} | "
                     f"{s['not_json']} | {s['cut']} | {s['refused']} ({keywords or '-'}) |")
    return "\n".join(lines)


def compile_table(root: Path, datasets: list[str]) -> str:
    """Per data set: schemas this project's converter turns into a grammar, and the keywords it refuses."""
    from chat.engine.grammars import SchemaNotConvertible, json_schema_grammar

    data = root / "data" if (root / "data").is_dir() else root
    lines = ["| data set | schemas | compiled | refused (top keywords) |", "|---|---|---|---|"]
    totals = Counter()
    for dataset in datasets:
        counts, keywords = Counter(), Counter()
        for path in sorted((data / dataset).glob("*.json")):
            try:
                schema = json.loads(path.read_text())
            except ValueError:
                continue
            counts["total"] += 1
            try:
                json_schema_grammar(schema)
                counts["compiled"] += 1
            except SchemaNotConvertible as exc:
                keywords[exc.keyword] += 1
        totals.update(counts)
        top = ", ".join(f"{k} {v}" for k, v in keywords.most_common(4))
        lines.append(f"| {dataset} | {counts['total']} | {counts['compiled'] / max(counts['total'], 1):.1%} | "
                     f"{counts['total'] - counts['compiled']} ({top or '-'}) |")
    lines.append(f"| all | {totals['total']} | {totals['compiled'] / max(totals['total'], 1):.1%} | "
                 f"{totals['total'] - totals['compiled']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("path", type=Path, help="a checkout of guidance-ai/jsonschemabench (or its data/ folder)")
    parser.add_argument("--datasets", default=",".join(DATASETS[:8]), help="comma-separated data sets")
    parser.add_argument("--per-dataset", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--servers", default="llmsite,llama-server")
    parser.add_argument("--json", type=Path, help="write every result and the summaries here")
    parser.add_argument("--compile-only", action="store_true",
                        help="no servers: convert every schema of the data sets, report the share compiled")
    args = parser.parse_args()
    if args.compile_only:
        print(compile_table(args.path, [d.strip() for d in args.datasets.split(",") if d.strip()]))
        return
    sample = load_sample(args.path, [d.strip() for d in args.datasets.split(",") if d.strip()],
                         args.per_dataset, args.seed)
    print(f"{len(sample)} schemas from {args.path}", flush=True)
    workdir = Path(tempfile.mkdtemp(prefix="llmsite-jsonschema-bench-"))
    wanted = [s.strip() for s in args.servers.split(",")]
    results, servers = {}, []
    try:
        for name in wanted:
            if name == "llmsite":
                server, key = start_ours(workdir)
                servers.append(server)
                headers = {"Authorization": f"Bearer {key}", "Cache-Control": "no-cache"}
            elif name == "llama-server":
                server = start_llama_server(workdir, EngineShape.from_config())
                servers.append(server)
                headers = {}
            else:
                parser.error(f"unknown server {name!r}")
            started = time.monotonic()
            progress = args.json.with_suffix(f".{name}.jsonl") if args.json else None
            results[name] = run(server.url, headers, sample, max_tokens=args.max_tokens,
                                concurrency=args.concurrency, progress=progress)
            print(f"{name}: {time.monotonic() - started:.0f} s", flush=True)
            server.stop()
            servers.remove(server)
    finally:
        for server in servers:
            server.stop()
    summaries = {name: summary(r) for name, r in results.items()}
    print(table(summaries))
    for name, rows in results.items():
        for row in rows:
            if row["outcome"] in ("invalid", "not_json", "error"):
                print(f"{name} {row['outcome']}: {row['dataset']}/{row['file']}: {row['detail']}")
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                         "summaries": summaries, "results": results}, indent=1))


if __name__ == "__main__":
    main()
