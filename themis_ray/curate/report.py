"""The curation report: `report.md` with tables, and the PNG plots it shows, drawn from the aggregated
figures (the written parts' statistics and the plan's), never from rows.

- `ifd_by_scenario.png`: IFD per scenario, past the IFD rules and dropped by one, with the cuts
  (Cherry's 1, Themis' z-score bounds, the top-k% threshold); bins of 2.2% in ratio.
- `scores_by_scenario.png`: teacher scores per scenario before and after rebalancing.
- `distributions.png`: the overview (all IFD values; all labelled vs curated scores).

Files go through `themis_ray.fs`, so the stage folder may be on object storage. Plots are drawn on
matplotlib's Agg canvas directly (no pyplot), safe without a display.
"""

from __future__ import annotations

import io
import math
import posixpath
from typing import Optional

from themis_ray import fs
from themis_ray.curate.rules import BALANCE_RULES, IFD_RULES
from themis_ray.curate.stats import BINS_PER_OCTAVE, bucket_edges

SCALE = list(range(1, 6))
_PAST_IFD = ("kept", *BALANCE_RULES)


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, uri: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    filesystem, path = fs.resolve(uri)
    filesystem.create_dir(posixpath.dirname(path), recursive=True)
    with filesystem.open_output_stream(path) as f:
        f.write(buffer.getvalue())


def _grid(n: int) -> tuple[int, int]:
    cols = max(1, min(n, 4))
    return max(1, math.ceil(n / cols)), cols


def _sum_bins(by_fate: dict, fates) -> dict[str, int]:
    out: dict[str, int] = {}
    for fate in fates:
        for b, n in by_fate.get(fate, {}).items():
            out[b] = out.get(b, 0) + n
    return out


def _bars(ax, bins: dict[str, int], bottom: Optional[dict[str, float]] = None, **kwargs) -> None:
    finite = sorted((int(b), n) for b, n in bins.items() if bucket_edges(b))
    if not finite:
        return
    lefts = [bucket_edges(str(b))[0] for b, _ in finite]
    widths = [bucket_edges(str(b))[1] - bucket_edges(str(b))[0] for b, _ in finite]
    base = [(bottom or {}).get(str(b), 0) for b, _ in finite]
    ax.bar(lefts, [n for _, n in finite], width=widths, bottom=base, align="edge", **kwargs)


def median_of(bins: dict[str, int]) -> Optional[float]:
    """The median of a log-binned histogram, to within a bin (2.2%): the bin's geometric centre."""
    ordered = ([(-math.inf, bins["zero"])] if bins.get("zero") else []) + sorted(
        (int(b), n) for b, n in bins.items() if bucket_edges(b))
    total = sum(n for _, n in ordered)
    if not total:
        return None
    cum = 0
    for b, n in ordered:
        cum += n
        if cum * 2 >= total:
            return 0.0 if b == -math.inf else 2 ** ((b + 0.5) / BINS_PER_OCTAVE)
    return None


def zscore_cuts(figures: dict, max_z: Optional[float]) -> dict[str, tuple[float, float]]:
    cuts = {}
    if max_z is None:
        return cuts
    for scenario, (mean, sd, count) in figures.get("zstats", {}).items():
        if count >= 3 and not math.isnan(sd):
            cuts[scenario] = (mean - max_z * sd, mean + max_z * sd)
    return cuts


def plot_ifd_by_scenario(ifd: dict, cfg, figures: dict, column: str, uri: str) -> None:
    scenarios = sorted(ifd)
    rows, cols = _grid(len(scenarios))
    fig = _figure(4 * cols, 3 * rows)
    zcuts = zscore_cuts(figures, cfg.max_ifd_zscore)
    top = (figures.get("top_k") or {}).get("cut")
    for k, scenario in enumerate(scenarios):
        ax = fig.add_subplot(rows, cols, k + 1)
        past, dropped = _sum_bins(ifd[scenario], _PAST_IFD), _sum_bins(ifd[scenario], IFD_RULES)
        _bars(ax, past, color="tab:blue", label="past the IFD rules")
        _bars(ax, dropped, bottom=past, color="tab:gray", label="dropped by an IFD rule")
        if cfg.drop_ifd_above_one:
            ax.axvline(1.0, color="tab:red", linestyle="--", label="Cherry: IFD = 1")
        for x in zcuts.get(scenario, ()):
            ax.axvline(x, color="tab:orange", linestyle=":", label=f"Themis: |z| = {cfg.max_ifd_zscore:g}")
        if top is not None:
            ax.axvline(top, color="tab:purple", linestyle="-.", label=f"top {cfg.keep_top_percent:g}%")
        total = sum(sum(b.values()) for b in ifd[scenario].values())
        ax.set_title(f"{scenario} (n={total})", fontsize=9)
        ax.set_xlabel(column, fontsize=8)
        ax.tick_params(labelsize=7)
        if k == 0:
            handles, labels = ax.get_legend_handles_labels()
            unique = dict(zip(labels, handles))
            ax.legend(unique.values(), unique.keys(), fontsize=6)
    fig.suptitle(f"IFD ({cfg.ifd_measure} ratio) per scenario, with the cuts")
    fig.tight_layout()
    _save(fig, uri)


def score_tables(scores: dict) -> dict[str, dict[str, list[int]]]:
    """Per scenario: score counts (1..5) past the IFD rules (before rebalancing) and curated."""
    out = {}
    for scenario in sorted(scores):
        before, after = _sum_bins(scores[scenario], _PAST_IFD), _sum_bins(scores[scenario], ("kept",))
        out[scenario] = {"before": [before.get(str(s), 0) for s in SCALE],
                         "after": [after.get(str(s), 0) for s in SCALE]}
    return out


