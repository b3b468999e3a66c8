"""The curate stage: ifd's rows -> kept rows with their split, rejects with their rule, augmented copies.

The rules and their order are in `themis_ray.curate.rules`; how the driver plans them from map-side
aggregations and the workers apply them in one streaming map, in `themis_ray.curate.plan`. Every input
record is either kept (with its split) or rejected (with its `curate_rule` and `reject_reason`): rows in
= kept + rejected. Copies (augmentation, swapped pairs) are extra rows, counted as `augmented`. The
report (`report.md` with PNG plots) is drawn from the aggregated figures.
"""

from __future__ import annotations

from functools import partial

import ray

from themis_ray.curate import plan as curation
from themis_ray.curate.augment import ENGINE_KEY, PARAPHRASE_SCHEMA, CriterionParaphraser
from themis_ray.curate.report import write_report
from themis_ray.curate.stats import score_histograms, step_counts, written_stats
from themis_ray.engines.cache import cache_folder, with_cache
from themis_ray.executor import StageContext, Step, StepEngine, drop_written, map_processor, map_tasks, partials, write
from themis_ray.store import StageResult


def _paraphrase(rows: list[dict], cfg, cache: str | None = None) -> list[dict]:
    """Criteria -> paraphrases, with the model on the augment pool (a few rows per scenario); through
    the run's request cache, so a resumed or forced run reads its paraphrases back instead of asking."""
    engine = with_cache(cfg.engine, cache)
    step = Step(name="curate.augment", processor=CriterionParaphraser, pool=cfg.pool,
                args={"engine_cfg": engine, "sampling": cfg.sampling}, engine=StepEngine(engine, ENGINE_KEY))
    return map_processor(ray.data.from_items(rows), step, PARAPHRASE_SCHEMA).take_all()


def _zscore_figures(zstats) -> dict | None:
    """The z-score rule's statistics per scenario, JSON-safe (no NaN)."""
    if zstats is None:
        return None
    clean = (lambda v: None if v != v else round(v, 6))  # noqa: E731 (NaN != NaN)
    return {s: {"mean": clean(m), "sd": clean(sd), "count": n} for s, (m, sd, n) in sorted(zstats.items())}


def run(ctx: StageContext) -> StageResult:
    c = ctx.cfg.curate
    source = ctx.input("ifd")
    names = set(source.schema().names)

    def reduce(fn, columns=None, **kwargs) -> dict:
        wanted = None if columns is None else [name for name in dict.fromkeys(columns) if name in names]
        return partials(source.dataset(columns=wanted), fn, **kwargs)

    plan, figures = curation.plan_rules(c, reduce)
    augment, augment_report = curation.plan_augmentation(
        c, plan, reduce, figures["counts_before_mix"], partial(_paraphrase, cfg=c.augment, cache=cache_folder(ctx.cfg.cache, ctx.cfg.run_dir)),
        ctx.cfg.scenarios_dir)

    schema = curation.output_schema(source.schema())
    records = source.dataset()
    if ctx.resume:  # blocks written before an interruption stay; their rows (and copies) are not redone
        records = drop_written(records, ctx.store, "id", "id")
    write(map_tasks(records, curation.curate_block, plan=plan, augment=augment, schema=schema), ctx.store, schema,
          stats=partial(written_stats, column=plan.column))
    if augment.copies_pointwise:
        augment_report.update(curation.audit_augmentation(plan, augment, reduce))

    stats = ctx.store.tally().stats
    kept, rejected = stats.get("kept", {}), stats.get("rejected", {})
    steps = step_counts(kept, rejected)
    scores = stats.get("scores", {})
    extra = dict(
        ifd_measure=c.ifd_measure,
        steps=[{k: v for k, v in s.items() if k != "by_scenario"} for s in steps],
        rejected_by_rule={rule: sum(by.values()) for rule, by in sorted(rejected.items())},
        splits=dict(sorted(stats.get("splits", {}).items())),
        score_histogram=score_histograms(scores, ("kept",)),
        score_histogram_before_rebalance=score_histograms(scores, ("kept", "rebalance_score", "rebalance_verdict",
                                                                   "scenario_mix")),
        augmented=dict(sorted(stats.get("augmented", {}).items())),
        ifd_cuts={"top_k": figures.get("top_k"), "zscore": _zscore_figures(figures.get("zstats"))},
        split_exact=figures["split"],
        statistics_passes=figures["passes"],
        **augment_report,
    )
    if steps[0]["remaining"]:
        write_report(ctx.store.uri, c, plan.column, figures, stats, steps, extra)
        extra["report"] = "report.md"
    return StageResult(rows_in=source.num_rows(), units_ok=sum(kept.values()), extra=extra)
