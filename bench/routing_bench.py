"""Affinity vs round-robin routing over a pool of 3 real llama-server upstreams (issue 26).

Each policy gets fresh upstreams (cold prompt caches, counters at 0): 3 llama-server processes
(4 slots each, --metrics) behind this project's openai_compatible backend, and two bursts of
12 characters x 4 users, each user's conversation continued in the second burst, in a shuffled
order (the same for both policies). Reported: prompt tokens the upstreams evaluated (the sum of
their `llamacpp:prompt_tokens_total`, which excludes tokens reused from a slot's cache) and the
clients' TTFT p50/p95 per burst.

`--cache-ram MIB` is passed to every upstream: llama-server keeps evicted prompts in a host-memory cache
(8 GiB by default), which holds every sheet of this tiny model many times over; a production model's states are
~100x larger, so its cache holds a few dozen sheets. `--cache-ram 0` leaves the slots alone as the prompt cache,
the scale model of characters outnumbering what an upstream can keep.

    .venv/bin/python -m bench.routing_bench [--max-tokens 12] [--cache-ram MIB] [--out bench-routing.json]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from bench.servers import MODEL
from bench.streams import MODEL_NAME, StreamRecord, percentile, request_headers, stream_chat
from tests.live import LiveServer, free_port, prepare_database
from tests.llama_server import LlamaServer, find_llama_server

UPSTREAMS, SLOTS, SLOT_CONTEXT = 3, 4, 1024
CHARACTERS, USERS = 12, 4
TRAITS = ["a retired lighthouse keeper", "a starship engineer", "a medieval herbalist", "a jazz pianist",
          "a desert caravan guide", "a deep-sea biologist", "a chess grandmaster", "a mountain rescue medic",
          "a court astronomer", "a street food vendor", "a museum night guard", "a glacier researcher"]
OPENERS = ["Hello! Who are you?", "What did you do today?", "Tell me a secret.", "What do you fear most?"]
FOLLOW_UP = "Interesting. Tell me more about that, please."


def persona(index: int) -> str:
    """A character sheet of roughly 250 tokens, different from the first words on."""
    trait = TRAITS[index]
    return (f"You are {trait}, character number {index}. Stay in character at all times. " + " ".join(
        f"Fact {n} about you as {trait}: you remember detail {n} of your long career vividly, you speak "
        f"warmly and plainly, and you never mention being an AI." for n in range(1, 7)))


def config_text(urls: list[str], routing: str, slots: int) -> str:
    return f"""
system_prompt: Be brief.
default_model: pool
sampling: {{temperature: 0.8, max_tokens: 16}}
models:
  - name: pool
    backend: openai_compatible
    base_url: [{", ".join(url + "/v1" for url in urls)}]
    remote_model: {MODEL_NAME}
    routing: {routing}
    upstream_slots: {slots}
    context_length: {SLOT_CONTEXT}
    max_connections: {UPSTREAMS * SLOTS * 4}
    timeout: 600
