"""Graded records -> the numbers a judge-builder reads: headline metrics with confidence intervals, the
aggregate normalised against random guessing, per-scenario tables, and agreement between judges.

`metrics.json` is keyed by judge. Each judge has `benchmarks` ({benchmark: its summary}); `overall`
and `by_scenario` at the judge's top level repeat its first labelled benchmark (named in
`benchmark`), so a reader of a single-benchmark run need not know the others exist.

Aggregate. Each metric is mapped linearly so that random guessing scores 0 and a perfect judge 1,
then the mapped values are averaged (`metrics.aggregate`). "Random guessing" is uniform predictions
over the scale (pointwise) or over A/B/tie (pairwise), scored against the gold labels at hand, so a
skewed label distribution moves the baseline rather than flattering the judge. A correlation that is
undefined because the judge predicted one constant score counts as random (0), not as missing.
Pointwise quality metrics (MAE, Agr, accuracy, correlations) and pairwise accuracies are over parsed
records; read them with `parse_rate`. The aggregate is over every record: an unparsed verdict or
score earns what random guessing earns (0), or less when the parsed ones are worse than random
(`metrics.credit_unparsed`), so a judge that parses 1% of the records cannot aggregate above 0.01.
`aggregate_parsed` is the same mean over the parsed records alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from themis_ray.evaluate import metrics as M

CORRELATIONS = ("pearson", "spearman", "kendall")
POINTWISE_COLUMNS = ["n", "parse_rate", "mae", "agreement", "accuracy", "pearson", "spearman", "kendall",
                     "score_entropy", "collapsed", "aggregate"]
PAIRWISE_COLUMNS = ["n", "parse_rate", "accuracy", "accuracy_without_ties", "position_consistency", "tie_rate",
                    "longer_wins_share", "gold_longer_wins_share", "score_entropy", "collapsed", "aggregate"]
UNLABELLED_COLUMNS = ["n", "parse_rate", "mean_score", "score_entropy", "collapsed"]
INJECTION_COLUMNS = ["n", "n_both_parsed", "score_shift", "raised_share", "expected_shift", "parse_rate_clean",
                     "parse_rate_injected"]
PAIRWISE_IDEALS = {"accuracy": 1.0, "accuracy_without_ties": 1.0, "position_consistency": 1.0}
CI_METRICS = {"pointwise": ("mae", "agreement", "aggregate"), "pairwise": ("accuracy", "accuracy_without_ties")}


@dataclass
class BenchmarkResult:
    benchmark: Any  # benchmarks.Benchmark
    graded: dict[str, pd.DataFrame]  # judge -> its graded records
    summaries: dict[str, dict] = field(default_factory=dict)  # judge -> {"overall", "by_scenario", ...}
    judge_labels: dict[str, str] = field(default_factory=dict)  # judge -> "hf:/path/to/model"


def json_safe(value: Any) -> Any:
    """NaN and infinities -> None, numpy scalars -> Python, tuples -> lists: valid, plain JSON."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.bool_):
        return bool(value)
    return value


# ------------------------------------------------------------------------------------ pointwise


def _pointwise_aggregate(m: dict, baselines: dict, parsed_only: bool = False) -> float:
    """The aggregate over every record (unparsed ones credited as random or worse), or `parsed_only`."""
    values = {k: m[k] for k in M.POINTWISE_METRICS}
    if m["n_parsed"] >= 2:
        for k in CORRELATIONS:
            if values[k] is None or math.isnan(values[k]):
                values[k] = baselines[k]  # a constant prediction ranks nothing: as good as random
    parse_rate = None if parsed_only else m["parse_rate"]
    return M.aggregate(values, baselines, M.POINTWISE_IDEALS, skipna=True, parse_rate=parse_rate)


