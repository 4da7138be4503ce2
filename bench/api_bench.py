"""Benchmarks through the HTTP API: this project vs llama.cpp's llama-server, side by side in one run.

    .venv/bin/python -m bench.api_bench [--quick] [--only W1,W4] [--reps N] [--no-weak-peer] [--json PATH]

All servers run at once on loopback with the same model file and threads; only one is loaded at a
time. llama-server gets `-np` = config.yaml's `parallel` and the same total context
(parallel x context_length); llama-cpp-python's server is a second, weaker peer (one request at a
time), run on W1 at 8 clients and W3. Workloads (issue 13's targets; bench/workloads.py):
  W1  8 clients x 3 requests, ~35-token prompts, 128 tokens; plus the 1/2/4/8/16-client curve
  W2  8 clients sharing a fresh ~1,000-token system prompt, first burst (nothing cached)
  W3  1 client x 4 requests, 128 tokens
  W4  4 streams of 256 tokens; a ~1,850-token prompt arrives after 3 s: the longest pause in a
      running stream, and the long prompt's TTFT there vs on the idle server
  extras  this project alone: serving overhead, prefix reuse, response cache, memory
LLMSITE_CONFIG=other.yaml benchmarks this project with another config (e.g. flash_attention: true).
Repetitions are paired (servers alternate, order rotated); medians and median paired ratios are
recorded in bench/results/api.json (--quick: api-quick.json, tiny sizes, a smoke run only).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from bench import api_extras
from bench.paired import run_paired
from bench.servers import EngineShape, PeerServer, rss_mb, start_llama_server, start_ours
from bench.streams import request_body, request_headers, stream_chat
from bench.workloads import Sizes, Target, story_messages, w1, w2, w3, w4
from tests.llama_server import cpu_has_amx

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("W1", "W2", "W3", "W4", "extras")
CURVE = (1, 2, 4, 8, 16)
LLAMA_SERVER, WEAK_PEER = "llama-server", "llama_cpp.server"


def warm_up(target: Target) -> None:
    """Load the model and touch the code paths once, so the first measured run is not the slow one."""
    with httpx.Client(timeout=300) as client:
        record = stream_chat(client, target.url, target.headers, request_body(story_messages(0), 8))
    if record.error:
        raise RuntimeError(f"{target.name} does not answer the benchmark's requests: {record.error}")


def llama_server_version(binary: str) -> str:
    try:
        shown = subprocess.run([binary, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return " ".join((shown.stdout + shown.stderr).split())[:200]


def save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repetition: a smoke run")
    parser.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated subset of {', '.join(SECTIONS)}")
    parser.add_argument("--reps", type=int, help="paired repetitions per workload (default 3; --quick 1)")
    parser.add_argument("--no-weak-peer", action="store_true", help="leave out llama-cpp-python's server")
    parser.add_argument("--json", help="results file (default bench/results/api.json; --quick: api-quick.json)")
    parser.add_argument("--peer-weights", choices=("file", "ours"), default="file",
                        help="llama-server loads config.yaml's file as it is (default), or the same re-quantized "
                             "copy this project loads (config.yaml's `weights`)")
    args = parser.parse_args()
    only = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = Sizes.quick() if args.quick else Sizes()
    reps = args.reps or (1 if args.quick else 3)
    path = Path(args.json or ROOT / "bench" / "results" / ("api-quick.json" if args.quick else "api.json"))
    shape = EngineShape.from_config()
    workdir = Path(tempfile.mkdtemp(prefix="llmsite-bench-"))
    results = {"started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": args.quick,
               "sections": only, "reps": reps, "shape": vars(shape), "cpus": os.cpu_count(),
               "load_before": os.getloadavg(), "sizes": vars(sizes), "workloads": {}}
    print(f"workdir {workdir}; {shape}; sections {only}; {reps} paired repetitions", flush=True)

    servers = []
    try:
        ours, key = start_ours(workdir)
        servers.append(ours)
        peer_model = shape.loaded_file() if args.peer_weights == "ours" else Path(shape.model_path)
        llama = start_llama_server(workdir, shape, model=peer_model)
        servers.append(llama)
        results["llama_server"] = {"binary": str(llama.binary), "version": llama_server_version(str(llama.binary)),
                                   "command": " ".join(llama.command()[1:]), "model": peer_model.name}
        loaded = shape.loaded_file()  # the file itself where AMX kernels take its type (chat/engine/backends/amx.py)
        results["ours_model"] = {"file": Path(shape.model_path).name,
                                 "weights": loaded.name if loaded != Path(shape.model_path) else "as the file",
                                 "amx": cpu_has_amx() and "--no-repack" not in llama.command()}
        headers = request_headers(key)  # the same headers for all: the peers ignore the key
        targets = [Target("llmsite", ours.url, headers), Target(LLAMA_SERVER, llama.url, headers)]
        weak = []
        if not args.no_weak_peer and {"W1", "W3"} & set(only):
            peer = PeerServer(workdir, threads=shape.threads, context=shape.context_length)
            peer.start()
            servers.append(peer)
            weak = [Target(WEAK_PEER, peer.url, headers)]
        for target in targets + weak:
            warm_up(target)
        results["memory_idle_mb"] = {"llmsite": rss_mb(ours.process.pid), LLAMA_SERVER: rss_mb(llama.process.pid)}

        workloads = results["workloads"]
        if "W1" in only:
            print("W1: 8 clients x requests, short prompts, streamed", flush=True)
            workloads["W1"] = run_paired(w1, targets + weak, reps, label="W1", sizes=sizes)
            save(results, path)
            curve = {}
            for clients in CURVE:
                if clients != 8:
                    print(f"W1 curve: {clients} clients", flush=True)
                    curve[clients] = run_paired(w1, targets, 1, label=f"W1x{clients}", sizes=sizes, clients=clients)
            workloads["W1_curve"] = {
                name: {clients: (curve[clients]["medians"][name] if clients != 8 else workloads["W1"]["medians"][name])
                       ["tokens_per_s"] for clients in CURVE} for name in (t.name for t in targets)}
            save(results, path)
        for name, workload, candidates in (("W2", w2, targets), ("W3", w3, targets + weak), ("W4", w4, targets)):
            if name in only:
                print(workload.__doc__.splitlines()[0], flush=True)
                workloads[name] = run_paired(workload, candidates, reps, label=name, sizes=sizes)
                save(results, path)
        if "extras" in only:
            for target in weak:  # the weak peer is not needed any more; free its cores' share
                servers.pop().stop()
            results.update(extras(ours, key, quick=args.quick))
            print("extras: bare llama.cpp step of 4 sequences vs 1 (the floor under n=4)...", flush=True)
            results["n_choices"]["bare_floor"] = api_extras.batch_step_floor(shape.loaded_file())
    finally:
        for server in reversed(servers):
            server.stop()
    results["load_after"] = os.getloadavg()
    save(results, path)
    if "W1_curve" in results["workloads"] and not args.quick:
        plot(results["workloads"], ROOT / "docs" / "bench_concurrency.png", plot_title(results))
    print(f"results: {path}", flush=True)


def extras(ours, key: str, *, quick: bool) -> dict:
    reps = 2 if quick else 5
    found = {"memory": {"idle_mb": rss_mb(ours.process.pid)}}
    print("extras: serving overhead...", flush=True)
    # More repetitions here: a 2% difference between two single streams drowns in this machine's noise at 5.
    found["overhead"] = api_extras.serving_overhead(ours, key, 3 if quick else 11)
    print("extras: prefix reuse...", flush=True)
    found["prefix"] = api_extras.prefix_reuse(ours, key, reps)
    print("extras: response cache...", flush=True)
    found["cache"] = api_extras.response_cache(ours, key, 20 if quick else 50)
    print("extras: n choices...", flush=True)
    # Nine pairs: one pair's ratio moved between 1.3 and 1.9 on the Zen 4 (2026-12-07), too much for a median of five.
    found["n_choices"] = api_extras.n_choices(ours, key, 2 if quick else 9)
    print("extras: memory under 8 streams...", flush=True)
    found["memory"].update(api_extras.memory_under_streams(ours, key))
    found["memory"]["after_runs_mb"] = rss_mb(ours.process.pid)
    return found


def plot_title(results: dict) -> str:
    ours = results.get("ours_model", {}).get("weights", "as the file")
    peer = results["llama_server"].get("model", "the file").removeprefix("SmolLM2-135M-Instruct.")
    return f"W1, SmolLM2-135M\nllmsite: weights {ours}; llama-server: {peer}"


def plot(workloads: dict, path: Path, title: str = "W1, SmolLM2-135M Q4_1") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for (name, points), style in zip(workloads["W1_curve"].items(), ("o-", "s--")):
        ax.plot(list(points), list(points.values()), style, label=name)
    weak = workloads["W1"]["medians"].get(WEAK_PEER)
    if weak:
        ax.plot([8], [weak["tokens_per_s"]], "x", markersize=9, label=f"{WEAK_PEER} (8 clients)")
    ax.set_ylim(bottom=0)
    ax.set_xlabel("concurrent clients (streamed, 128 tokens each)")
    ax.set_ylabel("aggregate completion tokens/s")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