"""


def prompt_tokens_evaluated(upstream: LlamaServer) -> int:
    return int(upstream.metric("llamacpp:prompt_tokens_total"))


def burst(server: LiveServer, key: str, conversations: dict, order: list, max_tokens: int) -> list[StreamRecord]:
    headers = request_headers(key)

    def one(conversation_id):
        body = {"model": "pool", "messages": conversations[conversation_id], "max_tokens": max_tokens,
                "temperature": 0.8, "seed": hash(conversation_id) % 10_000, "stream": True, "store": False,
                "stream_options": {"include_usage": True}}
        with httpx.Client(timeout=900) as client:
            return conversation_id, stream_chat(client, server.url, headers, body), body

    with ThreadPoolExecutor(len(order)) as pool:
        results = list(pool.map(one, order))
    return [record for _, record, _ in results]


def run_policy(routing: str, workdir: Path, max_tokens: int, threads: int, seed: int,
               cache_ram: int | None = None, gate_slots: int = SLOTS) -> dict:
    binary, missing = find_llama_server()
    if binary is None:
        raise SystemExit(missing)
    upstreams = [LlamaServer(binary, MODEL, port=free_port(), log_path=workdir / f"llama-server-{i}.log",
                             context=SLOTS * SLOT_CONTEXT, parallel=SLOTS, threads=threads, alias=MODEL_NAME,
                             extra=("--metrics",) + (() if cache_ram is None else ("--cache-ram", str(cache_ram))))
                 for i in range(UPSTREAMS)]
    (workdir / "config.yaml").write_text(config_text([u.url for u in upstreams], routing, gate_slots))
    server = LiveServer(workdir=workdir, env={"LLMSITE_CONFIG": str(workdir / "config.yaml"), "API_RATE_LIMIT": "",
                                              "LOG_LEVEL": "WARNING"})
    try:
        for upstream in upstreams:
            upstream.start()
        key = prepare_database(server, {"bench": ["bench"]})["bench"]
        for upstream in upstreams:
            upstream.wait_until_ready()
        server.start()
        conversations = {(c, u): [{"role": "system", "content": persona(c)}, {"role": "user", "content": OPENERS[u]}]
                         for c in range(CHARACTERS) for u in range(USERS)}
        shuffle = random.Random(seed)
        bursts = []
        for number in (1, 2):
            order = list(conversations)
            shuffle.shuffle(order)
            before = sum(prompt_tokens_evaluated(u) for u in upstreams)
            started = time.perf_counter()
            records = burst(server, key, conversations, order, max_tokens)
            wall = time.perf_counter() - started
            evaluated = sum(prompt_tokens_evaluated(u) for u in upstreams) - before
            good = [r for r in records if not r.error]
            bursts.append({"burst": number, "requests": len(records), "errors": len(records) - len(good),
                           "first_error": next((r.error for r in records if r.error), ""),
                           "prompt_tokens_sent": sum(r.prompt_tokens for r in good),
                           "prompt_tokens_evaluated": evaluated, "wall_s": round(wall, 2),
                           "ttft_p50_s": round(percentile([r.ttft for r in good], 0.5), 3),
                           "ttft_p95_s": round(percentile([r.ttft for r in good], 0.95), 3)})
            print(routing, bursts[-1], flush=True)
            for conversation_id in order:  # the next burst continues every conversation
                conversations[conversation_id] = conversations[conversation_id] + [
                    {"role": "assistant", "content": f"I am character {conversation_id[0]}."},
                    {"role": "user", "content": FOLLOW_UP}]
        per_upstream = [prompt_tokens_evaluated(u) for u in upstreams]
        return {"routing": routing, "cache_ram_mib": cache_ram, "upstream_slots": gate_slots, "bursts": bursts,
                "prompt_tokens_evaluated_per_upstream": per_upstream,
                "prompt_tokens_evaluated": sum(b["prompt_tokens_evaluated"] for b in bursts),
                "ttft_p95_s": round(percentile([b["ttft_p95_s"] for b in bursts], 1.0), 3)}
    finally:
        server.stop()
        for upstream in upstreams:
            upstream.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--max-tokens", type=int, default=12)
    parser.add_argument("--threads", type=int, default=1, help="threads of each llama-server")
    parser.add_argument("--seed", type=int, default=26)
    parser.add_argument("--cache-ram", type=int, default=None,
                        help="each upstream's --cache-ram in MiB (default: llama-server's own, 8 GiB)")
    parser.add_argument("--upstream-slots", type=int, default=SLOTS,
                        help="the web instance's upstream_slots (0: every request sent at once, the upstreams queue)")
    parser.add_argument("--policies", default="affinity,round_robin")
    parser.add_argument("--out", default="bench-routing.json")
    args = parser.parse_args()
    results = []
    for routing in args.policies.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-{routing}-") as workdir:
            results.append(run_policy(routing, Path(workdir), args.max_tokens, args.threads, args.seed,
                                      args.cache_ram, args.upstream_slots))
    Path(args.out).write_text(json.dumps(results, indent=2))
    print("| routing | burst | prompt tokens sent | evaluated by the upstreams | TTFT p50 | TTFT p95 |")
    print("|---|---|---|---|---|---|")
    for result in results:
        for b in result["bursts"]:
            print(f"| {result['routing']} | {b['burst']} | {b['prompt_tokens_sent']:,} | {b['prompt_tokens_evaluated']:,}"
                  f" | {b['ttft_p50_s']:.2f} s | {b['ttft_p95_s']:.2f} s |")
    by_policy = {result["routing"]: result for result in results}
    if {"affinity", "round_robin"} <= set(by_policy):
        affinity, round_robin = (by_policy[name]["prompt_tokens_evaluated"] for name in ("affinity", "round_robin"))
        print(f"evaluated, affinity / round-robin: {affinity / max(1, round_robin):.2f}")


if __name__ == "__main__":
    main()
