"""Meta-evaluation: several judges side by side on one or more benchmarks, with metrics and a report.

Judges (`evaluate.judges`): this run's trained judge, its base model, any model folder, or any
OpenAI-compatible endpoint. Benchmarks (`evaluate.benchmarks`): the validation split (the teacher's
scores as gold), a user's labelled file (pointwise scores or pairwise winners, human labels as gold),
MT-Bench (responders answer its questions; no gold, so the judges are compared with each other),
injection (the validation split judged with and without a prompt injection appended to each
response: how far it moves each judge's score), and the field's benchmarks read from their published
files (rewardbench2, judgebench, mtbench_human, hhh: each scored by its authors' rule, beside random
and always-longer baselines; `evaluate.field`).

Each judge grades each benchmark as one plan (prepared records -> the judge's actor pool -> parts
written by the workers); rows that cannot be judged are the stage's rejects, written once. The metrics
then need each judge's predictions beside the gold labels in one place (bootstrap intervals, rank
correlations): they read the graded parts' score columns only, never the texts. Out come
`metrics.json` (per judge: the headline metrics with bootstrap intervals, the aggregate normalised
against random guessing, every metric per scenario), `report.html` with its PNG plots beside it, and
one printed table per benchmark with one row per judge.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import pyarrow.parquet as pq

from themis_ray.engines.cache import cache_folder, with_cache
from themis_ray.evaluate.benchmarks import REJECT_SCHEMA, load_benchmarks
from themis_ray.evaluate.grading import grade, graded_partition, graded_schema, graded_stats
from themis_ray.evaluate.judges import resolve_judges
from themis_ray.evaluate.report import format_table, write_report
from themis_ray.evaluate.results import BenchmarkResult, headline_rows, metrics_json, scenario_rows, summarize
from themis_ray.executor import StageContext, write
from themis_ray.store import StageResult, StageStore

# Texts the metrics never read: left on storage when the graded scores are gathered.
TEXT_COLUMNS = {"prompt", "prompt_ba", "judge_output", "judge_output_ba", "instruction", "response",
                "reference", "evaluation", "evaluation_swapped", "raw", "criterion_scores"}


def run(ctx: StageContext) -> StageResult:
    cfg, c, store = ctx.cfg, ctx.cfg.evaluate, ctx.store
    judges = resolve_judges(cfg)  # fails on a bad judge before any model loads
    cache = cache_folder(cfg.cache, cfg.run_dir)  # an endpoint judge pays once per prompt, resumed or not
    judges = [replace(j, engine=with_cache(j.engine, cache)) for j in judges]
    benchmarks = load_benchmarks(cfg, ctx.inputs.get("curate"), store, ctx.resume)

    # The benchmarks' rejects are cheap to find again: a resumed run drops the interrupted run's and
    # writes them after grading. They must not be there while a resumed grade looks for what its judge
    # already wrote: it reads `benchmark` and `judge` from every written part, and they have no judge.
    for bench in benchmarks:
        for path in store.written_files(partition=_rejects_partition(bench)):
            store.fs.delete_file(path)

    results, sampled = [], {}
    for bench in benchmarks:
        bench.num_records = bench.records.count()
        for judge in judges:
            # A resumed run skips a judge that graded the whole benchmark already (no model load).
            if not (ctx.resume and store.rows_written(graded_partition(bench, judge)) >= bench.num_records):
                grade(bench, judge, c, store, resume=ctx.resume, scenarios_dir=cfg.scenarios_dir)
        schema = graded_schema(bench.schema, bench.pairwise)
        share = 1.0 if bench.kind == "field" else min(1.0, c.metric_rows / max(bench.num_records, 1))
        graded = {judge.name: _graded(store, graded_partition(bench, judge), schema, share) for judge in judges}
        if share < 1.0:
            sampled[bench.name] = {"records": bench.num_records,
                                   "sampled": len(next(iter(graded.values()))) if graded else 0}
            print(f"evaluate: {bench.name}: metrics on a sample of {sampled[bench.name]['sampled']} of its "
                  f"{bench.num_records} records (evaluate.metric_rows={c.metric_rows})")
        result = BenchmarkResult(bench, graded, judge_labels={j.name: j.label for j in judges})
        result.summaries = summarize(bench, graded, n_boot=c.bootstrap, confidence=c.confidence, seed=c.seed)
        results.append(result)
    for bench in benchmarks:
        if bench.rejects is not None:
            write(bench.rejects, store, REJECT_SCHEMA, partition=_rejects_partition(bench), stats=graded_stats)

    stats = store.tally().stats
    rows_in = 0
    for bench in benchmarks:
        bench.num_rejects = stats.get("rejected", {}).get(bench.name, 0)
        for judge in judges:
            graded = stats.get("graded", {}).get(bench.name, {}).get(judge.name, 0)
            if graded != bench.num_records:
                raise RuntimeError(f"evaluate lost rows: {judge.name} graded {graded} of the "
                                   f"{bench.num_records} records of {bench.name}")
        rows_in += bench.num_records * len(judges) + bench.num_rejects

    metrics = metrics_json(results)
    with store.local_folder() as folder:
        with open(os.path.join(folder, "metrics.json"), "w") as f:
            f.write(json.dumps(metrics, indent=2))
        write_report(folder, results)
    for result in results:
        print(f"\n{result.benchmark.name}: {result.benchmark.source}")
        print(format_table(*headline_rows(result)))
        print(format_table(*scenario_rows(result)))

    primary = next((r.benchmark.name for r in results if r.benchmark.kind in ("pointwise", "pairwise")), None)
    injection = next((r for r in results if r.benchmark.kind == "injection"), None)
    return StageResult(rows_in=rows_in, extra={
        "judges": {j.name: j.label for j in judges},
        "benchmarks": {r.benchmark.name: r.benchmark.source for r in results},
        "metrics_benchmark": primary,
        **({"metrics_sampled": sampled} if sampled else {}),
        "metrics": {j: m["overall"] for j, m in metrics.items() if "overall" in m},
        **({"injection_shift": {j: s["overall"]["score_shift"] for j, s in injection.summaries.items()}}
           if injection else {}),
    })


def _rejects_partition(bench) -> dict:
    """The partition of a benchmark's own rejects (records no judge could be asked about)."""
    return {"benchmark": bench.name}


def _graded(store: StageStore, partition: dict, schema, share: float = 1.0):
    """One judge's graded rows of one benchmark, without their texts, as a pandas frame; with `share`
    below 1, only the rows whose id digest falls in that share (the same rows for every judge), each
    part filtered as it is read."""
    import pyarrow as pa

    from themis_ray.schema import REJECT

    columns = [n for n in schema.names if n not in TEXT_COLUMNS and n != REJECT]
    files = store.written_files(rejects=False, partition=partition)
    tables = []
    for f in files:
        table = pq.read_table(f, filesystem=store.fs, columns=columns)
        tables.append(table if share >= 1.0 else table.filter(pa.array([in_sample(i, share) for i in
                                                                         table["id"].to_pylist()])))
    return (pa.concat_tables(tables) if tables else pa.schema([schema.field(n) for n in columns]).empty_table()).to_pandas()


def in_sample(record_id, share: float) -> bool:
    """Whether a record is in the metrics' sample: its id's digest, read as a number in [0, 1), below
    `share` (the same records for every judge and every run)."""
    digest = hashlib.blake2b(str(record_id).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") < share * 2**64
