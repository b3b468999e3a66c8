"""Meta-evaluation: several judges side by side on one or more benchmarks, with metrics and a report.

Judges (`evaluate.judges`): this run's trained judge, its base model, any model folder, or any
OpenAI-compatible endpoint. Benchmarks (`evaluate.benchmarks`): the validation split (the teacher's
scores as gold), a user's labelled file (pointwise scores or pairwise winners, human labels as gold),
MT-Bench (responders answer its questions; no gold, so the judges are compared with each other),
injection (the validation split judged with and without a prompt injection appended to each
response: how far it moves each judge's score).

Each judge grades each benchmark on a Ray Data actor pool. Out come `metrics.json` (per judge: the
headline metrics with bootstrap intervals, the aggregate normalised against random guessing, every
metric per scenario), `report.html` with its PNG plots beside it, and one printed table per
benchmark with one row per judge. Rows that could not be judged are the stage's rejects.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from themis_ray.evaluate.benchmarks import load_benchmarks
from themis_ray.evaluate.grading import grade
from themis_ray.evaluate.judges import resolve_judges
from themis_ray.evaluate.report import format_table, write_report
from themis_ray.evaluate.summaries import BenchmarkResult, headline_rows, metrics_json, scenario_rows, summarize
from themis_ray.store import StageResult


def run(cfg, inputs: dict, staging) -> StageResult:
    c, staging = cfg.evaluate, Path(staging)
    judges = resolve_judges(cfg)  # fails on a bad judge before any model loads
    benchmarks = load_benchmarks(cfg, inputs)

    results, parts = [], []  # parts: every graded row (one per record per judge) and every reject
    for bench in benchmarks:
        graded = {judge.name: grade(bench, judge, c) for judge in judges}
        parts += [*graded.values(), bench.rejects]
        result = BenchmarkResult(bench, {name: table.to_pandas() for name, table in graded.items()},
                                 judge_labels={j.name: j.label for j in judges})
        result.summaries = summarize(bench, result.graded, n_boot=c.bootstrap, confidence=c.confidence, seed=c.seed)
        results.append(result)

    metrics = metrics_json(results)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    write_report(staging, results)
    for result in results:
        print(f"\n{result.benchmark.name}: {result.benchmark.source}")
        print(format_table(*headline_rows(result)))
        print(format_table(*scenario_rows(result)))

    parts = [t for t in parts if t.num_rows]
    table = pa.concat_tables(parts, promote_options="default") if parts else None
    rows_in = sum(r.benchmark.records.num_rows * len(judges) + r.benchmark.rejects.num_rows for r in results)
    primary = next((r.benchmark.name for r in results if r.benchmark.kind in ("pointwise", "pairwise")), None)
    injection = next((r for r in results if r.benchmark.kind == "injection"), None)
    return StageResult(table, rows_in=rows_in, extra={
        "judges": {j.name: j.label for j in judges},
        "benchmarks": {r.benchmark.name: r.benchmark.source for r in results},
        "metrics_benchmark": primary,
        "metrics": {j: m["overall"] for j, m in metrics.items() if "overall" in m},
        **({"injection_shift": {j: s["overall"]["score_shift"] for j, s in injection.summaries.items()}}
           if injection else {}),
    })