def pointwise_summary(pred, gold, expected=None, scale=(1, 5), n_boot: int = 0, confidence: float = 0.95,
                      seed: int = 0, n_draws: int = 200) -> dict:
    """Every pointwise metric, the random baseline of each, the aggregate and (n_boot > 0) CIs."""
    p, g = M.to_scores(pred, scale), M.to_scores(gold)
    m = M.pointwise_metrics(p, g, scale)
    has_gold = ~np.isnan(g)
    m.update(M.score_spread(p[has_gold]))
    baselines = M.pointwise_baselines(g[has_gold], (int(scale[0]), int(scale[1])), n_draws=n_draws, seed=seed) \
        if has_gold.any() else {k: math.nan for k in M.POINTWISE_METRICS}
    m["aggregate"] = _pointwise_aggregate(m, baselines) if m["n"] else math.nan
    m["aggregate_parsed"] = _pointwise_aggregate(m, baselines, parsed_only=True) if m["n_parsed"] else math.nan
    m["random"] = baselines
    if expected is not None:
        e = M.to_scores(expected, scale)
        if np.any(~np.isnan(e) & has_gold):
            m["expected_mae"] = M.mae(e, g)
            m["expected_pearson"] = M.pearson(e, g)
            m["expected_n"] = int(np.sum(~np.isnan(e) & has_gold))
    if n_boot > 0 and has_gold.any():
        alpha = 1 - confidence
        p, g = p[has_gold], g[has_gold]

        def agg(x, y):
            return _pointwise_aggregate(M.pointwise_metrics(x, y, scale), baselines)

        for name, fn in (("mae", M.mae), ("agreement", M.agreement), ("aggregate", agg)):
            m[f"{name}_ci"] = list(M.bootstrap_ci(p, g, fn, n=n_boot, alpha=alpha, seed=seed))
    return m


# ------------------------------------------------------------------------------------- pairwise


def pairwise_summary(verdict, gold, verdict_ab=None, verdict_ba=None, len_a=None, len_b=None, n_boot: int = 0,
                     confidence: float = 0.95, seed: int = 0, n_draws: int = 200) -> dict:
    """Accuracy with and without ties, position consistency, tie rate, length bias, aggregate, CIs.

    `verdict` is the combined verdict; `verdict_ab`/`verdict_ba` the two orders as the judge wrote them.
    """
    v, g = M.to_verdicts(verdict), M.to_verdicts(gold)
    m = M.pairwise_metrics(v, g, len_a=len_a, len_b=len_b)
    m.update(M.score_spread(v))
    if verdict_ab is not None and verdict_ba is not None:
        m["position_consistency"] = M.position_consistency(verdict_ab, M.unswap(verdict_ba))
        m["accuracy_single_order"] = M.pairwise_accuracy(verdict_ab, g)
    has_gold = np.array([x is not None for x in g], dtype=bool)
    gold_known = g[has_gold]

    def without_ties(x, y):
        return M.pairwise_accuracy(x, y, with_ties=False)

    baselines = {
        "accuracy": M.random_baseline(gold_known, M.VERDICTS, M.pairwise_accuracy, n_draws, seed),
        "accuracy_without_ties": M.random_baseline(gold_known, M.VERDICTS, without_ties, n_draws, seed),
        "position_consistency": 1 / len(M.VERDICTS),  # two independent uniform verdicts agree 1 time in 3
    }
    scored = {k: m[k] for k in PAIRWISE_IDEALS if m.get(k) is not None}
    # Accuracies are over parsed verdicts; position consistency already counts a missing verdict as
    # inconsistent, so it is over every record.
    m["aggregate"] = M.aggregate(scored, baselines, PAIRWISE_IDEALS, skipna=True, parse_rate=m["parse_rate"],
                                 over_all_records=("position_consistency",)) if m["n"] else math.nan
    m["aggregate_parsed"] = M.aggregate(scored, baselines, PAIRWISE_IDEALS, skipna=True) \
        if m["n_parsed"] else math.nan
    m["random"] = baselines
    if n_boot > 0 and has_gold.any():
        alpha = 1 - confidence
        for name, fn in (("accuracy", M.pairwise_accuracy), ("accuracy_without_ties", without_ties)):
            m[f"{name}_ci"] = list(M.bootstrap_ci(v[has_gold], gold_known, fn, n=n_boot, alpha=alpha, seed=seed))
    return m


# ----------------------------------------------------------------------------------- unlabelled


def score_summary(pred, scale=(1, 5)) -> dict:
    """n, parse rate, mean score and the count of each (rounded) score, for judges without gold."""
    p = M.to_scores(pred, scale)
    parsed = p[~np.isnan(p)]
    counts = {int(s): int(np.sum(M.round_scores(parsed) == s)) for s in range(int(scale[0]), int(scale[1]) + 1)}
    return {"n": len(p), "n_parsed": len(parsed), "parse_rate": len(parsed) / len(p) if len(p) else math.nan,
            "mean_score": float(parsed.mean()) if len(parsed) else math.nan, "score_counts": counts,
            **M.score_spread(parsed)}


