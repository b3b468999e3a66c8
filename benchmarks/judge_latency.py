"""Latency of one judgment at a time: the served judge, its score-only route, the judge job, and the floor.

One run, one process for the floor, one local Ray for the rest, on the same rows:
- served: `POST /v1/judge` on the Ray Serve app (`build_app`, one `JudgeModel` replica), one request at
  a time, with the server's defaults (`serve.max_tokens`, `serve.rationale_tokens`: the answer stops
  once its verdict is out and it has that many tokens). Pairwise requests are judged in both orders.
- scoreonly: the same requests with `"rationale": false` (the score or verdict from one forward pass).
- floor: plain transformers in this process, same model, dtype and threads: `model.generate` (greedy,
  KV cache) on the same prompt ids (both orders batched for pairwise, as the server batches them), for
  exactly as many new tokens as the served answer had (`min_new_tokens = max_new_tokens`); and for
  score-only, one plain forward pass over the prompt(s).
- judge job: `themis-ray judge` (`judge_dataset`) on each cell's rows written as JSONL, one job per
  cell; wall seconds per row, Ray's start-up and the model load included (a batch job, not a latency).

Served and floor alternate request by request, so load from other processes falls on both alike. The
five-part evaluation prompt is about 400 tokens with empty texts, so the shortest cell is the shortest
prompt the judge can be sent; the others fill the instruction and responses with Python's own docs.

    .venv/bin/python benchmarks/judge_latency.py --requests 9 --out benchmarks/results/judge_latency.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import httpx

import themis_ray  # noqa: F401  (first: it sets OpenMP's passive waiting before torch loads, as in the replica)

sys.path.insert(0, os.path.dirname(__file__))
from _endpoint import emit, free_port  # noqa: E402
from serve_throughput import _percentile  # noqa: E402

QUICKSTART_JUDGE = "runs/quickstart/train/judge"


def _filler(offset: int, words: int) -> str:
    """`words` words of Python's documentation from `offset`: different text for every request."""
    from pydoc_data.topics import topics

    corpus = " ".join(topics[k] for k in sorted(topics)).split()
    start = (offset * 997) % (len(corpus) - words - 1)
    return " ".join(corpus[start:start + words])


def make_rows(engine, length: int, mode: str, n: int) -> list[dict]:
    """`n` requests whose prompt (with the "[[" prefill) has about `length` tokens, or the shortest
    the evaluation prompt allows."""
    from themis_ray import judging

    def body(i: int, words: int) -> dict:
        half = max(1, words // 2)
        if mode == "pairwise":
            return {"mode": "pairwise", "scenario": "open_qa", "instruction": f"Question {i}: {_filler(i, 8)}?",
                    "response_a": _filler(i + 1, half), "response_b": _filler(i + 2, half)}
        return {"mode": "single", "scenario": "open_qa", "instruction": f"Question {i}: {_filler(i, 8)}?",
                "response": _filler(i + 1, words)}

    def tokens(row: dict) -> int:
        request = judging.request_from_row(row, mode=row["mode"])
        return len(engine.prompt_ids(judging.build_messages(judging.render_prompt(request), prefill=True)))

    rows = []
    for i in range(n):
        low, high = 1, 4 * length
        while low < high:  # the fewest words that reach the length
            mid = (low + high) // 2
            low, high = (mid + 1, high) if tokens(body(i * 7, mid)) < length else (low, mid)
        rows.append(body(i * 7, low))
    return rows


def prompt_ids(engine, row: dict, swapped: bool = False) -> list[int]:
    from themis_ray import judging

    request = judging.request_from_row(row, mode=row["mode"])
    if swapped:
        request = judging.swap_pair(request)
    return engine.prompt_ids(judging.build_messages(judging.render_prompt(request), prefill=True))


def floor_generate(engine, row: dict, new_tokens: int) -> float:
    """Plain `generate` (greedy, KV cache) for exactly `new_tokens` tokens; both orders batched."""
    import torch

    orders = [prompt_ids(engine, row)] + ([prompt_ids(engine, row, swapped=True)] if row["mode"] == "pairwise" else [])
    ids, mask = engine._left_padded(orders)
    started = time.perf_counter()
    with torch.inference_mode():
        engine.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=engine.tokenizer.pad_token_id)
    return time.perf_counter() - started


