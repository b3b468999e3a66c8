"""The ifd stage with the hf engine at growing N: the driver's peak memory should not grow with rows.

Each run writes a `label` stage of N evaluated records (ten scenarios, realistic evaluation prompts
and answers) and runs `themis-ray ifd --config configs/quickstart.yaml run_dir=...` as a user does
(local Ray, the embedded SmolLM2-135M, one actor), recording the stage's records/s and the peak RSS of
the driver process itself (its Ray workers hold the model; the driver should hold only the plan).

    python benchmarks/scale_ifd.py [--sizes 20,80,320] [--out benchmarks/results/scale_ifd.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa

from _endpoint import ROOT, THEMIS, machine, run_measured, write_json

from themis_ray import judging
from themis_ray.executor.sink import StageSink
from themis_ray.scenarios import load_scenarios
from themis_ray.schema import REJECT
from themis_ray.store import StageResult, StageStore

PART = 40


def label_stage(run_dir: Path, n: int) -> None:
    scenarios = sorted(load_scenarios())
    store = StageStore(str(run_dir), "label")
    store.begin({"bench": n}, force=True)
    for start in range(0, n, PART):
        rows = []
        for i in range(start, min(n, start + PART)):
            scenario = scenarios[i % len(scenarios)]
            row = {"id": f"l{i:06d}", "instruction": f"Question {i}: how does a Python dictionary keep its keys?",
                   "response": "It hashes each key and stores it in a table; " * (1 + i % 4), "scenario": scenario,
                   "mode": "single", "evaluation": f"[[{1 + i % 5}]] The answer is partly right. " * (1 + i % 3)}
            row["prompt"] = judging.render_prompt(judging.request_from_row(row, mode="single"))
            rows.append(row)
        table = pa.Table.from_pylist(rows)
        table = table.append_column(REJECT, pa.nulls(table.num_rows, pa.string()))
        StageSink(store.uri, table.schema).write([table], None)
    store.commit(StageResult(rows_in=n), {"bench": n}, 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="20,80,320")
    parser.add_argument("--out", default="benchmarks/results/scale_ifd.json")
    args = parser.parse_args()
    doc: dict = {"command": "python benchmarks/scale_ifd.py " + " ".join(sys.argv[1:]), "machine": machine()}
    with tempfile.TemporaryDirectory(prefix="scale-ifd-") as tmp:
        for n in map(int, args.sizes.split(",")):
            run_dir = Path(tmp) / f"run-{n}-{time.time_ns()}"
            label_stage(run_dir, n)
            measured = run_measured([THEMIS, "ifd", "--config", str(ROOT / "configs" / "quickstart.yaml"),
                                     f"run_dir={run_dir}"])
            manifest = StageStore(str(run_dir), "ifd").manifest()
            doc[str(n)] = {"records": n, "scored": manifest["rows_out"], "rejected": manifest["rows_rejected"],
                           "stage_wall_s": manifest["wall_s"], "records_per_s": round(n / manifest["wall_s"], 2),
                           **measured}
            print(json.dumps({n: doc[str(n)]}), flush=True)
    sizes = [k for k in doc if k.isdigit()]
    doc["driver_rss_growth_mb"] = round(doc[sizes[-1]]["driver_peak_rss_mb"] - doc[sizes[0]]["driver_peak_rss_mb"], 1)
    doc["machine"]["load_avg_1m_end"] = machine()["load_avg_1m"]
    write_json(Path(args.out), doc)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
