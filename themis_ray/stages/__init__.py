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

from themis_ray.engines import build_engine, gpus_per_engine, preflight
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


class GenerationProcessor(RowProcessor):
    """A processor whose work is one `generate` call: requests from rows, then rows from completions.

    Split this way, the same prompt building and parsing run with any engine in `process`, and with
    `engine: vllm` through ray.data.llm's vLLM processor (see `vllm_batch`), where no engine is built
    here (`with_engine=False`).
    """

    sampling = None  # the SamplingConfig of the generate call

    def __init__(self, output_schema: pa.Schema, engine_cfg, with_engine: bool = True):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg, f"{self.stage}.engine") if with_engine else None

    def conversations(self, rows: list[dict]) -> list:
        raise NotImplementedError

    def parse(self, rows: list[dict], completions: list) -> list[dict]:
        raise NotImplementedError

    def process(self, rows: list[dict]) -> list[dict]:
        return self.parse(rows, self.engine.generate(self.conversations(rows), self.sampling))


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
    A `vllm` engine is checked on the driver first (installed, enough GPUs in the cluster), each actor
    gets the GPUs it needs, and a `GenerationProcessor` runs through ray.data.llm instead.
    """
    schema = schema or output_schema(processor.stage, table.schema)
    engine_cfg, where = _engine_config(processor, kwargs)
    if engine_cfg is not None:
        preflight(engine_cfg, where)  # before any actor waits for a GPU that is not there
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
    if engine_cfg is not None and engine_cfg.kind == "vllm" and issubclass(processor, GenerationProcessor):
        from themis_ray.stages.vllm_batch import map_generation

        ds = map_generation(ds, processor, pool, engine_cfg, schema, kwargs)
    else:
        ds = _map_actors(ds, processor, pool, schema, calls_per_actor, engine_cfg, kwargs)
    tables = [done]
    for block in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        block = block.cast(schema)
        if checkpoint is not None and block.num_rows:
            # Written before anything else can fail: a paid-for answer is never lost.
            pq.write_table(block, checkpoint / f"part-{uuid.uuid4().hex}.parquet")
        tables.append(block)
    return pa.concat_tables(tables)


def _map_actors(ds, processor, pool, schema, calls_per_actor, engine_cfg, kwargs):
    """The processor as `map_batches` on an autoscaling actor pool; each actor builds its engine once."""
    return ds.map_batches(
        processor,
        fn_constructor_kwargs={"output_schema": schema, **kwargs},
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                           **({"enable_true_multi_threading": True,
                                               "max_concurrent_calls_per_actor": calls_per_actor}
                                              if calls_per_actor > 1 else {})),
        num_cpus=pool.num_cpus,
        # A vllm engine's actor holds the GPUs it runs on, whatever the pool says.
        num_gpus=max(pool.num_gpus, gpus_per_engine(engine_cfg) if engine_cfg is not None else 0) or None,
        resources=dict(getattr(pool, "resources", None) or {}) or None,
    )


def _engine_config(processor: type[RowProcessor], kwargs: dict):
    """The engine config a processor builds its engine from, and its name for error messages.

    Processors take it as `engine_cfg`, or inside a `responder`.
    """
    if kwargs.get("engine_cfg") is not None:
        return kwargs["engine_cfg"], f"{processor.stage}.engine"
    responder = kwargs.get("responder")
    if responder is not None and getattr(responder, "engine", None) is not None:
        return responder.engine, f"{processor.stage}.responders[{responder.name}].engine"
    return None, processor.stage


def _accepted(checkpoint: Path, schema: pa.Schema) -> pa.Table:
    """Rows a previous run finished and accepted (its rejects are tried again)."""
    parts = [pq.read_table(p).cast(schema) for p in sorted(checkpoint.glob("part-*.parquet"))]
    done = pa.concat_tables(parts) if parts else schema.empty_table()
    return done.filter(pc.is_null(done[REJECT]))


def engine_label(engine_cfg) -> str:
    return f"{engine_cfg.kind}:{os.path.basename(str(engine_cfg.model).rstrip('/'))}"
