"""The train stage: the curated train split -> a fine-tuned judge folder in `<run_dir>/train/judge`."""

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
    return StageResult(table, rows_in=train.num_rows, extra={"train": summary})
