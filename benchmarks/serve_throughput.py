"""Requests per second and latency of the served judge, with and without dynamic batching.

One run starts a local Ray and deploys the judge app twice side by side on 127.0.0.1 with the embedded
model: `max_batch_size` 8 (batched, at /b) and 1 (unbatched, at /u), one `JudgeModel` replica each
(`num_cpus=1`, one torch thread; the idle one takes no CPU). Each repetition sends `--requests` greedy
`POST /v1/chat/completions` (small `max_tokens`) at each concurrency level from client threads, to
one app and then the other (which goes first alternates by repetition, so load from other processes
falls on both alike). Per setting and level it reports every repetition's requests/s, p50 and p99
latency, and their median, min and max; per level, the batched/unbatched ratio of requests/s per
repetition and its median. The 1-minute load average is sampled before and after every measurement.

    .venv/bin/python benchmarks/serve_throughput.py --requests 200 --repeats 3 --out benchmarks/results/serve_throughput.json
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import httpx

from _endpoint import emit, free_port

MODEL = "smollm2-135m-instruct"


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def _request(route: str, i: int, max_tokens: int) -> tuple[str, dict]:
    """One request of the benchmark: a chat completion, or a judge request (single mode) whose answer
    the server caps at its own max_tokens."""
    if route == "judge":
        return "/v1/judge", {"instruction": f"Name a colour, number {i}.", "response": f"Colour {i}: blue.",
                             "scenario": "open_qa"}
    return "/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": f"Name a colour, number {i}."}],
                                    "max_tokens": max_tokens, "temperature": 0}


def _level(url: str, concurrency: int, requests: int, max_tokens: int, offset: int = 0, route: str = "chat") -> dict:
    def ask(i: int) -> float:
        path, body = _request(route, offset + i, max_tokens)
        started = time.perf_counter()
        r = client.post(path, json=body)
        r.raise_for_status()
        return time.perf_counter() - started

    load_before = os.getloadavg()[0]
    with httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=concurrency)) as client:
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            latencies = list(pool.map(ask, range(requests)))
        wall = time.perf_counter() - started
    return {
        "requests": requests,
        "wall_s": round(wall, 2),
        "requests_per_s": round(requests / wall, 3),
        "p50_s": round(_percentile(latencies, 50), 3),
        "p99_s": round(_percentile(latencies, 99), 3),
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
    }


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrency", default="1,4,8", help="comma-separated client concurrency levels")
    parser.add_argument("--requests", type=int, default=200, help="requests per level and repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--batch-wait-timeout-s", type=float, default=0.05)
    parser.add_argument("--route", choices=("chat", "judge"), default="chat",
                        help="POST /v1/chat/completions, or /v1/judge (single mode, answers capped at --max-tokens)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    settings = {"max_batch_size=8": ("/b", 8), "max_batch_size=1": ("/u", 1)}

    import ray
    from ray import serve

    from themis_ray.config import EngineConfig, ServeConfig
    from themis_ray.serve.app import build_app

    started = time.time()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    runs: dict = {name: {f"concurrency={c}": [] for c in levels} for name in settings}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        urls = {}
        for name, (route, batch) in settings.items():
            cfg = ServeConfig(engine=EngineConfig(model=MODEL, num_threads=1), api_keys_env="THEMIS_BENCH_NO_KEYS",
                              max_batch_size=batch, batch_wait_timeout_s=args.batch_wait_timeout_s,
                              max_tokens=args.max_tokens)
            serve.run(build_app(cfg), name=route.strip("/"), route_prefix=route)
            urls[name] = f"http://127.0.0.1:{port}{route}"
            _level(urls[name], 8, 16, args.max_tokens, offset=10_000, route=args.route)  # warm-up: the first generate calls are slower
        offset = 0
        for repeat in range(args.repeats):
            order = list(settings) if repeat % 2 == 0 else list(settings)[::-1]
            for name in order:
                for c in levels:
                    result = _level(urls[name], c, args.requests, args.max_tokens, offset, args.route)
                    offset += args.requests
                    runs[name][f"concurrency={c}"].append(result)
                    print(repeat, name, c, result, flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    summary: dict = {}
    for name, by_level in runs.items():
        summary[name] = {
            level: {key: _spread([r[key] for r in results]) for key in ("requests_per_s", "p50_s", "p99_s")}
            for level, results in by_level.items()
        }
    (a, b) = settings
    ratios = {}
    for c in levels:
        level = f"concurrency={c}"
        per_repeat = [ra["requests_per_s"] / rb["requests_per_s"] for ra, rb in zip(runs[a][level], runs[b][level])]
        ratios[level] = {"per_repeat": [round(r, 2) for r in per_repeat], **_spread(per_repeat)}
    loads = [x for by_level in runs.values() for results in by_level.values() for r in results
             for x in r["load_average_1m_before_after"]]
    results = {
        "summary": summary,
        "ratio_requests_per_s": ratios,
        "ratio": f"{a} / {b}, per repetition (the two measured back to back)",
        "runs": runs,
        "run": {
            "endpoint": "POST /v1/judge" if args.route == "judge" else "POST /v1/chat/completions",
            "model": MODEL,
            "max_tokens": args.max_tokens,
            "requests_per_level": args.requests,
            "repeats": args.repeats,
            "batch_wait_timeout_s": args.batch_wait_timeout_s,
            "replica": "per setting 1 JudgeModel replica, num_cpus=1, torch threads=1; JudgeAPI num_cpus=0",
            "cpus": os.cpu_count(),
            "load_average_1m": {"min": min(loads), "median": statistics.median(loads), "max": max(loads)},
            "python": platform.python_version(),
            "ray": ray.__version__,
            "command": "python benchmarks/serve_throughput.py " + " ".join(sys.argv[1:]),
            "wall_s": round(time.time() - started, 1),
            "note": "one run of this script on a 2-core machine shared with other work; see load_average_1m",
        },
    }
    emit(results, args.out)


if __name__ == "__main__":
    main()
