"""Row-wise stages and the one place that turns them into Ray Data actor pools.

A stage's processor is a class: its constructor is the per-actor setup (it builds the engine once),
`process(rows)` maps a batch of row dicts to output row dicts, each with `reject_reason` set or not.
`map_rows` runs it over a table as Ray Data `map_batches` on an autoscaling actor pool.
"""

from __future__ import annotations

import os

import pyarrow as pa
import ray

from themis_ray.schema import output_schema, to_table


class RowProcessor:
    stage: str = ""

    def __init__(self, output_schema: pa.Schema):
        self.schema = output_schema

    def process(self, rows: list[dict]) -> list[dict]:
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> pa.Table:
        return to_table(self.process(batch.to_pylist()), self.schema, self.stage)


def map_rows(table: pa.Table, processor: type[RowProcessor], pool, schema: pa.Schema | None = None, **kwargs) -> pa.Table:
    """Run `processor` over the rows of `table` on an actor pool sized by `pool` (a PoolConfig).

    The output keeps the input's columns and adds the stage's, unless `schema` says otherwise.
    """
    schema = schema or output_schema(processor.stage, table.schema)
    if table.num_rows == 0:
        return schema.empty_table()
    # Small blocks so the pool has work to spread; one block per batch keeps actors busy.
    ds = ray.data.from_arrow(table).repartition(max(1, -(-table.num_rows // pool.batch_size)))
    ds = ds.map_batches(
        processor,
        fn_constructor_kwargs={"output_schema": schema, **kwargs},
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size),
        num_cpus=pool.num_cpus,
        num_gpus=pool.num_gpus or None,
    )
    tables = [t for t in (ray.get(ref) for ref in ds.to_arrow_refs()) if t.num_rows]
    return pa.concat_tables(tables).cast(schema) if tables else schema.empty_table()


def engine_label(engine_cfg) -> str:
    return f"{engine_cfg.kind}:{os.path.basename(str(engine_cfg.model).rstrip('/'))}"
