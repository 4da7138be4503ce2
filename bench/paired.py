"""Paired repetitions: every repetition runs each server once, in rotated order, so drift hits all alike.

Medians are taken per server over the repetitions, and ratios per repetition (ours / peer) before
their median: on a noisy machine a paired ratio is steadier than a ratio of medians.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

from bench.workloads import Target

OURS = "llmsite"


def numeric_keys(run: dict) -> list[str]:
    return [key for key, value in run.items() if isinstance(value, (int, float)) and not isinstance(value, bool)]


def run_paired(workload: Callable[..., dict], targets: list[Target], reps: int, *, label: str, **kwargs) -> dict:
    runs: dict[str, list[dict]] = {target.name: [] for target in targets}
    for rep in range(reps):
        shift = rep % len(targets)
        for target in targets[shift:] + targets[:shift]:
            result = workload(target, **kwargs)
            runs[target.name].append(result)
            print(f"  {label} rep {rep + 1}/{reps} {target.name:>17}: " + describe(result), flush=True)
    medians = {name: {key: statistics.median(run[key] for run in results) for key in numeric_keys(results[0])}
               for name, results in runs.items() if results}
    ratios = {}
    for name, results in runs.items():
        if name == OURS or OURS not in runs:
            continue
        ratios[name] = {key: statistics.median(ours[key] / peer[key] for ours, peer in zip(runs[OURS], results)
                                               if peer[key])
                        for key in numeric_keys(results[0])
                        if any(peer[key] for peer in results)}
    return {"reps": reps, "runs": runs, "medians": medians, "ratios_ours_over": ratios}


def describe(result: dict) -> str:
    parts = [f"{result.get('tokens_per_s', 0):6.1f} tok/s", f"TTFT p95 {result.get('ttft_p95_s', 0):5.2f} s",
             f"gap p99 {result.get('gap_p99_ms', 0):6.0f} ms", f"max {result.get('gap_max_ms', 0):6.0f} ms"]
    if "longest_pause_s" in result:
        parts.append(f"pause {result['longest_pause_s']:.2f} s (at +{result.get('longest_pause_at_s', 0):.2f} s), long TTFT {result['long_ttft_loaded_s']:.2f} s "
                     f"(idle {result['long_ttft_idle_s']:.2f} s)")
        if result.get("side_prefills") is not None:
            parts.append(f"side prefills {result['side_prefills']:.0f}")
    if result.get("errors"):
        parts.append(f"{result['errors']} errors: {result.get('first_error', '')[:120]}")
    return ", ".join(parts)