def plot_scores_by_scenario(tables: dict, uri: str) -> None:
    import numpy as np

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
    _save(fig, uri)


def plot_overview(ifd: dict, scores: dict, column: str, uri: str) -> None:
    import numpy as np

    fig = _figure(10, 4)
    a, b = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    every: dict[str, int] = {}
    for by_fate in ifd.values():
        for bins in by_fate.values():
            for k, n in bins.items():
                every[k] = every.get(k, 0) + n
    _bars(a, every, color="tab:blue")
    a.set(title="IFD of all labelled records", xlabel=column, ylabel="records")
    labelled: dict[str, int] = {}
    curated: dict[str, int] = {}
    for by_fate in scores.values():
        for fate, counts in by_fate.items():
            for s, n in counts.items():
                labelled[s] = labelled.get(s, 0) + n
                if fate == "kept":
                    curated[s] = curated.get(s, 0) + n
    x = np.arange(len(SCALE))
    b.bar(x - 0.2, [labelled.get(str(s), 0) for s in SCALE], 0.4, label="labelled")
    b.bar(x + 0.2, [curated.get(str(s), 0) for s in SCALE], 0.4, label="curated")
    b.set(title="Teacher scores", xticks=x, xticklabels=SCALE, xlabel="score", ylabel="records")
    b.legend()
    fig.tight_layout()
    _save(fig, uri)


def _md_table(header: list[str], rows: list[list]) -> list[str]:
    def cell(v):
        if v is None:
            return "-"
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + [
        "| " + " | ".join(cell(v) for v in row) + " |" for row in rows]


def write_report(folder: str, cfg, column: str, figures: dict, stats: dict, steps: list[dict],
                 manifest: dict) -> str:
    """Write the plots and `report.md` into `folder` (a path or URI); returns the report's path.

    cfg: the CurateConfig; figures: the plan's (z statistics, top-k cut, passes); stats: the written
    parts' summed statistics; steps: `stats.step_counts`."""
    ifd, scores = stats.get("ifd", {}), stats.get("scores", {})
    tables = score_tables(scores)
    plot_overview(ifd, scores, column, fs.join(folder, "distributions.png"))
    plot_ifd_by_scenario(ifd, cfg, figures, column, fs.join(folder, "ifd_by_scenario.png"))
    plot_scores_by_scenario(tables, fs.join(folder, "scores_by_scenario.png"))

    scenarios = sorted(steps[0]["by_scenario"])
    rules = [f"IFD measure: `{column}` ({cfg.ifd_measure} ratio)",
             f"Cherry IFD > 1: {'on' if cfg.drop_ifd_above_one else 'off'}",
             f"Themis |z| > {cfg.max_ifd_zscore:g}" if cfg.max_ifd_zscore is not None else "Themis z-score: off",
             f"Cherry top {cfg.keep_top_percent:g}%" if cfg.keep_top_percent < 100 else "Cherry top-k%: off",
             f"rebalancing: {'on, max ratio %g' % cfg.rebalance_max_ratio if cfg.rebalance else 'off'}"
             + (f", target {list(cfg.rebalance_target)}" if cfg.rebalance and cfg.rebalance_target is not None else ""),
             f"scenario mix: {dict(cfg.scenario_weights) or 'natural'}"]
    lines = ["# Curation report", "", "Rules: " + "; ".join(rules) + ".", "",
             "Rebalancing and the scenario mix keep each record with probability cap / count (a seeded "
             "draw per record), so their counts match the caps up to sampling noise.", "",
             "## Records after every step", ""]
    lines += _md_table(["step", "rule", "dropped", "remaining"] + scenarios,
                       [[s["step"], s["rule"] or "", s["dropped"], s["remaining"]]
                        + [s["by_scenario"].get(x, 0) for x in scenarios] for s in steps])
    splits = manifest.get("splits", {})
    split_text = ", ".join(f"{k} {v}" for k, v in sorted(splits.items()))
    split = figures.get("split", {})
    lines += ["", f"Written: {sum(splits.values())} records ({split_text}), "
              f"of which {sum(manifest.get('augmented', {}).values())} augmented copies. Split by whole source "
              f"documents (else instructions), sized exactly per scenario: "
              f"{', '.join(split.get('exact', [])) or 'none'}; drawn per source document: "
              f"{', '.join(split.get('drawn', [])) or 'none'}.", "",
              "## IFD per scenario", "", "![IFD per scenario](ifd_by_scenario.png)", ""]
    zcuts = zscore_cuts(figures, cfg.max_ifd_zscore)
    ifd_rows = []
    for scenario in scenarios:
        bins = _sum_bins(ifd.get(scenario, {}), list(ifd.get(scenario, {})))
        z = figures.get("zstats", {}).get(scenario)
        lo, hi = zcuts.get(scenario, (None, None))
        ifd_rows.append([scenario, sum(bins.values()), median_of(bins), z[2] if z else 0,
                         z[0] if z else None, z[1] if z and not math.isnan(z[1]) else None, lo, hi])
    lines += _md_table(["scenario", "records", "median (±1%)", "past IFD > 1", "mean", "sd", "z-cut low",
                        "z-cut high"], ifd_rows)
    top = figures.get("top_k")
    if top:
        cut = f"{column} >= {top['cut']:.6g}" if top["cut"] is not None else "none (all kept)"
        lines += ["", f"Top {cfg.keep_top_percent:g}% cut: {top['keep']} of {top['live']} records kept "
                  f"(ties at the cut broken by id); cut: {cut}."]
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
    path = fs.join(folder, "report.md")
    fs.write_text(path, "\n".join(lines))
    return path
