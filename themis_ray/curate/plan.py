"""The driver's side of curation: a few map-side aggregations turn the input into a `Plan`, and one
streaming map (`curate_block`) applies it to every block on the workers.

The driver never holds rows: every pass is `reduce(fn, columns, **kwargs)`, the merged figures of
`fn` over every block (`executor.partials` in the stage). The passes, each run only when needed:

1. IFD moments per scenario over the rows past Cherry's IFD > 1: the z-score rule's mean, sd, count.
2. The top-k% cut, exactly: a histogram of the rows' descending keys (value, then id) by their first
   characters finds the bucket where the ceil(k%)-th row lies; that bucket's keys are collected (or,
   when it holds more than `TOP_COLLECT_MAX_ROWS`, histogrammed by their next characters first). The
   cut is one key, so exactly ceil(k% of the rows still in) are kept, ties broken by id.
3. Score and verdict counts per scenario: the rebalancing caps, and keep fractions cap / count.
4. Rows per scenario after rebalancing: the scenario mix's caps and fractions; with the split keys of
   every scenario of at most `EXACT_SPLIT_MAX_ROWS` rows, whose validation share is then
   round(n x validation_fraction) moved to the nearest boundary between source documents, or else
   between instructions, that lies within half of it (`split_cut`), both splits present whenever two
   records are kept. Larger scenarios draw per source document: its rows go to validation when its
   split digest is below the fraction.
5. With dropped-criteria augmentation, the regressions' normal equations over the kept train records;
   after the write, one more pass audits augmentation (copies not made, and why) and measures the
   regressions' validation MAE.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from themis_ray.curate import keys
from themis_ray.curate.augment import (
    AUGMENTATION,
    KIND,
    AugmentPlan,
    Regressions,
    copies_of,
    criteria_to_paraphrase,
    usable_paraphrases,
)
from themis_ray.curate.rules import (
    RULE,
    SPLIT,
    Plan,
    caps,
    decide,
    ifd_column,
    keep_fractions,
    pairwise_mask,
    score_weights,
    verdict_caps,
)
from themis_ray.curate.stats import audit_pass, count_pass, gram_pass, top_pass
from themis_ray.schema import REJECT

EXACT_SPLIT_MAX_ROWS = 10_000  # a scenario this small is split exactly (its split keys visit the driver)
TOP_COLLECT_MAX_ROWS = 100_000  # keys of the top-k boundary bucket collected at most
TOP_WIDTHS = (6, 6, 4)  # characters of the value part of a key histogrammed per round (16 in all)
ID_WIDTH = 8  # then characters of the id, for ties

# reduce(fn, columns=None, **fn_kwargs) -> the merged figures of fn(block, **fn_kwargs) over every block
Reduce = Callable[..., dict]
RULE_COLUMNS = ("id", "scenario", "ifd", "ifd_ppl", "score", "mode", "verdict", "doc_id", "instruction_id")


def zstats(moments: dict) -> dict[str, tuple[float, float, int]]:
    """{scenario: {n, s, ss}} of IFD - 1 -> {scenario: (mean, sd with ddof 1 or NaN, n)}."""
    out = {}
    for scenario, m in moments.items():
        n, s, ss = int(m["n"]), float(m["s"]), float(m["ss"])
        var = max(ss - s * s / n, 0.0) / (n - 1) if n >= 2 else float("nan")
        out[scenario] = (1.0 + s / n, math.sqrt(var) if n >= 2 else float("nan"), n)
    return out


def top_count(live: int, percent: float) -> int:
    """ceil(percent% of live), exactly (no float rounding)."""
    return math.ceil(Fraction(live) * Fraction(str(percent)) / 100)


def find_top_cut(reduce_top: Callable[..., dict], percent: float) -> dict:
    """The key of the last row kept by the top-k% rule: {"cut", "keep", "live", "passes", "by_scenario"}.

    `reduce_top(prefix=, width=)` histograms the keys with `prefix` by their next `width` characters;
    `reduce_top(prefix=, collect=True)` returns those keys. cut None: every row is kept; "": none.
    """
    first = reduce_top(prefix="", width=TOP_WIDTHS[0])
    labels = first.get("labels", {})
    live = sum(labels.values())
    keep = top_count(live, percent)
    out = {"cut": None, "keep": keep, "live": live, "passes": 1, "by_scenario": first.get("live", {})}
    if keep >= live:
        return out
    if keep == 0:
        return {**out, "cut": ""}
    prefix, before, depth = "", 0, 0
    while True:
        width = TOP_WIDTHS[depth] if depth < len(TOP_WIDTHS) else ID_WIDTH
        cum = before
        for label in sorted(labels):
            if cum + labels[label] >= keep:
                break
            cum += labels[label]
        if len(label) < width:  # the key ends inside this window: every row of the bucket has this key
            return {**out, "cut": prefix + label}
        if labels[label] <= TOP_COLLECT_MAX_ROWS:
            found = reduce_top(prefix=prefix + label, collect=True)["keys"]
            out["passes"] += 1
            for key in sorted(found):
                cum += found[key]
                if cum >= keep:
                    return {**out, "cut": key}
            raise RuntimeError("top-k cut: the boundary bucket changed between passes")
        prefix, before, depth = prefix + label, cum, depth + 1
        labels = reduce_top(prefix=prefix, width=TOP_WIDTHS[depth] if depth < len(TOP_WIDTHS) else ID_WIDTH)["labels"]
        out["passes"] += 1


def _check_verdicts(figures: dict, cfg) -> None:
    bad = sum(v.get("invalid", 0) for v in figures.get("verdicts", {}).values())
    if bad and (cfg.rebalance or cfg.swap_pairwise):
        raise ValueError(f"pairwise records need a verdict of A, B or C; {bad} have none")


def plan_rules(cfg, reduce: Reduce) -> tuple[Plan, dict]:
    """cfg: a CurateConfig. The plan of every rule and the split, and the figures behind it (for the
    manifest and the report), from as few passes as the configuration needs."""
    column = ifd_column(cfg)
    weights = score_weights(cfg) if cfg.rebalance else None  # a bad target fails before any pass
    columns = [c for c in RULE_COLUMNS
               if c in ("id", "scenario", "score", "mode", "verdict", "doc_id", "instruction_id", column)]
    plan = Plan(column=column, seed=cfg.seed, drop_ifd_above_one=cfg.drop_ifd_above_one,
                max_ifd_zscore=cfg.max_ifd_zscore, keep_top_percent=cfg.keep_top_percent,
                swap_pairwise=cfg.swap_pairwise)
    figures: dict = {"passes": 0}

    def run(fn, **kwargs) -> dict:
        figures["passes"] += 1
        return reduce(fn, columns=columns, plan=plan, **kwargs)

    bounds: Optional[dict] = None  # rows still in per scenario at the last pass: upper bounds from then on
    if cfg.max_ifd_zscore is not None:
        counted = run(count_pass, moments=True)
        _check_verdicts(counted, cfg)
        plan.zstats = zstats(counted.get("moments", {}))
        figures["zstats"] = plan.zstats
        bounds = counted.get("live", {})
    if cfg.keep_top_percent < 100:
        top = find_top_cut(lambda **kw: reduce(top_pass, columns=columns, plan=plan, **kw), cfg.keep_top_percent)
        figures["passes"] += top["passes"]
        figures["top_k"] = {"live": top["live"], "keep": top["keep"],
                            "cut": keys.value_of_desc_key(top["cut"]) if top["cut"] else None}
        plan.top_cut = top["cut"]
        bounds = top["by_scenario"]
    if cfg.rebalance or bounds is None:
        counted = run(count_pass, scores=cfg.rebalance)
        _check_verdicts(counted, cfg)
        bounds = counted.get("live", {})
        if cfg.rebalance:
            score_keep, caps_used = {}, {}
            for scenario, by_score in counted.get("scores", {}).items():
                counts = {int(k): n for k, n in by_score.items()}
                capped = caps(counts, weights, cfg.rebalance_max_ratio)
                score_keep[scenario] = keep_fractions(counts, capped)
                caps_used[scenario] = {str(k): c for k, c in sorted(capped.items())}
            verdict_keep = {}
            for scenario, by_class in counted.get("verdicts", {}).items():
                capped = verdict_caps(by_class, cfg.swap_pairwise, cfg.rebalance_max_ratio)
                verdict_keep[scenario] = keep_fractions(by_class, capped)
                caps_used.setdefault(scenario, {}).update({f"verdict {k}": c for k, c in capped.items()})
            plan.score_keep, plan.verdict_keep = score_keep, verdict_keep
            figures["rebalance_caps"] = caps_used
    small = sorted(s for s, n in bounds.items() if 0 < n <= EXACT_SPLIT_MAX_ROWS)
    counts = dict(bounds)
    collected: dict = {}
    if cfg.scenario_weights or small:
        counted = run(count_pass, collect_split=tuple(small))
        counts, collected = counted.get("live", {}), counted.get("split_keys", {})
        if cfg.scenario_weights:
            mix_weights = {s: float(cfg.scenario_weights.get(s, 1.0)) for s in counts}
            capped = caps(counts, mix_weights, 1.0)
            plan.mix_keep = keep_fractions(counts, capped)
            figures["mix_caps"] = capped
    plan.exact_split = _exact_split(small, collected, plan, cfg.validation_fraction,
                                    all_exact=all(s in small for s, n in counts.items() if n > 0))
    plan.validation_fraction = cfg.validation_fraction
    figures["split"] = {"exact": sorted(plan.exact_split), "drawn": sorted(s for s, n in counts.items()
                                                                          if n > 0 and s not in plan.exact_split)}
    figures["counts_before_mix"] = counts
    return plan, figures


def _exact_split(small: list[str], collected: dict, plan: Plan, fraction: float, all_exact: bool) -> dict[str, str]:
    """Per small scenario, the largest split key that goes to validation ("" for none), so that
    round(n x fraction) of its kept rows do; when every scenario is split exactly and two or more rows
    are kept, both splits get at least one."""
    kept = {}
    for scenario in small:
        found = sorted(collected.get(scenario, {}))
        if plan.mix_keep is not None and found:
            u = keys.unit([keys.id_of_split_key(k) for k in found], plan.seed, "mix")
            found = [k for k, v in zip(found, u) if v < plan.mix_keep.get(scenario, 1.0)]
        kept[scenario] = found
    n_val = {s: int(round(len(k) * fraction)) for s, k in kept.items()}
    total = sum(len(k) for k in kept.values())
    if all_exact and total >= 2:
        if sum(n_val.values()) == 0:
            donor = next(s for s in sorted(kept) if len(kept[s]) > n_val[s])
            n_val[donor] += 1
        elif sum(n_val.values()) == total:
            donor = next(s for s in sorted(kept) if n_val[s] > 0)
            n_val[donor] -= 1
    cuts = {s: split_cut(kept[s], n_val[s]) for s in small}
    return {s: (kept[s][cuts[s] - 1] if cuts[s] else "") for s in small}


def split_cut(found: list[str], target: int) -> int:
    """How many of a scenario's rows (sorted split keys) go to validation: `target` moved to the
    nearest boundary between source documents within half of it (at least one row), else between
    instructions, else exact. A cut never empties a split that `target` leaves non-empty."""
    n = len(found)
    if target <= 0 or target >= n:
        return target
    slack = max(1, target // 2)
    for level in keys.SPLIT_LEVELS[:-1]:
        groups = [keys.split_level_prefix(k, level) for k in found]
        bounds = [i for i in range(1, n) if groups[i - 1] != groups[i] and abs(i - target) <= slack]
        if bounds:
            return min(bounds, key=lambda i: (abs(i - target), i))
    return target


# ------------------------------------------------------------------------------------ augmentation


def plan_augmentation(cfg, plan: Plan, reduce: Reduce, counts: dict[str, int],
                      paraphrase: Callable[[list[dict]], list[dict]], scenarios_dir=None) -> tuple[AugmentPlan, dict]:
    """cfg: a CurateConfig. The augmentation plan: paraphrases from the model (for the scenarios with
    kept rows), and the regressions from one pass of normal equations. `paraphrase` runs the model over
    criteria rows (the stage runs it on the augment pool)."""
    augment = AugmentPlan.from_config(cfg.augment, seed=cfg.seed, swap_pairwise=cfg.swap_pairwise,
                                      scenarios_dir=scenarios_dir)
    report: dict = {}
    if augment.paraphrase_fraction > 0:
        scenarios = [s for s, n in counts.items() if n > 0 and (plan.mix_keep or {}).get(s, 1.0) > 0]
        asked = criteria_to_paraphrase(scenarios, cfg.augment.paraphrases_per_criterion, scenarios_dir)
        if asked:
            augment.paraphrases, report["paraphrases"] = usable_paraphrases(paraphrase(asked))
    if augment.drop_criteria_fraction > 0:
        columns = [*RULE_COLUMNS, "evaluation"]
        augment.regressions = Regressions(reduce(gram_pass, columns=columns, plan=plan, scenarios_dir=scenarios_dir),
                                          cfg.augment.min_regression_records)
    return augment, report


def audit_augmentation(plan: Plan, augment: AugmentPlan, reduce: Reduce) -> dict:
    """One pass over the kept records: the copies that could not be made (per kind and reason) and the
    validation MAE of the regressions the dropped-criteria copies used."""
    found = reduce(audit_pass, columns=None, plan=plan, augment=augment)
    out: dict = {"augmentation_skipped": dict(sorted(found.get("skipped", {}).items()))}
    if augment.drop_criteria_fraction > 0:
        used, errors = found.get("used", {}), found.get("errors", {})
        by_scenario, total_e, total_n, models = {}, 0.0, 0, 0
        for scenario in sorted(used):
            e = [errors.get(scenario, {}).get(subset, {"e": 0.0, "n": 0}) for subset in used[scenario]]
            s_e, s_n = sum(x["e"] for x in e), sum(x["n"] for x in e)
            by_scenario[scenario] = {"regressions": len(used[scenario]),
                                     "validation_mae": round(s_e / s_n, 4) if s_n else None}
            total_e, total_n, models = total_e + s_e, total_n + s_n, models + len(used[scenario])
        out["criteria_regression"] = {"regressions": models,
                                      "validation_mae": round(total_e / total_n, 4) if total_n else None,
                                      "validation_predictions": total_n, "by_scenario": by_scenario}
    return out


# ------------------------------------------------------------------------------------ the write


def output_schema(input_schema: pa.Schema) -> pa.Schema:
    """The input's columns, then split, augmentation, augmentation_kind, curate_rule, reject_reason."""
    added = (SPLIT, AUGMENTATION, KIND, RULE, REJECT)
    fields = [f for f in input_schema if f.name not in added]
    return pa.schema(fields + [pa.field(name, pa.string()) for name in added])


