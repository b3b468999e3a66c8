"""A finished run's figures as one JSON: each stage's manifest counts and wall time, and evaluate's metrics.

The raw output behind the README's quickstart table: rows in/out/rejected, wall seconds and the
stage's own summary fields from every `_manifest.json`, the judges' headline metrics from
`evaluate/metrics.json`, and (with `--peak`) what `benchmarks/peak_memory.py` printed for the run.

    .venv/bin/python benchmarks/peak_memory.py -- .venv/bin/themis-ray pipeline --config configs/quickstart.yaml \
        | tail -n 20 > /tmp/peak.json
    .venv/bin/python benchmarks/run_summary.py runs/quickstart --peak /tmp/peak.json > benchmarks/results/quickstart.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from themis_ray.stages.registry import STAGES

SKIP = {"files", "rejects", "digest", "fingerprint", "inputs", "templates"}  # long listings, not figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--peak", help="the JSON peak_memory.py printed for the run")
    args = parser.parse_args()
    stages = {}
    for name in STAGES:
        path = os.path.join(args.run_dir, name, "_manifest.json")
        if os.path.exists(path):
            with open(path) as f:
                manifest = json.load(f)
            stages[name] = {k: v for k, v in manifest.items() if k not in SKIP}
    out: dict = {"run_dir": args.run_dir, "stages": stages,
                 "pipeline_wall_s": round(sum(s.get("wall_s", 0) for s in stages.values()), 1)}
    metrics = os.path.join(args.run_dir, "evaluate", "metrics.json")
    if os.path.exists(metrics):
        with open(metrics) as f:
            out["evaluate_metrics"] = json.load(f)
    if args.peak:
        with open(args.peak) as f:
            text = f.read()
        out["peak_memory"] = json.loads(text[text.index("{"):])
    out["command"] = "python benchmarks/run_summary.py " + " ".join(sys.argv[1:])
    json.dump(out, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
