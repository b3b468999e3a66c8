"""Stages as Ray Data plans: storage -> workers -> storage, with the driver only planning and counting.

- `map_processor`: a stage's `Step` (processor, arguments, pool, declared engine) as `map_batches` on
  an autoscaling actor pool (the engine is built once per actor), or through ray.data.llm when the
  engine asks for it.
- `run_rows`: read -> skip what an interrupted run already wrote -> map -> write, one plan; then,
  for a one-row-per-input step whose footers count more rows than its input, `drop_duplicates`.
- `map_tasks`, `map_groups`, `partials`: light maps, groups brought together by a shuffle, and
  map-side aggregations (each block reduced to a few numbers, merged on the driver) for the stages
  that need global statistics before they can decide.

This package is the only place that calls `map_batches`.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Mapping, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from tqdm.auto import tqdm

from themis_ray import fs
from themis_ray.engines import (batch_generation_route, batches_in_flight, check_scores_text, gpus_per_engine,
                               preflight)
from themis_ray.executor.processor import GenerationProcessor
from themis_ray.executor.sink import StageSink, part_name
from themis_ray.executor.step import Stats, Step
from themis_ray.store import StageStore, merge_stats

log = logging.getLogger(__name__)

# Reads, writes and light maps take a sliver of a CPU each, so they never hold the CPUs the actor
# pools need (on a 2-CPU machine a whole CPU per read task would starve them).
LIGHT_CPUS = 0.25


# A block holds at most this many batches: fewer, larger blocks cost the driver less per row (Ray keeps
# state per task and block: 64-row blocks grew a plain plan's driver by 46 MB over 300k rows, 1,000-row
# blocks by 3 MB), while a crash still loses only the batch each task was running.
BATCHES_PER_BLOCK = 16


def rows_per_block(batch_size: int, input_rows: Optional[int], tasks_at_once: int) -> int:
    """Rows per block: whole batches, as many as leave four blocks per task the pool can run at once
    (every actor and every concurrent call has work, and the last round's idle slots cost little), at
    most BATCHES_PER_BLOCK batches."""
    if not input_rows:
        return batch_size
    batches = input_rows // (batch_size * max(1, tasks_at_once) * 4)
    return batch_size * max(1, min(BATCHES_PER_BLOCK, batches))


def actor_gpus(step: Step) -> int:
    """GPUs each of the step's actors holds: the pool's, or more when its declared engine needs them."""
    engine = step.engine_config
    return max(step.pool.num_gpus, gpus_per_engine(engine) if engine is not None else 0)


def preflight_step(step: Step) -> None:
    """The step's declared engine checked on the driver (installed, enough GPUs in the cluster, able
    to score text where the step asks it to)."""
    _warn_if_pool_takes_every_cpu(step)
    if step.engine is not None:
        if step.engine.scores:
            check_scores_text(step.engine.config, step.engine.key, step.name)
        preflight(step.engine.config, step.engine.key)


def _warn_if_pool_takes_every_cpu(step: Step) -> None:
    """An actor that holds every CPU of a fixed cluster leaves none for the step's own light tasks (the
    repartition before it, the writes after): the plan waits forever without an error. A cluster that
    may still grow (no CPUs yet, or an autoscaler) is not warned about."""
    cpus = ray.cluster_resources().get("CPU", 0) if ray.is_initialized() else 0
    if 0 < cpus < step.pool.num_cpus + LIGHT_CPUS:
        log.warning("%s: pool.num_cpus=%g leaves less than %g of the cluster's %g CPUs for Ray Data's own "
                    "tasks; unless the cluster grows, the step waits forever. Give the actor fewer CPUs "
                    "(engine.num_threads sets its threads).", step.name, step.pool.num_cpus, LIGHT_CPUS, cpus)


def map_processor(ds, step: Step, schema: pa.Schema, sink: Optional[StageSink] = None,
                  input_rows: Optional[int] = None):
    """`ds` through the step's processor on an actor pool sized by `step.pool`; a lazy Dataset.

    With `sink`, each actor writes its output batch as parts before the call returns (and the dataset
    holds one row of counts per batch): an answer is on storage the moment its batch is done, never
    waiting in a queue where a crash would lose it. The step's declared engine is checked on the driver
    first (a vllm engine: installed, enough GPUs in the cluster), each actor gets the GPUs it needs, and
    a `GenerationProcessor` on vllm runs through ray.data.llm instead. With a remote engine each actor
    runs several batches at once on threads, so a batch waiting on one slow request does not hold the
    endpoint's other slots idle (the engine caps the requests in flight).
    """
    pool, engine_cfg = step.pool, step.engine_config
    preflight_step(step)  # before any actor waits for a GPU that is not there
    calls = batches_in_flight(engine_cfg) if engine_cfg is not None else 1
    # Blocks of whole batches sized by the input's rows (`input_rows`, when the caller knows them), so
    # the pool spreads the work however the input was cut into files.
    ds = ds.repartition(target_num_rows_per_block=rows_per_block(pool.batch_size, input_rows, pool.max_size * calls))
    if engine_cfg is not None and batch_generation_route(engine_cfg) and issubclass(step.processor, GenerationProcessor):
        from themis_ray.executor.vllm_batch import map_generation

        out = map_generation(ds, step, schema)
        return map_tasks(out, _write_batch, sink=sink) if sink is not None else out
    fn, constructor = ProcessorActor, {"step": step, "schema": schema, "sink": sink}
    return ds.map_batches(
        fn,
        fn_constructor_kwargs=constructor,
        batch_size=pool.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=pool.min_size, max_size=pool.max_size,
                                           **({"enable_true_multi_threading": True,
                                               "max_concurrent_calls_per_actor": calls} if calls > 1 else {})),
        num_cpus=pool.num_cpus,
        num_gpus=actor_gpus(step) or None,
        resources=dict(getattr(pool, "resources", None) or {}) or None,
    )


# Per written batch: rows out, rows rejected, and the input rows they came from (the progress bar's unit).
COUNTS = pa.schema([("rows", pa.int64()), ("rejected", pa.int64()), ("inputs", pa.int64())])


class ProcessorActor:
    """One actor of a step's pool: builds the processor once; with a sink, writes each output batch
    itself before the call returns."""

    def __init__(self, step: Step, schema: pa.Schema, sink: Optional[StageSink]):
        self.processor, self.sink = step.build(schema), sink
        self.key = step.processor.resume_key[0] if step.processor.resume_key else None

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = self.processor(batch)
        if self.sink is None:
            return out
        # Named by its input rows' keys: a batch Ray runs again after an actor died replaces its parts.
        name = part_name(batch[self.key], self.sink.partition) if self.key in batch.column_names else None
        return _write_batch(out, self.sink, name, inputs=batch.num_rows)


def _write_batch(batch: pa.Table, sink: StageSink, name: Optional[str] = None,
                 inputs: Optional[int] = None) -> pa.Table:
    """Write one output batch; `inputs`: the input rows it answers (None: one per output row)."""
    counts = sink.write([batch], None, name)
    inputs = counts["rows"] + counts["rejected"] if inputs is None else inputs
    return pa.table({"rows": [counts["rows"]], "rejected": [counts["rejected"]], "inputs": [inputs]}, schema=COUNTS)


def map_tasks(ds, fn: Callable[[pa.Table], pa.Table], **fn_kwargs):
    """A light, stateless map over Arrow batches as Ray tasks (no model, a sliver of a CPU)."""
    return ds.map_batches(fn, fn_kwargs=fn_kwargs or None, batch_format="pyarrow", batch_size=None,
                          num_cpus=LIGHT_CPUS)


# Rows per hash-shuffle partition: Ray Data's default is a fixed 200 partitions (an aggregator each),
# which costs ~15 s of start-up on a few dozen rows; the partitions grow with the rows instead.
ROWS_PER_PARTITION = 50_000


def shuffle_partitions(rows: int) -> int:
    """Hash-shuffle partitions for `rows` input rows: one per ROWS_PER_PARTITION, at most Ray Data's
    default (DataContext.default_hash_shuffle_parallelism)."""
    cap = ray.data.DataContext.get_current().default_hash_shuffle_parallelism
    return max(1, min(cap, -(-rows // ROWS_PER_PARTITION)))


def map_groups(ds, key: str, fn: Callable[..., pa.Table], rows: int, **fn_kwargs):
    """`fn(group)` over the rows of each `key` value, brought together by Ray Data's hash shuffle into
    partitions sized by `rows` (the input's row count, known to the caller from manifests)."""
    return ds.groupby(key, num_partitions=shuffle_partitions(rows)).map_groups(
        fn, fn_kwargs=fn_kwargs or None, batch_format="pyarrow", num_cpus=LIGHT_CPUS)


def partials(ds, fn: Callable[..., dict], **fn_kwargs) -> dict:
    """Map-side aggregation: `fn(batch, **fn_kwargs)` reduces each block to summable figures (a dict
    of numbers or nested dicts of numbers), and the driver merges one small dict per block."""

    def reduce_block(batch: pa.Table) -> pa.Table:
        return pa.table({"partial": [json.dumps(fn(batch, **fn_kwargs))]})

    merged: dict = {}
    for row in map_tasks(ds, reduce_block).iter_rows():
        merged = merge_stats(merged, json.loads(row["partial"]))
    return merged


def write(ds, store: StageStore, schema: pa.Schema, partition: Optional[Mapping[str, str]] = None,
          stats: Optional[Stats] = None) -> tuple[int, int]:
    """Workers write `ds` into the stage folder, rejects apart, its parts recording `partition`;
    returns (rows written, rows rejected)."""
    sink = StageSink(store.uri, schema, partition=partition, stats=stats)
    ds.write_datasink(sink, ray_remote_args={"num_cpus": LIGHT_CPUS})
    return sink.rows_out, sink.rows_rejected


def drop_written(ds, store: StageStore, in_key: str, out_key: str, partition: Optional[Mapping[str, str]] = None):
    """`ds` less the rows whose `in_key` is already written as `out_key` (accepted or rejected) in the
    stage folder. The written keys are loaded by a Ray task into the object store as one sorted array
    that every filter task shares, never by the driver; `partition` narrows the parts considered to
    those of one partition (one responder's answers, say)."""
    files = store.written_files(partition=partition)
    if not files:
        return ds
    keys = _written_keys.remote(store.uri, files, out_key)
    return map_tasks(ds, _drop_keys, keys=keys, column=in_key)


@ray.remote(num_cpus=LIGHT_CPUS)
def _written_keys(stage_uri: str, files: list[str], column: str) -> np.ndarray:
    filesystem, _ = fs.resolve(stage_uri)
    found = []
    for path in files:
        if column not in pq.read_schema(path, filesystem=filesystem).names:
            continue  # a part of other rows (a benchmark's rejects, say): none of its rows is one of ours
        found.append(pq.read_table(path, filesystem=filesystem, columns=[column])[column].combine_chunks())
    values = pa.concat_arrays([a.cast(pa.string()) for a in found]).drop_null() if found else pa.array([], pa.string())
    return np.unique(np.asarray(values.to_pylist(), dtype=str))


def _drop_keys(batch: pa.Table, keys, column: str) -> pa.Table:
    if isinstance(keys, ray.ObjectRef):
        keys = ray.get(keys)
    if not len(keys) or not batch.num_rows:
        return batch
    wanted = np.asarray(batch[column].cast(pa.string()).fill_null("").to_pylist(), dtype=str)
    at = np.clip(np.searchsorted(keys, wanted), 0, len(keys) - 1)
    return batch.filter(pa.array(keys[at] != wanted))


def run_rows(source, step: Step, store: StageStore, schema: pa.Schema, *, resume: bool = False,
             before: Optional[Callable] = None, total: Optional[int] = None,
             retry_rejects: bool = False) -> tuple[int, int]:
    """One row-wise plan: `source` (a Dataset) -> unwritten rows -> `before` (more steps, e.g. another
    pool) -> the step's processor on its pool, each actor writing its batches' parts as it finishes
    them. With `resume`, input rows whose unit of work (`processor.resume_key`) is already written in
    the step's partition are not sent again; with `retry_rejects` too, the rejects written so far are
    dropped first and their rows sent again. With `total` (rows expected), a progress bar shows rows/s
    and the time left. Returns the rows this plan wrote (accepted, rejected), counted from one small row
    per batch. `total` also sizes the plan's blocks (`rows_per_block`).

    Exactly once: a batch Ray runs again writes parts of the same name (see `ProcessorActor`), and when
    the footers of a one-row-per-input step count more rows than `total` (a batch that ran again cut
    otherwise), `drop_duplicates` keeps each row id once before the stage commits."""
    if resume and retry_rejects:
        for path in store.reject_files_written(partition=step.partition):
            store.fs.delete_file(path)
    if resume and step.processor.resume_key:
        source = drop_written(source, store, *step.processor.resume_key, partition=step.partition)
    if before is not None:
        source = before(source)
    sink = StageSink(store.uri, schema, partition=step.partition, stats=step.stats)
    written = rejected = 0
    counts = map_processor(source, step, schema, sink=sink, input_rows=total)
    done_before = 0  # a resumed step's bar starts at the rows its earlier run wrote
    if resume and total is not None and step.processor.one_row_per_input:
        done_before = min(total, store.rows_written(step.partition or {}))
    with tqdm(total=total, initial=done_before, unit="rows", desc=step.name, disable=total is None) as bar:
        for batch in counts.iter_batches(batch_size=None, batch_format="pyarrow"):
            done, failed = pc.sum(batch["rows"]).as_py() or 0, pc.sum(batch["rejected"]).as_py() or 0
            written, rejected = written + done, rejected + failed
            bar.update(pc.sum(batch["inputs"]).as_py() or 0)  # input rows, as `total` counts them
    if (total is not None and step.processor.one_row_per_input and "id" in schema.names
            and store.rows_written(step.partition or {}) > total):
        drop_duplicates(store, step.partition, step.stats)
    return written, rejected


def drop_duplicates(store: StageStore, partition: Optional[Mapping[str, str]] = None,
                    stats: Optional[Stats] = None, column: str = "id") -> int:
    """Keep each `column` value once among the parts written so far (of `partition`): an accepted row
    before a rejected one, else the first part in name order. The parts holding a second copy are
    rewritten without it, by a Ray task (the ids pass through that task, never the driver), their
    footers' statistics recomputed with `stats`. Returns the rows dropped."""
    files = store.written_files(partition=partition)  # accepted parts first, then rejects
    rejects = set(store.reject_files_written(partition=partition))
    dropped = ray.get(_drop_duplicates.remote(store.uri, files, [f in rejects for f in files], column, stats))
    store.forget_tally()
    return dropped


@ray.remote(num_cpus=LIGHT_CPUS)
def _drop_duplicates(stage_uri: str, files: list[str], rejected: list[bool], column: str,
                     stats: Optional[Stats]) -> int:
    from themis_ray.executor.sink import rewrite_part

    filesystem, _ = fs.resolve(stage_uri)
    seen: set = set()
    dropped = 0
    for path, is_reject in zip(files, rejected):
        ids = pq.read_table(path, filesystem=filesystem, columns=[column])[column].to_pylist()
        keep = []
        for value in ids:
            keep.append(value not in seen)
            seen.add(value)
        if all(keep):
            continue
        dropped += keep.count(False)
        rewrite_part(filesystem, path, pa.array(keep), is_reject, stats)
    return dropped