def curate_block(batch: pa.Table, plan: Plan, augment: AugmentPlan, schema: pa.Schema) -> pa.Table:
    """One block decided: every input row with its split or its rule and reason, then the copies of its
    kept train rows. Runs on the workers (`executor.map_tasks`)."""
    d = decide(batch, plan)
    n = batch.num_rows
    columns = {name: batch[name] for name in batch.column_names if name in schema.names}
    columns.update({SPLIT: pa.array(d.split.tolist(), pa.string()), AUGMENTATION: pa.nulls(n, pa.string()),
                    KIND: pa.nulls(n, pa.string()), RULE: pa.array(d.rule.tolist(), pa.string()),
                    REJECT: pa.array(d.reason.tolist(), pa.string())})
    for field in schema:
        if field.name not in columns:
            columns[field.name] = pa.nulls(n, field.type)
    out = pa.table({f.name: columns[f.name] for f in schema}).cast(schema)
    train = d.live & (d.split == "train")
    pairwise = pairwise_mask(batch)
    ids = [str(i) for i in batch["id"].to_pylist()]
    picks = augment.picked(ids, train & ~pairwise) if augment.copies_pointwise else {}
    pairs = train & pairwise if augment.swap_pairwise else np.zeros(n, dtype=bool)
    wanted = pairs.copy()
    for mask in picks.values():
        wanted |= mask
    if not wanted.any():
        return out
    index = np.flatnonzero(wanted)
    rows = [{**row, SPLIT: "train"} for row in batch.take(pa.array(index, pa.int64())).to_pylist()]
    copies = [copy for _, copy, _, _ in copies_of(rows, {k: m[index] for k, m in picks.items()}, pairs[index], augment)
              if copy is not None]
    if not copies:
        return out
    return pa.concat_tables([out, pa.Table.from_pylist(copies, schema=schema)])
