"""The curation report: `report.md` with tables, and the PNG plots it shows.

- `ifd_by_scenario.png`: IFD per scenario, kept and dropped, with the cuts (Cherry's 1, Themis' z-score
  bounds, the top-k% threshold).
- `scores_by_scenario.png`: teacher scores per scenario before and after rebalancing.
- `distributions.png`: the overview (all IFD values; all labelled vs curated scores).

Plots are drawn on matplotlib's Agg canvas directly (no pyplot), safe without a display.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from themis_ray.schema import REJECT
from themis_ray.stages.curate import STEPS, ifd_column, step_of, zscore_stats

_IFD_STEPS = {name for _, name in STEPS[:3]}
_REBALANCE_STEPS = {"score rebalancing", "pairwise verdict balancing", "scenario mix"}


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def ifd_cuts(df: pd.DataFrame, cfg) -> dict:
    """Where each IFD rule cut: {"cherry": 1.0 | None, "top_k": value | None, "zscore": {scenario: (lo, hi)}}."""
    col = ifd_column(cfg)
    cuts = {"cherry": 1.0 if cfg.drop_ifd_above_one else None, "top_k": None, "zscore": {}}
    if cfg.max_ifd_zscore is not None:
        for scenario, s in zscore_stats(df, col).iterrows():
            if s["count"] >= 3 and not math.isnan(s["std"]):
                cuts["zscore"][scenario] = (s["mean"] - cfg.max_ifd_zscore * s["std"],
                                            s["mean"] + cfg.max_ifd_zscore * s["std"])
    if cfg.keep_top_percent < 100:
        through = ~df[REJECT].map(step_of).isin(_IFD_STEPS)
        if through.any():
            cuts["top_k"] = float(df.loc[through, col].min())
    return cuts


def _grid(n: int) -> tuple[int, int]:
    cols = min(n, 4)
    return math.ceil(n / cols), cols


def plot_ifd_by_scenario(df: pd.DataFrame, cfg, cuts: dict, path: Path) -> None:
    col = ifd_column(cfg)
    scenarios = sorted(df["scenario"].unique())
    rows, cols = _grid(len(scenarios))
    fig = _figure(4 * cols, 3 * rows)
    step = df[REJECT].map(step_of)
    finite = df[col].replace([np.inf, -np.inf], np.nan)
    bins = np.linspace(finite.min(), finite.max(), 21) if finite.notna().any() else 10
    for k, scenario in enumerate(scenarios):
        ax = fig.add_subplot(rows, cols, k + 1)
        mine = df["scenario"] == scenario
        dropped = mine & step.isin(_IFD_STEPS)
        ax.hist([finite[mine & ~dropped].dropna(), finite[dropped].dropna()], bins=bins, stacked=True,
                color=["tab:blue", "tab:gray"], label=["past the IFD rules", "dropped by an IFD rule"])
        if cuts["cherry"] is not None:
            ax.axvline(cuts["cherry"], color="tab:red", linestyle="--", label="Cherry: IFD = 1")
        if scenario in cuts["zscore"]:
            lo, hi = cuts["zscore"][scenario]
            for x in (lo, hi):
                ax.axvline(x, color="tab:orange", linestyle=":", label=f"Themis: |z| = {cfg.max_ifd_zscore:g}")
        if cuts["top_k"] is not None:
            ax.axvline(cuts["top_k"], color="tab:purple", linestyle="-.", label=f"top {cfg.keep_top_percent:g}%")
        ax.set_title(f"{scenario} (n={int(mine.sum())})", fontsize=9)
        ax.set_xlabel(col, fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=6)
    fig.suptitle(f"IFD ({cfg.ifd_measure} ratio) per scenario, with the cuts")
    fig.tight_layout()
    fig.savefig(path)


def _score_counts(scores: pd.Series, scale: list[int]) -> list[int]:
    rounded = scores.dropna().round().astype(int)
    return [int((rounded == s).sum()) for s in scale]


def score_tables(df: pd.DataFrame) -> dict[str, dict[str, list[int]]]:
    """Per scenario: score counts (1..5) after the IFD rules (before rebalancing) and when curated."""
    step = df[REJECT].map(step_of)
    before_mask = step.isna() | step.isin(_REBALANCE_STEPS)
    out = {}
    for scenario in sorted(df["scenario"].unique()):
        mine = df["scenario"] == scenario
        out[scenario] = {"before": _score_counts(df.loc[mine & before_mask, "score"], list(range(1, 6))),
                         "after": _score_counts(df.loc[mine & step.isna(), "score"], list(range(1, 6)))}
    return out


def plot_scores_by_scenario(tables: dict, path: Path) -> None:
    scenarios = list(tables)
    rows, cols = _grid(len(scenarios))
    fig = _figure(4 * cols, 3 * rows)
    x = np.arange(1, 6)
    for k, scenario in enumerate(scenarios):
        ax = fig.add_subplot(rows, cols, k + 1)
        ax.bar(x - 0.2, tables[scenario]["before"], 0.4, label="before rebalancing", color="tab:gray")
        ax.bar(x + 0.2, tables[scenario]["after"], 0.4, label="curated", color="tab:green")
        ax.set_title(scenario, fontsize=9)
        ax.set_xticks(x)
        ax.tick_params(labelsize=7)
        if k == 0:
            ax.legend(fontsize=6)
    fig.suptitle("Teacher scores per scenario, before and after rebalancing")
    fig.tight_layout()
    fig.savefig(path)


def plot_overview(df: pd.DataFrame, cfg, path: Path) -> None:
    col = ifd_column(cfg)
    fig = _figure(10, 4)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    a.hist(df[col].replace([np.inf, -np.inf], np.nan).dropna(), bins=20, color="tab:blue")
    a.set(title="IFD of all labelled records", xlabel=col, ylabel="records")
    kept = df[df[REJECT].isna()]
    scale = list(range(1, 6))
    x = np.arange(len(scale))
    b.bar(x - 0.2, _score_counts(df["score"], scale), 0.4, label="labelled")
    b.bar(x + 0.2, _score_counts(kept["score"], scale), 0.4, label="curated")
    b.set(title="Teacher scores", xticks=x, xticklabels=scale, xlabel="score", ylabel="records")
    b.legend()
    fig.tight_layout()
    fig.savefig(path)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def write_report(folder: Path, df: pd.DataFrame, cfg, steps: list[dict], manifest: dict) -> Path:
    """Write the plots and `report.md` into `folder`; returns the report's path."""
    folder.mkdir(parents=True, exist_ok=True)
    col = ifd_column(cfg)
    cuts = ifd_cuts(df, cfg)
    tables = score_tables(df)
    plot_overview(df, cfg, folder / "distributions.png")
    plot_ifd_by_scenario(df, cfg, cuts, folder / "ifd_by_scenario.png")
    plot_scores_by_scenario(tables, folder / "scores_by_scenario.png")

    scenarios = sorted(df["scenario"].unique())
    rules = [f"IFD measure: `{col}` ({cfg.ifd_measure} ratio)",
             f"Cherry IFD > 1: {'on' if cfg.drop_ifd_above_one else 'off'}",
             f"Themis |z| > {cfg.max_ifd_zscore:g}" if cfg.max_ifd_zscore is not None else "Themis z-score: off",
             f"Cherry top {cfg.keep_top_percent:g}%" if cfg.keep_top_percent < 100 else "Cherry top-k%: off",
             f"rebalancing: {'on, max ratio %g' % cfg.rebalance_max_ratio if cfg.rebalance else 'off'}"
             + (f", target {list(cfg.rebalance_target)}" if cfg.rebalance and cfg.rebalance_target is not None else ""),
             f"scenario mix: {dict(cfg.scenario_weights) or 'natural'}"]
    lines = ["# Curation report", "", "Rules: " + "; ".join(rules) + ".", "",
             "## Records after every step", ""]
    lines += _md_table(["step", "dropped", "remaining"] + scenarios,
                       [[s["step"], s["dropped"], s["remaining"]] + [s["by_scenario"][x] for x in scenarios]
                        for s in steps])
    splits = manifest.get("splits", {})
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))
    lines += ["", f"Written: {sum(splits.values())} records ({split_text}), "
              f"of which {sum(manifest.get('augmented', {}).values())} augmented copies.", "",
              "## IFD per scenario", "", "![IFD per scenario](ifd_by_scenario.png)", ""]
    ifd_rows = []
    stats = zscore_stats(df, col)  # what the z-score uses: the records past Cherry's IFD > 1
    for scenario in scenarios:
        values = df.loc[df["scenario"] == scenario, col]
        s = stats.loc[scenario] if scenario in stats.index else None
        lo, hi = cuts["zscore"].get(scenario, (None, None))
        ifd_rows.append([scenario, len(values), float(values.median()),
                         int(s["count"]) if s is not None else 0,
                         float(s["mean"]) if s is not None else None,
                         float(s["std"]) if s is not None and not math.isnan(s["std"]) else None, lo, hi])
    lines += _md_table(["scenario", "records", "median", "past IFD > 1", "mean", "sd", "z-cut low", "z-cut high"],
                       ifd_rows)
    if cuts["top_k"] is not None:
        lines += ["", f"Top {cfg.keep_top_percent:g}% cut: {col} >= {cuts['top_k']:.4f}."]
    lines += ["", "## Teacher scores before and after rebalancing", "",
              "![Scores per scenario](scores_by_scenario.png)", ""]
    lines += _md_table(["scenario", "before (1..5)", "curated (1..5)"],
                       [[s, " / ".join(map(str, t["before"])), " / ".join(map(str, t["after"]))]
                        for s, t in tables.items()])
    lines += ["", "## Augmentation", ""]
    made, skipped = manifest.get("augmented", {}), manifest.get("augmentation_skipped", {})
    if made or skipped:
        lines += _md_table(["kind", "copies"], [[k, v] for k, v in sorted(made.items())])
        if skipped:
            lines += ["", "Not made:", ""] + _md_table(["why", "records"], [[k, v] for k, v in sorted(skipped.items())])
    else:
        lines += ["None configured (`curate.augment.*_fraction` are 0)."]
    regression = manifest.get("criteria_regression")
    if regression:
        mae = regression["validation_mae"]
        lines += ["", f"Overall-score regression after dropping criteria: {regression['regressions']} fitted, "
                  f"validation MAE {mae if mae is None else round(mae, 3)} over "
                  f"{regression['validation_predictions']} predictions."]
    if "paraphrases" in manifest:
        p = manifest["paraphrases"]
        lines += ["", f"Criterion paraphrases: {p['usable']} usable of {p['asked']} asked; "
                  f"unusable: {p['unusable'] or 'none'}."]
    lines += ["", "## Overview", "", "![Overview](distributions.png)", ""]
    path = folder / "report.md"
    path.write_text("\n".join(lines))
    return path
