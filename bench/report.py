"""Render bench results (JSON) as the markdown tables of docs/BENCHMARKS.md, between markers."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "BENCHMARKS.md"


def mark(met: bool) -> str:
    return "met" if met else "**not met**"


def api_tables(r: dict) -> str:
    o, p, c, m, t = r["overhead"], r["prefix"], r["cache"], r["memory"], r["concurrency_target"]
    peer = {row["clients"]: row for row in r["concurrency_peer"]}
    lines = [f"Run of {r['started']} (`make bench`; medians; SmolLM2-135M Q4_1; 2 cores).", "",
             "| Benchmark | Measured | Target | |", "|---|---|---|---|",
             f"| Serving overhead: streamed decode tokens/s, API vs engine alone | {o['api_tps']:.1f} vs "
             f"{o['engine_tps']:.1f} ({o['ratio']:.0%}) | ≥ 95% | {mark(o['met'])} |",
             f"| Concurrency at 8 clients: aggregate tokens/s, llmsite vs llama_cpp.server | "
             f"{t['ratio_at_8']:.2f}x | ≥ 2x | {mark(t['ratio_at_8'] >= 2)} |",
             f"| p95 latency at 8 clients, llmsite vs llama_cpp.server | {t['p95_ours_s']:.1f} s vs "
             f"{t['p95_peer_s']:.1f} s | well under | {mark(t['p95_ours_s'] < t['p95_peer_s'])} |",
             f"| Prefix reuse: TTFT with a {p['prompt_tokens']}-token character prompt, later vs first | "
             f"{p['reused_ttft_s'] * 1000:.0f} ms vs {p['cold_ttft_s'] * 1000:.0f} ms ({p['ratio']:.1%}) | < 10% | "
             f"{mark(p['met'])} |",
             f"| Response cache: p50 latency of a cached request (generated: {c['generated_p50_ms']:.0f} ms) | "
             f"{c['cached_p50_ms']:.1f} ms (p95 {c['cached_p95_ms']:.1f}) | < 10 ms | {mark(c['met'])} |",
             f"| Memory: server RSS idle vs peak under 8 streams (model file {m['model_file_mb']:.0f} MB) | "
             f"{m['idle_mb']:.0f} vs {m['peak_8_streams_mb']:.0f} MB | one copy of the weights | "
             f"{mark(m['peak_8_streams_mb'] < m['idle_mb'] + m['model_file_mb'])} |",
             f"| Memory after all the runs above (prefix cache budget 256 MB) | {m['after_runs_mb']:.0f} MB | "
             f"bounded (see the soak) | +{m['after_runs_mb'] - m['idle_mb']:.0f} MB |",
             "", "| Clients | llmsite tok/s | p50 s | p95 s | llama_cpp.server tok/s | p50 s | p95 s |",
             "|---|---|---|---|---|---|---|"]
    for row in r["concurrency_ours"]:
        q = peer[row["clients"]]
        lines.append(f"| {row['clients']} | {row['tokens_per_s']:.1f} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | "
                     f"{q['tokens_per_s']:.1f} | {q['p50_s']:.2f} | {q['p95_s']:.2f} |")
    lines += ["", "![tokens/s against concurrency](bench_concurrency.png)"]
    return "\n".join(lines)


def soak_table(r: dict) -> str:
    return "\n".join([
        f"`make soak` ({r['seconds']:.0f} s of streamed and plain chats, cache hits, WebSocket chats and "
        "background jobs against one server and one Celery worker, Redis on):", "",
        "| Check | Result |", "|---|---|",
        f"| Requests | {r['requests']} ({', '.join(f'{k}: {v}' for k, v in sorted(r['statuses'].items()))}) |",
        f"| 5xx responses | {r['server_errors']} |",
        f"| Conversations checked / replies counted | {r['conversations']} / {r['messages_checked']} |",
        f"| Lost or duplicated messages | {len(r['lost_or_duplicated'])} |",
        f"| Server RSS start / end / max | {r['rss_mb_start']:.0f} / {r['rss_mb_end']:.0f} / {r['rss_mb_max']:.0f} MB |"])


def replace_section(name: str, body: str) -> None:
    text = DOC.read_text()
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    block = f"{start}\n{body}\n{end}"
    if start in text:
        text = re.sub(re.escape(start) + ".*?" + re.escape(end), lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(text)


def main() -> None:
    results = ROOT / "bench" / "results"
    if (results / "api.json").exists():
        replace_section("api-bench", api_tables(json.loads((results / "api.json").read_text())))
    if (results / "soak.json").exists():
        replace_section("soak", soak_table(json.loads((results / "soak.json").read_text())))
    print(f"updated {DOC}")


if __name__ == "__main__":
    main()
