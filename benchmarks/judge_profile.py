"""Where one judgment's time goes on a CPU: prefill and each decode step, by dtype and thread count.

For a pairwise evaluation prompt of about 630 tokens (the five-part prompt, two answers of a few
sentences) on the embedded model: one forward pass over the prompt (prefill; also what score-only
judging costs), then greedy decode steps one token at a time from the KV cache, as `generate` runs them.
Each setting runs in a fresh process (torch's thread pool and OpenMP's way of waiting are fixed when it
loads): dtype x threads, then the ways torch's OpenMP threads wait between parallel regions (`WAITS`),
interleaved over `--rounds`, alone and with one other process spinning on the cores (`busy_processes`),
which is what a node shared by Ray's actors, replicas and tasks looks like.

    .venv/bin/python benchmarks/judge_profile.py --out benchmarks/results/judge_profile.json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, os, sys, time
import torch
from themis_ray import judging
from themis_ray.config import EngineConfig
from themis_ray.engines import build_engine

threads, dtype, steps, repeats = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
engine = build_engine(EngineConfig(num_threads=threads, dtype=dtype))
text = ("Python lists are mutable sequences that store references to objects. They support indexing, "
        "slicing, appending and sorting in place, and their length grows as items are added. ")
request = judging.JudgeRequest(instruction="Explain the difference between lists and tuples in Python.",
                               scenario="open_qa", mode="pairwise", response_a=text * 3,
                               response_b=("Tuples are immutable. " + text) * 3)
ids = torch.tensor([engine.prompt_ids(judging.build_messages(judging.render_prompt(request), prefill=True))])
prefill, decode = [], []
with torch.inference_mode():
    for _ in range(repeats):
        t = time.perf_counter()
        out = engine.model(input_ids=ids, use_cache=True)
        prefill.append(time.perf_counter() - t)
        cache, token = out.cache, out.logits[:, -1:].argmax(-1)
        for _ in range(steps):
            t = time.perf_counter()
            out = engine.model(input_ids=token, cache=cache, use_cache=True)
            decode.append(time.perf_counter() - t)
            cache, token = out.cache, out.logits[:, -1:].argmax(-1)
print(json.dumps({"prompt_tokens": ids.shape[1], "prefill_s": prefill, "decode_step_s": decode,
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"), "torch_threads": torch.get_num_threads()}))
"""


def _spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


WAITS = {  # how torch's OpenMP (libgomp) threads wait between parallel regions
    "default": {},  # spin up to 300,000 iterations, then sleep
    "passive": {"OMP_WAIT_POLICY": "PASSIVE"},  # sleep at once
    "spin10k": {"GOMP_SPINCOUNT": "10000"},  # spin ~10,000 iterations, then sleep
    "active": {"OMP_WAIT_POLICY": "ACTIVE"},  # spin
}


def measure(threads: int, dtype: str, wait: str, steps: int, repeats: int, busy: int, timeout: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(WAITS[wait])
    hogs = [multiprocessing.Process(target=_spin, args=(timeout,), daemon=True) for _ in range(busy)]
    for hog in hogs:
        hog.start()
    try:
        done = subprocess.run([sys.executable, "-c", CHILD, str(threads), dtype, str(steps), str(repeats)],
                              env=env, capture_output=True, text=True, timeout=timeout)
        raw = json.loads(done.stdout.strip().splitlines()[-1])
    except subprocess.TimeoutExpired:
        return {"timed_out_after_s": timeout}
    finally:
        for hog in hogs:
            hog.terminate()
    return {"prompt_tokens": raw["prompt_tokens"], "prefill_s_median": round(statistics.median(raw["prefill_s"]), 4),
            "decode_step_ms_median": round(1000 * statistics.median(raw["decode_step_s"]), 2),
            "prefill_s": [round(x, 4) for x in raw["prefill_s"]],
            "decode_step_ms": [round(1000 * x, 2) for x in raw["decode_step_s"]]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=32, help="decode steps per repetition")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=240, help="seconds per setting before it counts as stuck")
    parser.add_argument("--rounds", type=int, default=2, help="the wait-policy settings are run this many times, interleaved")
    parser.add_argument("--out")
    args = parser.parse_args()
    settings = [(t, d, "passive", 0) for d in ("float32", "bfloat16") for t in (1, 2)]
    for _ in range(args.rounds):
        settings += [(2, "float32", wait, busy) for busy in (0, 1) for wait in ("default", "passive", "spin10k")]
    settings += [(1, "float32", "passive", 1), (2, "float32", "active", 1)]
    results = []
    for threads, dtype, wait, busy in settings:
        row = {"threads": threads, "dtype": dtype, "wait": wait, "busy_processes": busy,
               "load_average_1m_before": round(os.getloadavg()[0], 2),
               **measure(threads, dtype, wait, args.steps, args.repeats, busy, args.timeout)}
        print({k: v for k, v in row.items() if not isinstance(v, list)}, flush=True)
        results.append(row)
    out = {"settings": results, "run": {
        "model": "smollm2-135m-instruct", "cpus": os.cpu_count(), "python": platform.python_version(),
        "command": "python benchmarks/judge_profile.py " + " ".join(sys.argv[1:]),
        "note": "busy_processes: that many processes spinning on the cores during the measurement"}}
    text = json.dumps(out, indent=2)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
