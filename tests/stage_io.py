"""Test helpers: a finished input stage written from a table (by a write task's own code, in this
process), and one stage run the way the pipeline runs it, optionally stopped before its commit as if
the driver had died there."""

from __future__ import annotations

import time
from pathlib import Path

import pyarrow as pa

from themis_ray.executor.sink import StageSink
from themis_ray.schema import REJECT
from themis_ray.store import StageResult, StageStore


def finished_stage(run_dir, name: str, table: pa.Table) -> StageStore:
    """`table` as the finished output of stage `name` in `run_dir` (local path or URI)."""
    if REJECT not in table.column_names:
        table = table.append_column(REJECT, pa.nulls(table.num_rows, pa.string()))
    store = StageStore(str(run_dir), name)
    store.begin({"test": name}, force=True)
    StageSink(store.uri, table.schema).write([table], None)
    store.commit(StageResult(rows_in=table.num_rows), {"test": name}, 0.0)
    return store


def run_one(cfg, name: str, commit: bool = True):
    """Run stage `name` of `cfg` as `pipeline.run_stage` does; (manifest or None, result, store)."""
    from themis_ray.executor import StageContext
    from themis_ray.pipeline import STAGES, fingerprint, init_ray

    stage = STAGES[name]
    store = StageStore(cfg.run_dir, name)
    fp = fingerprint(cfg, stage)
    init_ray(cfg)
    resume = store.begin(fp)
    ctx = StageContext(cfg=cfg, store=store, inputs={n: StageStore(cfg.run_dir, n) for n in stage.inputs},
                       resume=resume)
    start = time.perf_counter()
    result = stage.run(ctx)
    manifest = store.commit(result, fp, time.perf_counter() - start) if commit else None
    return manifest, result, store


def stage_path(store: StageStore) -> Path:
    return Path(store.uri)
