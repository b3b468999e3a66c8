"""The executor: turns a stage's processors into Ray Data plans that run storage -> workers -> storage.

A stage declares processors (`RowProcessor`: per-actor setup + `process(rows)`) and hands each one
over as a typed `Step` (arguments, pool, declared engine, partition, statistics); this package runs
them: `map_processor` on an autoscaling actor pool, `run_rows` as read -> map -> write with
resume (and each row id kept once: `drop_duplicates`), `StageSink` for the workers' writes,
`partials` and `map_tasks` for global statistics.
"""

from themis_ray.executor.context import StageContext
from themis_ray.executor.plan import (
    LIGHT_CPUS,
    drop_duplicates,
    drop_written,
    map_groups,
    map_processor,
    map_tasks,
    partials,
    run_rows,
    write,
)
from themis_ray.executor.processor import GenerationProcessor, RowProcessor
from themis_ray.executor.sink import StageSink
from themis_ray.executor.step import Step, StepEngine

__all__ = [
    "LIGHT_CPUS",
    "GenerationProcessor",
    "RowProcessor",
    "StageContext",
    "StageSink",
    "Step",
    "StepEngine",
    "drop_duplicates",
    "drop_written",
    "map_groups",
    "map_processor",
    "map_tasks",
    "partials",
    "run_rows",
    "write",
]
