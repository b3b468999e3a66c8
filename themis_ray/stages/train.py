"""The train stage: the curated train split -> a fine-tuned judge folder in `<run_dir>/train/judge`,
with `train_metrics.jsonl` (loss by objective, lr, tokens/s, packing efficiency per step) and
`train_loss.png` beside it; the manifest's `train` entry holds the run's summary."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray.assets import resolve_model
from themis_ray.schema import REJECT
from themis_ray.store import StageResult

JUDGE_DIR = "judge"


def run(cfg, inputs: dict, staging) -> StageResult:
    from themis_ray.train import train_judge

    curated: pa.Table = inputs["curate"]
    train = curated.filter(pc.equal(curated["split"], "train"))
    if train.num_rows == 0:
        raise ValueError("curate left no training records; loosen curate.* or synthesize more data")
    records = train.select(["id", "prompt", "evaluation"]).to_pylist()
    result = train_judge(records, resolve_model(cfg.train.model), Path(staging) / JUDGE_DIR, cfg.train)
    reasons = {r["id"]: r["reason"] for r in result.get("rejected", [])}
    table = train.append_column(REJECT, pa.array([reasons.get(i) for i in train["id"].to_pylist()], pa.string()))
    summary = {k: v for k, v in result.items() if k != "rejected"}
    # The staging folder is renamed into place on commit: name the outputs relative to the stage.
    for key in ("judge_dir", "metrics", "loss_plot"):
        if summary.get(key):
            summary[key] = Path(summary[key]).name
    return StageResult(table, rows_in=train.num_rows, extra={"train": summary})
