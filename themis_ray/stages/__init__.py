"""Row-wise stages and the one place that turns them into Ray Data actor pools.

A stage's processor is a class: its constructor is the per-actor setup (it builds the engine once),
`process(rows)` maps a batch of row dicts to output row dicts, each with `reject_reason` set or not.
`map_rows` runs it over a table as Ray Data `map_batches` on an autoscaling actor pool.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from themis_ray.schema import REJECT, output_schema, to_table


class RowProcessor:
    stage: str = ""
    # (input column, output column) naming the same unit of work: a checkpointed run skips input rows
    # whose key already has an accepted output row. None: the processor cannot resume.
    resume_key: tuple[str, str] | None = None

    def __init__(self, output_schema: pa.Schema):
        self.schema = output_schema

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()), self.schema, self.stage)


def map_rows(
    table: pa.Table,
    processor: type[RowProcessor],
    pool,
    schema: pa.Schema | None = None,
    checkpoint: Path | None = None,
    calls_per_actor: int = 1,
    **kwargs,
) -> pa.Table:
    """Run `processor` over the rows of `table` on an actor pool sized by `pool` (a PoolConfig).

    The output keeps the input's columns and adds the stage's, unless `schema` says otherwise.
    With `checkpoint`, every finished block is written there as soon as it arrives, and a run that
    finds blocks there (after a crash or an interrupt) processes only the rows not yet accepted.
    With `calls_per_actor` > 1 each actor runs that many batches at once on threads: only for a
    processor that is thread-safe and waits on I/O (a remote engine), so the next batch's requests go
    out while the last ones of the previous batch are still in flight.
    """
    schema = schema or output_schema(processor.stage, table.schema)
    done = schema.empty_table()
    if checkpoint is not None and processor.resume_key:
        checkpoint.mkdir(parents=True, exist_ok=True)
        done = _accepted(checkpoint, schema)
        in_key, out_key = processor.resume_key
        table = table.filter(pc.invert(pc.is_in(table[in_key], done[out_key])))
    if table.num_rows == 0:
        return done
    # Small blocks so the pool has work to spread; one block per batch keeps actors busy.
    ds = ray.data.from_arrow(table).repartition(max(1, -(-table.num_rows // pool.batch_size)))
    ds = ds.map_batches(
        processor,
        fn_constructor_kwargs={"output_schema": schema, **kwargs},
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                           **({"enable_true_multi_threading": True,
                                               "max_concurrent_calls_per_actor": calls_per_actor}
                                              if calls_per_actor > 1 else {})),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
        resources=dict(getattr(pool, "resources", None) or {}) or None,
    )
    tables = [done]
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        block = block.cast(schema)
        if checkpoint is not None and block.num_rows:
            # Written before anything else can fail: a paid-for answer is never lost.
            pq.write_table(block, checkpoint / f"part-{uuid.uuid4().hex}.parquet")
        tables.append(block)
    return pa.concat_tables(tables)


def _accepted(checkpoint: Path, schema: pa.Schema) -> pa.Table:
    """Rows a previous run finished and accepted (its rejects are tried again)."""
    parts = [pq.read_table(p).cast(schema) for p in sorted(checkpoint.glob("part-*.parquet"))]
    done = pa.concat_tables(parts) if parts else schema.empty_table()
    return done.filter(pc.is_null(done[REJECT]))


def engine_label(engine_cfg) -> str:
    return f"{engine_cfg.kind}:{os.path.basename(str(engine_cfg.model).rstrip('/'))}"