def floor_forward(engine, row: dict) -> float:
    """One plain forward pass over the prompt (each order for pairwise): what score-only must pay."""
    import torch

    orders = [prompt_ids(engine, row)] + ([prompt_ids(engine, row, swapped=True)] if row["mode"] == "pairwise" else [])
    started = time.perf_counter()
    with torch.inference_mode():
        for ids in orders:
            engine.model(input_ids=torch.tensor([ids]), logits_to_keep=1)
    return time.perf_counter() - started


def answer_tokens(engine, out: dict) -> int:
    """New tokens of the served answer's longest order (the raw text less the "[[" prefill)."""
    from themis_ray import judging

    texts = [out["raw"]] + ([out["raw_swapped"]] if out.get("raw_swapped") else [])
    return max(1, max(len(engine.text_ids(t[len(judging.SCORE_PREFILL):])) for t in texts))


def judge_job_seconds(rows: list[dict], model: str, threads: int, dtype: str, max_tokens: int,
                      rationale_tokens: int, workdir: str, name: str) -> float:
    from themis_ray.config import load
    from themis_ray.judge_job import judge_dataset

    path = os.path.join(workdir, f"{name}.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    cfg = load("configs/quickstart.yaml", [
        f"input={path}", f"output={os.path.join(workdir, name + '-judged')}", f"judge.engine.model={model}",
        f"judge.engine.num_threads={threads}", f"judge.engine.dtype={dtype}", "judge.prefill_score=true",
        f"judge.sampling.max_tokens={max_tokens}", f"judge.rationale_tokens={rationale_tokens}",
        "judge.scenario=open_qa", "judge.pool.num_cpus=1"])
    started = time.perf_counter()
    judge_dataset(cfg)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help=f"judge folder (default: {QUICKSTART_JUDGE} if it exists, "
                                                       "else the embedded base model)")
    parser.add_argument("--lengths", default="400,600,1500", help="prompt tokens per cell")
    parser.add_argument("--modes", default="single,pairwise")
    parser.add_argument("--requests", type=int, default=9, help="requests per cell")
    parser.add_argument("--threads", type=int, default=2, help="torch threads, replica and floor alike")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--max-tokens", type=int, default=None, help="default: serve.max_tokens")
    parser.add_argument("--rationale-tokens", type=int, default=None, help="default: serve.rationale_tokens")
    parser.add_argument("--skip-judge-job", action="store_true")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()

    import ray
    import torch
    from ray import serve

    from themis_ray.config import EngineConfig, ServeConfig
    from themis_ray.engines import build_engine
    from themis_ray.serve.app import build_app

    defaults = ServeConfig()
    max_tokens = args.max_tokens or defaults.max_tokens
    rationale_tokens = args.rationale_tokens if args.rationale_tokens is not None else defaults.rationale_tokens
    model = args.model or (QUICKSTART_JUDGE if os.path.isdir(QUICKSTART_JUDGE) else "smollm2-135m-instruct")
    engine_cfg = EngineConfig(model=model, num_threads=args.threads, dtype=args.dtype)
    floor = build_engine(engine_cfg)  # the floor's model and tokenizer, in this process
    lengths, modes = [int(x) for x in args.lengths.split(",")], args.modes.split(",")
    cells = {(m, n): make_rows(floor, n, m, args.requests) for m in modes for n in lengths}

    started = time.time()
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    port = free_port()
    samples: dict = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        cfg = ServeConfig(model=model, engine=engine_cfg, api_keys_env="THEMIS_BENCH_NO_KEYS", max_tokens=max_tokens,
                          rationale_tokens=rationale_tokens)
        serve.run(build_app(cfg), route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=900) as client:
            for mode in modes:  # warm-up: the first calls of each kind are slower
                for rationale in (True, False):
                    client.post("/v1/judge", json={**cells[(mode, lengths[0])][0], "rationale": rationale})
                floor_generate(floor, cells[(mode, lengths[0])][0], 4)
            for (mode, length), rows in cells.items():
                cell = samples[f"{mode}/{length}"] = {k: [] for k in (
                    "served_s", "floor_s", "scoreonly_s", "floor_forward_s", "answer_tokens", "prompt_tokens")}
                for row in rows:
                    t = time.perf_counter()
                    r = client.post("/v1/judge", json=row)
                    cell["served_s"].append(time.perf_counter() - t)
                    r.raise_for_status()
                    out = r.json()
                    tokens = answer_tokens(floor, out)
                    cell["answer_tokens"].append(tokens)
                    cell["prompt_tokens"].append(len(prompt_ids(floor, row)))
                    cell["floor_s"].append(floor_generate(floor, row, tokens))
                    t = time.perf_counter()
                    client.post("/v1/judge", json={**row, "rationale": False}).raise_for_status()
                    cell["scoreonly_s"].append(time.perf_counter() - t)
                    cell["floor_forward_s"].append(floor_forward(floor, row))
                print(mode, length, {k: round(statistics.median(v), 3) for k, v in cell.items()}, flush=True)
        serve.shutdown()
        del floor
        job = {}
        if not args.skip_judge_job:
            with tempfile.TemporaryDirectory() as workdir:
                for (mode, length), rows in cells.items():
                    seconds = judge_job_seconds(rows, model, args.threads, args.dtype, max_tokens, rationale_tokens,
                                                workdir, f"{mode}-{length}")
                    job[f"{mode}/{length}"] = {"wall_s": round(seconds, 2), "rows": len(rows),
                                               "s_per_row": round(seconds / len(rows), 3)}
                    print("judge job", mode, length, job[f"{mode}/{length}"], flush=True)
    finally:
        serve.shutdown()
        ray.shutdown()

    def stats(values: list[float]) -> dict:
        return {"p50": round(_percentile(values, 50), 3), "p99": round(_percentile(values, 99), 3)}

    cells_out = {}
    for key, cell in samples.items():
        served, floor_s = stats(cell["served_s"]), stats(cell["floor_s"])
        cells_out[key] = {
            "prompt_tokens_median": statistics.median(cell["prompt_tokens"]),
            "answer_tokens_median": statistics.median(cell["answer_tokens"]),
            "served_p50_s": served["p50"], "served_p99_s": served["p99"],
            "floor_p50_s": floor_s["p50"], "floor_p99_s": floor_s["p99"],
            "served_over_floor_p50": round(served["p50"] / floor_s["p50"], 3),
            "scoreonly_p50_s": stats(cell["scoreonly_s"])["p50"], "scoreonly_p99_s": stats(cell["scoreonly_s"])["p99"],
            "scoreonly_floor_p50_s": stats(cell["floor_forward_s"])["p50"],
            "judge_job": job.get(key),
            "samples": {k: [round(x, 4) for x in v] for k, v in cell.items()},
        }
    results = {
        "cells": cells_out,
        "run": {
            "model": model, "dtype": args.dtype, "threads": args.threads, "max_tokens": max_tokens,
            "rationale_tokens": rationale_tokens, "requests_per_cell": args.requests,
            "replica": f"1 JudgeModel replica, num_cpus={defaults.replica_num_cpus}, torch threads={args.threads}; "
                       "JudgeAPI num_cpus=0",
            "cpus": os.cpu_count(), "load_average_1m_end": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "command": "python benchmarks/judge_latency.py " + " ".join(sys.argv[1:]),
            "wall_s": round(time.time() - started, 1),
        },
    }
    emit(results, args.out)


if __name__ == "__main__":
    main()
