"""Curation: IFD filtering, per-scenario score rebalancing and a stratified train/validation split.

Every record either ends in the curated set with its split or among the rejects with the rule that
dropped it, in the order the rules run.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from themis_ray.schema import REJECT, output_schema
from themis_ray.store import StageResult


def apply_rules(df: pd.DataFrame, cfg) -> pd.DataFrame:
    """Set `reject_reason` on dropped records and `split` on kept ones; returns a new frame."""
    df = df.copy()
    df[REJECT] = None
    df["split"] = None
    rng = np.random.default_rng(cfg.seed)

    def drop(mask, reason: str):
        df.loc[mask & df[REJECT].isna(), REJECT] = reason  # the first rule that drops a record names it

    if cfg.drop_ifd_above_one:
        drop(df["ifd"] > 1, "IFD > 1: the prompt does not make the answer easier")
    if cfg.max_ifd_zscore is not None:
        live = df[REJECT].isna()
        stats = df[live].groupby("scenario")["ifd"].agg(["mean", "std", "count"])
        z = (df["ifd"] - df["scenario"].map(stats["mean"])) / df["scenario"].map(stats["std"])
        enough = df["scenario"].map(stats["count"]).fillna(0) >= 3  # a z-score of two points means nothing
        drop((z.abs() > cfg.max_ifd_zscore) & enough, f"IFD z-score within scenario > {cfg.max_ifd_zscore:g}")
    if cfg.keep_top_percent < 100:
        live = df[REJECT].isna()
        keep = math.ceil(live.sum() * cfg.keep_top_percent / 100)
        threshold_index = df[live].sort_values("ifd", ascending=False).index[keep:]
        mask = df.index.isin(threshold_index)
        drop(pd.Series(mask, index=df.index), f"IFD below the top {cfg.keep_top_percent:g}%")
    if cfg.rebalance:
        live = df[df[REJECT].isna()]
        rounded = live["score"].round().astype(int)
        for scenario, group in live.groupby("scenario"):
            counts = rounded[group.index].value_counts()
            cap = math.ceil(counts.min() * cfg.rebalance_max_ratio)
            for score, n in counts.items():
                if n > cap:
                    idx = rounded[group.index][rounded[group.index] == score].index.to_numpy()
                    dropped = rng.choice(idx, size=n - cap, replace=False)
                    df.loc[dropped, REJECT] = f"rebalanced: score {score} over-represented in {scenario}"
    live = df[df[REJECT].isna()]
    for _, group in live.groupby("scenario"):
        order = rng.permutation(group.index.to_numpy())
        n_val = int(round(len(order) * cfg.validation_fraction))
        df.loc[order[:n_val], "split"] = "validation"
        df.loc[order[n_val:], "split"] = "train"
    # Tiny sets: make sure both splits exist when there are at least two records.
    kept = df[REJECT].isna()
    if kept.sum() >= 2:
        for missing, donor in (("validation", "train"), ("train", "validation")):
            if not (df.loc[kept, "split"] == missing).any():
                df.loc[df.index[kept & (df["split"] == donor)][0], "split"] = missing
    return df


def plot_distributions(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    a.hist(df["ifd"].dropna(), bins=20, color="tab:blue")
    a.set(title="IFD of all labelled records", xlabel="IFD", ylabel="records")
    kept = df[df[REJECT].isna()]
    scores = sorted(set(df["score"].round().astype(int)))
    a_counts = [int((df["score"].round() == s).sum()) for s in scores]
    k_counts = [int((kept["score"].round() == s).sum()) for s in scores]
    x = np.arange(len(scores))
    b.bar(x - 0.2, a_counts, 0.4, label="labelled")
    b.bar(x + 0.2, k_counts, 0.4, label="curated")
    b.set(title="Teacher scores", xticks=x, xticklabels=scores, xlabel="score", ylabel="records")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(cfg, inputs: dict, staging) -> StageResult:
    source: pa.Table = inputs["ifd"]
    schema = output_schema("curate", source.schema)
    df = apply_rules(source.to_pandas(), cfg.curate)
    if len(df):
        plot_distributions(df, Path(staging) / "distributions.png")
    base = source.drop_columns([c for c in (REJECT, "split") if c in source.column_names])
    table = base.append_column("split", pa.array(df["split"].tolist(), pa.string()))
    table = table.append_column(REJECT, pa.array(df[REJECT].tolist(), pa.string())).cast(schema)
    kept = df[df[REJECT].isna()]
    return StageResult(table, rows_in=source.num_rows, extra={
        "splits": kept["split"].value_counts().to_dict(),
        "rejected_by_rule": df[REJECT].dropna().str.split(":").str[0].value_counts().to_dict(),
        "score_histogram": {str(k): int(v) for k, v in kept["score"].round().value_counts().sort_index().items()},
    })
