"""Curation: IFD filters, per-scenario rebalancing, scenario mix, a stratified split, augmentation.

The rules run in this order, and the first rule that drops a record names it in `reject_reason`:

1. Cherry LLM: IFD > 1 (the prompt does not make the answer easier).
2. Themis: |z| of IFD within the record's scenario above `max_ifd_zscore`.
3. Cherry LLM: keep the top `keep_top_percent`% by IFD (the hardest).
4. Rebalancing, per scenario: pointwise scores toward `rebalance_target`, pairwise verdicts across
   A, B and C (ties counted twice when each pair is also added swapped).
5. Scenario mix: scenarios down-sampled to `scenario_weights`.
6. Train/validation split, stratified by scenario.

Then kept train records are copied by custom-prompt augmentation (`augment.py`) and kept pairwise
records are added with their order swapped; copies are extra rows, counted as `augmented`. Every
input record is either kept (with its split) or rejected (with its rule): rows in = kept + rejected.
The report (`report.md` with PNG plots) shows IFD per scenario with the cuts, score histograms before
and after rebalancing, and the counts after every step.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from themis_ray.schema import REJECT, output_schema
from themis_ray.stages import augment as aug
from themis_ray.store import StageResult

# Reject reasons start with these (the part before ":"), in the order the rules run.
STEPS = (
    ("IFD > 1", "Cherry: IFD > 1"),
    ("IFD z-score", "Themis: IFD z-score"),
    ("IFD below the top", "Cherry: top k% by IFD"),
    ("rebalanced", "score rebalancing"),
    ("pairwise balance", "pairwise verdict balancing"),
    ("scenario mix", "scenario mix"),
)
_EPS = 1e-9


def ifd_column(cfg) -> str:
    if cfg.ifd_measure not in ("loss", "perplexity"):
        raise ValueError(f"curate.ifd_measure must be 'loss' or 'perplexity', got {cfg.ifd_measure!r}")
    return "ifd" if cfg.ifd_measure == "loss" else "ifd_ppl"


def _pairwise(df: pd.DataFrame) -> pd.Series:
    return df["mode"].eq("pairwise") if "mode" in df else pd.Series(False, index=df.index)


def zscore_stats(df: pd.DataFrame, column: str) -> pd.DataFrame:
    """Mean, sd and count of IFD per scenario over the rows that passed the IFD > 1 rule."""
    passed = ~df[REJECT].fillna("").str.startswith("IFD > 1")
    return df[passed].groupby("scenario")[column].agg(["mean", "std", "count"])


def _caps(counts: pd.Series, weights: dict, ratio: float) -> dict:
    """How many of each class to keep: at most `ratio` times its target share of the scarcest class.

    counts: present classes -> records; weights: class -> target weight (absent: 0). A class with
    weight 0 keeps nothing; with uniform weights this is min(count, ceil(ratio * rarest count)).
    """
    total = sum(weights.get(k, 0.0) for k in counts.index)
    if total <= 0:
        return {k: int(n) for k, n in counts.items()}  # no target among present classes: leave as is
    share = {k: weights.get(k, 0.0) / total for k in counts.index}
    scale = min(counts[k] / share[k] for k in counts.index if share[k] > 0)
    return {k: min(int(n), math.ceil(ratio * share[k] * scale - _EPS)) for k, n in counts.items()}


def _score_weights(cfg) -> dict[int, float]:
    scores = aug.LABEL_SCALE.scores
    target = list(cfg.rebalance_target) if cfg.rebalance_target is not None else [1.0] * len(scores)
    if len(target) != len(scores) or any(w < 0 for w in target) or sum(target) <= 0:
        raise ValueError(f"curate.rebalance_target needs {len(scores)} non-negative weights (scores "
                         f"{scores[0]}..{scores[-1]}) with a positive sum; got {target}")
    return dict(zip(scores, map(float, target)))


def apply_rules(df: pd.DataFrame, cfg) -> pd.DataFrame:
    """Set `reject_reason` on dropped records and `split` on kept ones; returns a new frame."""
    df = df.copy()
    df[REJECT] = None
    df["split"] = None
    rng = np.random.default_rng(cfg.seed)
    col = ifd_column(cfg)

    def live() -> pd.Series:
        return df[REJECT].isna()

    def drop(mask, reason: str):
        df.loc[mask & live(), REJECT] = reason  # the first rule that drops a record names it

    def drop_some(index, n: int, reason: str):
        if n > 0:
            df.loc[rng.choice(np.asarray(index), size=n, replace=False), REJECT] = reason

    if cfg.drop_ifd_above_one:
        drop(df[col] > 1, "IFD > 1: the prompt does not make the answer easier")
    if cfg.max_ifd_zscore is not None:
        stats = zscore_stats(df, col)
        z = (df[col] - df["scenario"].map(stats["mean"])) / df["scenario"].map(stats["std"])
        enough = df["scenario"].map(stats["count"]).fillna(0) >= 3  # a z-score of two points means nothing
        drop((z.abs() > cfg.max_ifd_zscore) & enough, f"IFD z-score within scenario > {cfg.max_ifd_zscore:g}")
    if cfg.keep_top_percent < 100:
        keep = math.ceil(live().sum() * cfg.keep_top_percent / 100)
        below = df[live()].sort_values(col, ascending=False, kind="stable").index[keep:]
        drop(pd.Series(df.index.isin(below), index=df.index), f"IFD below the top {cfg.keep_top_percent:g}%")
    if cfg.rebalance:
        weights = _score_weights(cfg)
        pointwise = df[live() & ~_pairwise(df) & df["score"].notna()]
        rounded = pointwise["score"].round().astype(int)
        for scenario, group in rounded.groupby(pointwise["scenario"]):
            counts = group.value_counts().sort_index()
            for score, cap in _caps(counts, weights, cfg.rebalance_max_ratio).items():
                drop_some(group.index[group == score], int(counts[score]) - cap,
                          f"rebalanced: score {score} over-represented in {scenario}")
        _balance_verdicts(df, cfg, drop_some)
    if cfg.scenario_weights:
        counts = df[live()].groupby("scenario").size()
        weights = {s: float(cfg.scenario_weights.get(s, 1.0)) for s in counts.index}
        for scenario, cap in _caps(counts, weights, 1.0).items():
            drop_some(df.index[live() & (df["scenario"] == scenario)], int(counts[scenario]) - cap,
                      f"scenario mix: {scenario} above its weight")
    _split(df, cfg, rng)
    return df


def _balance_verdicts(df: pd.DataFrame, cfg, drop_some) -> None:
    """Pairwise records, per scenario: A, B and C toward equal shares (at most rebalance_max_ratio).

    With `swap_pairwise` every kept pair is also added swapped, so A and B end up equal by themselves
    (A + B each) and ties count twice: the classes balanced are "decisive" (A or B) and "tie" (C x 2).
    """
    pairs = df[df[REJECT].isna() & _pairwise(df)]
    if pairs.empty:
        return
    if "verdict" not in pairs or not pairs["verdict"].isin(["A", "B", "C"]).all():
        raise ValueError("pairwise records need a verdict of A, B or C")
    for scenario, group in pairs.groupby("scenario"):
        verdict = group["verdict"]
        if cfg.swap_pairwise:
            klass = verdict.map({"A": "A or B", "B": "A or B", "C": "C"})
            counts = klass.value_counts()
            effective = counts * counts.index.map({"A or B": 1, "C": 2}).to_numpy()
            caps = _caps(effective, {"A or B": 1.0, "C": 1.0}, cfg.rebalance_max_ratio)
            caps = {k: caps[k] if k == "A or B" else math.ceil(caps[k] / 2) for k in caps}
        else:
            klass = verdict
            counts = klass.value_counts()
            caps = _caps(counts, {"A": 1.0, "B": 1.0, "C": 1.0}, cfg.rebalance_max_ratio)
        for name, cap in caps.items():
            drop_some(group.index[klass == name], int(counts[name]) - min(cap, int(counts[name])),
                      f"pairwise balance: verdict {name} over-represented in {scenario}")


def _split(df: pd.DataFrame, cfg, rng: np.random.Generator) -> None:
    """Train/validation per scenario (stratified); both splits exist when two records are kept."""
    live = df[df[REJECT].isna()]
    for _, group in live.groupby("scenario"):
        order = rng.permutation(group.index.to_numpy())
        n_val = int(round(len(order) * cfg.validation_fraction))
        df.loc[order[:n_val], "split"] = "validation"
        df.loc[order[n_val:], "split"] = "train"
    kept = df[REJECT].isna()
    if kept.sum() >= 2:
        for missing, donor in (("validation", "train"), ("train", "validation")):
            if not (df.loc[kept, "split"] == missing).any():
                df.loc[df.index[kept & (df["split"] == donor)][0], "split"] = missing


def step_of(reason: Optional[str]) -> Optional[str]:
    if reason is None or (isinstance(reason, float) and math.isnan(reason)):
        return None
    for prefix, name in STEPS:
        if reason.startswith(prefix):
            return name
    return "other"


def step_counts(df: pd.DataFrame) -> list[dict]:
    """Records remaining after every rule, overall and per scenario: [{step, dropped, remaining, by_scenario}]."""
    steps = df[REJECT].map(step_of)
    scenarios = sorted(df["scenario"].unique()) if len(df) else []
    remaining = df["scenario"].value_counts().reindex(scenarios, fill_value=0)
    out = [{"step": "labelled", "dropped": 0, "remaining": int(remaining.sum()),
            "by_scenario": {s: int(n) for s, n in remaining.items()}}]
    for name in [n for _, n in STEPS] + ["other"]:
        dropped = df[steps == name]["scenario"].value_counts().reindex(scenarios, fill_value=0)
        if name == "other" and not dropped.sum():
            continue
        remaining = remaining - dropped
        out.append({"step": name, "dropped": int(dropped.sum()), "remaining": int(remaining.sum()),
                    "by_scenario": {s: int(n) for s, n in remaining.items()}})
    return out


# -------------------------------------------------------------------------------------- the stage


def _paraphrase_on_pool(criteria: pa.Table, cfg) -> pa.Table:
    """Criteria -> paraphrases, with the model on a Ray Data actor pool like every row-wise stage."""
    from themis_ray.stages import map_rows

    return map_rows(criteria, aug.CriterionParaphraser, cfg.pool, schema=aug.PARAPHRASE_SCHEMA,
                    engine_cfg=cfg.engine, sampling=cfg.sampling)


def _histogram(scores: pd.Series) -> dict[str, int]:
    return {str(k): int(v) for k, v in scores.dropna().round().astype(int).value_counts().sort_index().items()}


def run(cfg, inputs: dict, staging) -> StageResult:
    c = cfg.curate
    source: pa.Table = inputs["ifd"]
    base = source.drop_columns([n for n in (REJECT, "split", aug.AUGMENTATION) if n in source.column_names])
    schema = output_schema("curate", base.schema)
    schema = schema.insert(schema.get_field_index(REJECT), pa.field(aug.AUGMENTATION, pa.string()))
    df = apply_rules(base.to_pandas(), c)
    table = (base.append_column("split", pa.array(df["split"].tolist(), pa.string()))
             .append_column(aug.AUGMENTATION, pa.nulls(base.num_rows, pa.string()))
             .append_column(REJECT, pa.array(df[REJECT].tolist(), pa.string())).cast(schema))

    kept = table.filter(pc.is_null(table[REJECT])).to_pylist()
    train = [r for r in kept if r["split"] == "train"]
    validation = [r for r in kept if r["split"] == "validation"]
    copies, augmentation = aug.augment(train, validation, c.augment, seed=c.seed, scenarios_dir=cfg.scenarios_dir,
                                       paraphrase=partial(_paraphrase_on_pool, cfg=c.augment))
    if c.swap_pairwise:
        swapped = aug.swap_pairwise_rows(kept, cfg.scenarios_dir)
        copies += swapped
        if swapped:
            augmentation["augmented"]["order swapped"] = len(swapped)
    if copies:
        table = pa.concat_tables([table, pa.Table.from_pylist(copies, schema=schema)])

    steps = step_counts(df)
    written = table.filter(pc.is_null(table[REJECT]))
    kept_df = df[df[REJECT].isna()]
    report = dict(
        ifd_measure=c.ifd_measure,
        steps=[{k: v for k, v in s.items() if k != "by_scenario"} for s in steps],
        rejected_by_rule=df[REJECT].dropna().str.split(":").str[0].value_counts().to_dict(),
        splits={d["values"]: d["counts"] for d in pc.value_counts(written["split"]).to_pylist()},
        score_histogram=_histogram(kept_df["score"]),
        score_histogram_before_rebalance=_histogram(
            df[df[REJECT].map(step_of).isin([None, "score rebalancing", "pairwise verdict balancing",
                                              "scenario mix"])]["score"]),
        **augmentation,
    )
    if len(df):
        from themis_ray.stages.curate_report import write_report

        write_report(Path(staging), df, c, steps, report)
        report["report"] = "report.md"
    return StageResult(table, rows_in=source.num_rows, units_ok=len(kept_df), extra=report)
