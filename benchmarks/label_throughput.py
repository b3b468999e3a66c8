"""Label-stage throughput against an OpenAI-compatible endpoint with a fixed latency and concurrency cap.

The endpoint is `tests/openai_server.py`: every answer takes `--latency` seconds and at most `--cap`
requests are served at once (one more gets 429 with Retry-After), so no client can do better than
cap / latency requests per second: the server's limit. The stage (`themis_ray.stages.label.run` on a
local Ray, one actor pool, the openai engine) is measured against two references in the same run:

* the named baseline: a sequential loop of the `openai` client over the same prompts (one request at
  a time, how a plain labeling script calls an API);
* the server's limit, cap / latency.

Two more figures say where the gap to the limit goes: `engine_alone` is the openai engine called once
with every record, in this process, without Ray (the best this client can do on this machine), and
the stage's `steady_records_per_s` leaves out its fixed cost (Ray Data's plan, the actor's start),
measured by a run of one batch just before.

A second stage run injects about 20% faults (500, 429 with Retry-After, malformed bodies, hangs past
the client's timeout, unparsable judge text) and reports records/s with the labelled and rejected
counts. Scores are parsed from text (`score_by: text`, no prefill); the server answers "[[4]] ...".

    python benchmarks/label_throughput.py --records 1200 --latency 0.2 --cap 16
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from openai_server import OpenAIServer  # noqa: E402

from themis_ray import judging  # noqa: E402
from themis_ray.config import PipelineConfig  # noqa: E402
from themis_ray.store import StageStore  # noqa: E402

KEY_ENV = "THEMIS_BENCH_KEY"


def make_table(n: int, offset: int = 0) -> pa.Table:
    rows = [{"id": f"r{i:05d}", "instruction": f"What is {i} + {i}? Show the steps.", "scenario": "open_qa",
             "reference": None, "response": f"{i} + {i} = {2 * i}, since adding a number to itself doubles it."}
            for i in range(offset, offset + n)]
    return pa.Table.from_pylist(rows)


def sequential_baseline(server: OpenAIServer, table: pa.Table, max_tokens: int) -> dict:
    """One `openai` client, one request at a time, same prompts and parsing as the stage."""
    import openai

    client = openai.OpenAI(base_url=server.base_url, api_key="unused", timeout=30, max_retries=6)
    labelled = 0
    start = time.perf_counter()
    for row in table.to_pylist():
        request = judging.JudgeRequest(instruction=row["instruction"], response=row["response"],
                                       scenario=row["scenario"])
        reply = client.chat.completions.create(model="teacher", max_tokens=max_tokens, temperature=0.0,
                                               messages=judging.build_messages(judging.render_prompt(request)))
        labelled += judging.parse_evaluation(reply.choices[0].message.content or "").ok
    wall = time.perf_counter() - start
    client.close()
    return {"records": table.num_rows, "labelled": labelled, "wall_s": round(wall, 2),
            "records_per_s": round(table.num_rows / wall, 2)}


def engine_alone(server: OpenAIServer, table: pa.Table, args) -> dict:
    from themis_ray.config import EngineConfig, SamplingConfig
    from themis_ray.engines.openai_engine import OpenAIEngine

    convs = [judging.build_messages(judging.render_prompt(judging.JudgeRequest(
        instruction=r["instruction"], response=r["response"], scenario=r["scenario"]))) for r in table.to_pylist()]
    engine = OpenAIEngine(EngineConfig(kind="openai", base_url=server.base_url, model="teacher",
                                       max_concurrency=args.concurrency, api_key_env=KEY_ENV))
    start = time.perf_counter()
    done = engine.generate(convs, SamplingConfig(max_tokens=args.max_tokens))
    wall = time.perf_counter() - start
    engine.close()
    return {"records": len(convs), "errors": sum(1 for d in done if d.error), "wall_s": round(wall, 2),
            "records_per_s": round(len(convs) / wall, 2)}


def stage_run(server: OpenAIServer, table: pa.Table, args, run_dir: Path, **engine) -> dict:
    from omegaconf import OmegaConf

    from themis_ray.stages import label

    engine = {"kind": "openai", "model": "teacher", "base_url": server.base_url, "api_key_env": KEY_ENV,
              "max_concurrency": args.concurrency, "timeout_s": 30.0, "max_retries": 6, **engine}
    cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig), {"label": {
        "engine": engine, "sampling": {"max_tokens": args.max_tokens, "logprobs": 0}, "score_by": "text",
        "prefill_score": False, "max_attempts": 2,
        "pool": {"num_cpus": 0, "min_size": args.actors, "max_size": args.actors, "batch_size": args.batch_size}}})
    store = StageStore(run_dir, "label")
    fingerprint = {"bench": str(run_dir)}
    staging = store.staging_dir(fingerprint)
    before = sum(server.requests.values())
    start = time.perf_counter()
    result = label.run(cfg, {"respond": table}, staging)
    wall = time.perf_counter() - start
    manifest = store.commit(result, fingerprint, wall, staging)
    return {"records": table.num_rows, "labelled": manifest["rows_out"], "rejected": manifest["rows_rejected"],
            "wall_s": round(wall, 2), "records_per_s": round(table.num_rows / wall, 2),
            "requests": sum(server.requests.values()) - before, "server_max_in_flight": server.max_in_flight,
            "server_busy_429": server.rejected}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=1600)
    parser.add_argument("--baseline-records", type=int, default=40)
    parser.add_argument("--fault-records", type=int, default=600)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--cap", type=int, default=16)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--concurrency", type=int, default=16, help="engine max_concurrency per actor")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()

    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault(KEY_ENV, "unused")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    limit = args.cap / args.latency
    result = {"latency_s": args.latency, "server_cap": args.cap, "server_limit_records_per_s": limit,
              "actors": args.actors, "engine_max_concurrency": args.concurrency, "batch_size": args.batch_size}
    try:
        with tempfile.TemporaryDirectory() as tmp:
            with OpenAIServer(latency_s=args.latency, max_concurrency=args.cap) as server:
                stage_run(server, make_table(args.batch_size, offset=10**6), args, Path(tmp) / "warmup")
            with OpenAIServer(latency_s=args.latency, max_concurrency=args.cap) as server:
                one_batch = stage_run(server, make_table(args.batch_size, offset=2 * 10**6), args, Path(tmp) / "one")
            with OpenAIServer(latency_s=args.latency, max_concurrency=args.cap) as server:
                alone = engine_alone(server, make_table(args.records // 2, offset=3 * 10**6), args)
            with OpenAIServer(latency_s=args.latency, max_concurrency=args.cap) as server:
                baseline = sequential_baseline(server, make_table(args.baseline_records), args.max_tokens)
            with OpenAIServer(latency_s=args.latency, max_concurrency=args.cap) as server:
                clean = stage_run(server, make_table(args.records), args, Path(tmp) / "clean")
            with OpenAIServer(latency_s=args.latency, max_concurrency=args.cap, fail_rate=0.04, malformed_rate=0.04,
                              rate_limit_rate=0.04, retry_after_s=0.5, hang_rate=0.04, hang_s=3.0,
                              garbage_rate=0.04, seed=1) as server:
                faulty = stage_run(server, make_table(args.fault_records), args, Path(tmp) / "faults", timeout_s=1.5)
                faulty["faults_injected"] = dict(server.faults)
                faulty["fault_share"] = round(sum(server.faults.values()) / max(1, faulty["requests"]), 3)
    finally:
        ray.shutdown()
    clean["vs_sequential_openai"] = round(clean["records_per_s"] / baseline["records_per_s"], 2)
    clean["vs_server_limit"] = round(clean["records_per_s"] / limit, 3)
    clean["vs_engine_alone"] = round(clean["records_per_s"] / alone["records_per_s"], 3)
    steady = (clean["records"] - one_batch["records"]) / max(1e-9, clean["wall_s"] - one_batch["wall_s"])
    clean["one_batch_wall_s"] = one_batch["wall_s"]
    clean["steady_records_per_s"] = round(steady, 2)
    clean["steady_vs_server_limit"] = round(steady / limit, 3)
    alone["vs_server_limit"] = round(alone["records_per_s"] / limit, 3)
    faulty["vs_server_limit"] = round(faulty["records_per_s"] / limit, 3)
    result.update(sequential_openai=baseline, engine_alone=alone, stage_clean=clean, stage_faults=faulty, machine={
        "cpus": os.cpu_count(), "load_avg_1m_end": round(os.getloadavg()[0], 2), "python": platform.python_version(),
        "ray": ray.__version__})
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