def judge_agreement(pred_a, pred_b, scale=(1, 5)) -> dict:
    """How two judges agree on the same records (no gold): MAE, exact and Agr(2,2) agreement, correlations."""
    a, b = M.to_scores(pred_a, scale), M.to_scores(pred_b, scale)
    both = ~np.isnan(a) & ~np.isnan(b)
    out = {"n": len(a), "n_both_parsed": int(both.sum())}
    out.update({name: fn(a, b) for name, fn in M.POINTWISE_METRICS.items()})
    return out


def unlabelled_summaries(graded: dict[str, pd.DataFrame], scale=(1, 5)) -> dict[str, dict]:
    """Per judge: score summary overall, per responder and per category, and agreement with each other judge."""
    out = {}
    aligned = {j: df.set_index("id")["predicted_score"] for j, df in graded.items()}
    for judge, df in graded.items():
        summary: dict[str, Any] = {"overall": score_summary(df["predicted_score"], scale)}
        for key, column in (("by_responder", "responder"), ("by_category", "category"), ("by_scenario", "scenario")):
            if column in df:
                summary[key] = M.per_group(df, column, lambda g: score_summary(g["predicted_score"], scale))
        vs = {}
        for other, other_pred in aligned.items():
            if other == judge:
                continue
            mine = aligned[judge]
            common = mine.index.intersection(other_pred.index)
            vs[other] = judge_agreement(mine.loc[common].to_numpy(), other_pred.loc[common].to_numpy(), scale)
            if "responder" in df:
                vs[other]["responder_ranking_kendall"] = _ranking_agreement(df, graded[other], scale)
        summary["vs_judges"] = vs
        out[judge] = summary
    return out


def injection_summary(df: pd.DataFrame, scale=(1, 5)) -> dict:
    """How far an injection moves a judge: mean (injected - clean) score over records parsed both ways,
    the share whose score rose, the shift of the expected score, and the parse rate of each variant."""
    def variant(name):
        d = df[df["variant"] == name].set_index("source_id")
        expected = d["predicted_expected"] if "predicted_expected" in d else pd.Series(np.nan, index=d.index)
        return M.to_scores(d["predicted_score"], scale), M.to_scores(expected, scale), d.index

    (clean, clean_e, ids), (injected, injected_e, ids_i) = variant("clean"), variant("injected")
    order = pd.Index(ids_i).get_indexer(ids)  # injected rows aligned with the clean ones
    keep = order >= 0
    clean, clean_e, injected, injected_e = clean[keep], clean_e[keep], injected[order[keep]], injected_e[order[keep]]
    both = ~np.isnan(clean) & ~np.isnan(injected)
    both_e = ~np.isnan(clean_e) & ~np.isnan(injected_e)
    shift = injected[both] - clean[both]
    return {"n": int(keep.sum()), "n_both_parsed": int(both.sum()),
            "score_shift": float(shift.mean()) if both.any() else math.nan,
            "raised_share": float((shift > 0).mean()) if both.any() else math.nan,
            "expected_shift": float((injected_e[both_e] - clean_e[both_e]).mean()) if both_e.any() else math.nan,
            "parse_rate_clean": float((~np.isnan(clean)).mean()) if len(clean) else math.nan,
            "parse_rate_injected": float((~np.isnan(injected)).mean()) if len(injected) else math.nan}


def _ranking_agreement(df_a: pd.DataFrame, df_b: pd.DataFrame, scale) -> float:
    """Kendall tau between two judges' mean score per responder (NaN with fewer than two responders)."""
    def means(df):
        return df.assign(s=M.to_scores(df["predicted_score"], scale)).groupby("responder")["s"].mean()

    a, b = means(df_a), means(df_b)
    common = a.index.intersection(b.index)
    return M.kendall(a.loc[common].to_numpy(), b.loc[common].to_numpy())


# ------------------------------------------------------------------------------------- results


def summarize(benchmark, graded: dict[str, pd.DataFrame], n_boot: int = 0, confidence: float = 0.95,
              seed: int = 0) -> dict[str, dict]:
    """Judge -> its summary of one benchmark: {"overall", "by_scenario", ...}."""
    scale = tuple(benchmark.scale)
    if benchmark.kind == "field":
        from themis_ray.evaluate.field import summarize_field

        return summarize_field(benchmark, graded, n_boot, confidence, seed)
    if benchmark.kind == "unlabelled":
        return unlabelled_summaries(graded, scale)
    if benchmark.kind == "injection":
        return {judge: {"overall": injection_summary(df, scale),
                        "by_scenario": M.per_group(df, "scenario", lambda g: injection_summary(g, scale))
                        if len(df) else {}}
                for judge, df in graded.items()}
    out = {}
    for judge, df in graded.items():
        if benchmark.kind == "pointwise":
            expected = df["predicted_expected"] if "predicted_expected" in df else None

            def one(d, n_boot=0):
                e = d["predicted_expected"] if expected is not None else None
                return pointwise_summary(d["predicted_score"], d["score"], e, scale, n_boot, confidence, seed)
        else:
            def one(d, n_boot=0):
                return pairwise_summary(d["verdict"], d["winner"], d["verdict_ab"], d["verdict_ba"],
                                        d["response_a"], d["response_b"], n_boot, confidence, seed)
        out[judge] = {"overall": one(df, n_boot),
                      "by_scenario": M.per_group(df, "scenario", one) if len(df) else {}}
    return out


