"""The train stage: the curated train split -> a fine-tuned judge folder in `<run_dir>/train/judge`,
with `train_metrics.jsonl` (loss by objective, lr, tokens/s, packing efficiency per step) and
`train_loss.png` beside it; the manifest's `train` entry holds the run's summary.

The stage's rows are the train-split records: each trained record as its id and token count, each
too-long record as a reject with its reason, written by Ray Data workers (rows in = out + rejected).
Everything between storage and the Ray Train workers is a Ray Data plan (`train/data.py`); the
driver plans and counts from Parquet footers.

Resume: an interrupted run with the same fingerprint (a crashed or killed driver) keeps its folder.
When its sequences were complete (`_work/prepared.json`), they are used as they are and Ray Train
restores its run from `_work/ray_train/`, so training continues from the latest checkpoint; when
they were not, the preparation starts again.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import fs
from themis_ray.assets import resolve_model
from themis_ray.executor import StageContext, partials, write
from themis_ray.store import REJECTS, WORK, StageResult

JUDGE_DIR = "judge"


def _train_split(batch: pa.Table) -> dict:
    return {"train": pc.sum(pc.equal(batch["split"], "train")).as_py() or 0}


def _clear_outputs(ctx: StageContext) -> None:
    """What a preparation cut short left: the stage's parts, its rejects and the work folder."""
    for name in fs.children(ctx.store.uri):
        if name.startswith("part-") or name in (REJECTS, WORK):
            fs.delete(ctx.store.file(name))


def run(ctx: StageContext) -> StageResult:
    from themis_ray.train.data import RECORD_SCHEMA, Prepared, prepare_sequences, record_rows
    from themis_ray.train.recipe import LOSS_PLOT, METRICS_FILE, check_memory, check_model_dir, fit, validate

    cfg = ctx.cfg.train
    validate(cfg)
    model_dir = resolve_model(cfg.model)
    check_model_dir(model_dir)
    curate = ctx.input("curate")
    rows_in = int(partials(curate.dataset(columns=["split"]), _train_split).get("train", 0))
    if rows_in == 0:
        raise ValueError("curate left no training records; loosen curate.* or synthesize more data")
    memory = check_memory(model_dir, cfg)  # before any worker starts

    work = ctx.store.file(WORK)
    prepared = Prepared.load(work) if ctx.resume else None
    if prepared is None:
        _clear_outputs(ctx)
        records = curate.dataset(columns=["id", "prompt", "evaluation", "split"])
        prepared = prepare_sequences(records, model_dir, cfg, work)
        write(record_rows(prepared), ctx.store, RECORD_SCHEMA)
        prepared.save()
    else:
        print(f"train: resuming with the prepared {prepared.sequences} sequences of {prepared.records} records")
    if not prepared.sequences:
        raise ValueError(f"no trainable records: all {prepared.rejected} were rejected")
    summary = fit(prepared, model_dir, cfg, output_uri=ctx.store.file(JUDGE_DIR), work_uri=work,
                  metrics_uri=ctx.store.file(METRICS_FILE), loss_plot_uri=ctx.store.file(LOSS_PLOT), memory=memory)
    # Name the outputs relative to the stage folder.
    for key in ("judge_dir", "metrics", "loss_plot"):
        if summary.get(key):
            summary[key] = summary[key].rstrip("/").rsplit("/", 1)[-1]
    return StageResult(rows_in=rows_in, extra={"train": summary})
