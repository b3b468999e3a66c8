"""Requests per second and latency of the served judge, with and without dynamic batching.

One run starts a local Ray, then for each `max_batch_size` (8: batched, 1: unbatched) deploys the judge
app on 127.0.0.1 with the embedded model, sends `--requests` chat completions (small `max_tokens`,
greedy) at each concurrency level from client threads, and prints one JSON document: per setting and
level, requests/s and p50/p99 latency, and the batched/unbatched throughput ratio per level.

    .venv/bin/python benchmarks/serve_throughput.py --out serve_throughput.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _level(url: str, concurrency: int, requests: int, max_tokens: int) -> dict:
    def ask(i: int) -> float:
        body = {"model": MODEL, "messages": [{"role": "user", "content": f"Name a colour, number {i}."}],
                "max_tokens": max_tokens, "temperature": 0}
        started = time.perf_counter()
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return time.perf_counter() - started

    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(ask, range(requests)))
        wall = time.perf_counter() - started
    return {
        "concurrency": concurrency,
        "requests": requests,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "p50_s": round(_percentile(latencies, 50), 3),
        "p99_s": round(_percentile(latencies, 99), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client concurrency levels")
    parser.add_argument("--requests", type=int, default=16, help="requests per level")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--batch-sizes", default="8,1", help="max_batch_size settings to compare")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]

    import ray
    from ray import serve

    from themis_ray.config import EngineConfig, ServeConfig
    from themis_ray.serve import run_server

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    results: dict = {"settings": {}}
    try:
        for batch in batch_sizes:
            cfg = ServeConfig(
                port=_free_port(),
                engine=EngineConfig(model=MODEL, num_threads=1),
                api_keys_env="THEMIS_BENCH_NO_KEYS",
                max_batch_size=batch,
                batch_wait_timeout_s=0.05,
            )
            url = run_server(cfg, blocking=False)
            _level(url, 1, 2, args.max_tokens)  # warm-up: the replica's first generate is slower
            results["settings"][f"max_batch_size={batch}"] = [
                _level(url, c, args.requests, args.max_tokens) for c in levels
            ]
            serve.shutdown()
    finally:
        serve.shutdown()
        ray.shutdown()

    if len(batch_sizes) == 2:
        (a, rows_a), (b, rows_b) = results["settings"].items()
        results["ratio_requests_per_s"] = {
            f"concurrency={ra['concurrency']}": round(ra["requests_per_s"] / rb["requests_per_s"], 2)
            for ra, rb in zip(rows_a, rows_b)
        }
        results["ratio"] = f"{a} / {b}"
    results["run"] = {
        "endpoint": "POST /v1/chat/completions",
        "model": MODEL,
        "max_tokens": args.max_tokens,
        "requests_per_level": args.requests,
        "batch_wait_timeout_s": 0.05,
        "replica": "1 JudgeModel replica, num_cpus=1, torch threads=1; JudgeAPI num_cpus=0",
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