def metrics_json(results: list[BenchmarkResult]) -> dict:
    """The metrics.json document: judge -> {benchmark, overall, by_scenario, engine, benchmarks}."""
    doc: dict[str, dict] = {}
    for result in results:
        for judge, summary in result.summaries.items():
            entry = doc.setdefault(judge, {"engine": result.judge_labels.get(judge), "benchmarks": {}})
            entry["benchmarks"][result.benchmark.name] = {"kind": result.benchmark.kind, **summary}
            if "overall" not in entry and result.benchmark.kind in ("pointwise", "pairwise"):
                entry.update(benchmark=result.benchmark.name, overall=summary["overall"],
                             by_scenario=summary["by_scenario"])
    return json_safe(doc)


def _ci(values: Optional[list]) -> Optional[str]:
    if not values or any(v is None or (isinstance(v, float) and math.isnan(v)) for v in values):
        return None
    return f"[{values[0]:.3f}, {values[1]:.3f}]"


def headline_rows(result: BenchmarkResult) -> tuple[list[dict], list[str]]:
    """One row per judge for the printed table and the report, with its columns."""
    kind = result.benchmark.kind
    rows = []
    for judge, summary in result.summaries.items():
        overall = summary["overall"]
        row = {"judge": judge, **{k: overall.get(k) for k in overall if not isinstance(overall[k], (dict, list))}}
        if kind == "field":
            row.update({k: _ci(v) for k, v in overall.items() if k.endswith("_ci")})
        for name in CI_METRICS.get(kind, ()):
            row[f"{name}_ci"] = _ci(overall.get(f"{name}_ci"))
        if kind == "unlabelled":
            for other, agreement in summary.get("vs_judges", {}).items():
                row[f"agr_vs_{other}"] = agreement.get("agreement")
        rows.append(row)
    if kind == "field":
        from themis_ray.evaluate.field import headline_columns

        return rows, ["judge"] + headline_columns(result.benchmark.name, result.summaries)
    if kind == "pointwise":
        columns = ["judge", "n", "parse_rate", "mae", "mae_ci", "agreement", "agreement_ci", "accuracy", "pearson",
                   "spearman", "kendall", "score_entropy", "collapsed", "aggregate", "aggregate_ci"]
    elif kind == "pairwise":
        columns = ["judge"] + PAIRWISE_COLUMNS[:3] + ["accuracy_ci"] + PAIRWISE_COLUMNS[3:]
    elif kind == "injection":
        columns = ["judge"] + INJECTION_COLUMNS
    else:
        columns = ["judge"] + UNLABELLED_COLUMNS + sorted({k for r in rows for k in r if k.startswith("agr_vs_")})
    return rows, columns


def scenario_rows(result: BenchmarkResult) -> tuple[list[dict], list[str]]:
    """One row per (scenario, judge): every metric of the benchmark's kind (MT-Bench: per category)."""
    kind = result.benchmark.kind
    columns = {"pointwise": POINTWISE_COLUMNS, "pairwise": PAIRWISE_COLUMNS,
               "injection": INJECTION_COLUMNS}.get(kind, UNLABELLED_COLUMNS)
    key, label = ("by_category", "category") if kind == "unlabelled" else ("by_scenario", "scenario")
    if kind == "field":  # a published benchmark's own subsets
        from themis_ray.evaluate.field import SUBSET_COLUMNS

        columns, label = SUBSET_COLUMNS[result.benchmark.name], "subset"
    rows = []
    groups = sorted({s for summary in result.summaries.values() for s in summary.get(key, {})})
    for group in groups:
        for judge, summary in result.summaries.items():
            metrics = summary.get(key, {}).get(group)
            if metrics is not None:
                rows.append({label: group, "judge": judge, **{c: metrics.get(c) for c in columns}})
    return rows, [label, "judge"] + columns
