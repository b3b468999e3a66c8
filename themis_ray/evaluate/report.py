"""Plots, plain-text tables and the static HTML report of a judges' meta-evaluation.

`write_report` draws every plot of every benchmark (per-scenario metric bars, confusion matrices,
score histograms, calibration of the expected score, pairwise consistency, agreement between judges)
and writes `report.html` beside them, referencing the PNGs by relative name; it has no scripts.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they
are safe to make from workers and threads without a display.
"""

from __future__ import annotations

import html
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from themis_ray.evaluate.metrics import COLLAPSE_SHARE, round_scores, to_scores

UNPARSED = "unparsed"


def _safe_name(name: str) -> str:
    """A judge name usable in a file name ("Qwen/Qwen2.5-7B" -> "Qwen_Qwen2.5-7B")."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "judge"


def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _binned(pred: Any, gold: Any, scale: tuple[int, int]):
    """Scores as column indices: 0..k-1 for low..high, k for unparsed; records without gold dropped."""
    low, high = int(scale[0]), int(scale[1])
    p = round_scores(to_scores(pred, scale))  # out-of-scale predictions count as unparsed
    g = round_scores(to_scores(gold))
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} != {len(g)}")
    keep = ~np.isnan(g) & (g >= low) & (g <= high)
    p, g = p[keep], g[keep]
    k = high - low + 1
    p_idx = np.where(np.isnan(p), k, np.nan_to_num(p, nan=low) - low).astype(int)
    g_idx = (g - low).astype(int)
    return p_idx, g_idx, k


def write_plots(
    out_dir: str | Path,
    pred: Sequence[Any],
    gold: Sequence[Any],
    scale: tuple[int, int] = (1, 5),
    name: str = "judge",
) -> list[Path]:
    """Write <name>_confusion.png and <name>_scores.png under out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = _safe_name(name)
    p_idx, g_idx, k = _binned(pred, gold, scale)
    labels = [str(s) for s in range(int(scale[0]), int(scale[1]) + 1)]

    # Confusion matrix: rows gold, columns predicted (rounded), last column unparsed.
    counts = np.zeros((k, k + 1), dtype=int)
    np.add.at(counts, (g_idx, p_idx), 1)
    fig = _figure(1.1 * (k + 1) + 2.0, 1.0 * k + 1.8)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(counts, cmap="Blues", aspect="auto", vmin=0)
    fig.colorbar(im, ax=ax, label="records")
    peak = counts.max() if counts.size else 0
    for (i, j), c in np.ndenumerate(counts):
        ax.text(j, i, str(c), ha="center", va="center", color="white" if peak and c > peak / 2 else "black")
    ax.set_xticks(range(k + 1), labels + [UNPARSED])
    ax.set_yticks(range(k), labels)
    ax.set_xlabel("predicted score (rounded)")
    ax.set_ylabel("gold score")
    ax.set_title(f"{name}: predicted vs gold (n={len(g_idx)})")
    fig.tight_layout()
    confusion = out / f"{stem}_confusion.png"
    fig.savefig(confusion)

    # Score histogram: gold and predicted counts side by side per score.
    gold_counts = np.bincount(g_idx, minlength=k + 1)
    pred_counts = np.bincount(p_idx, minlength=k + 1)
    x = np.arange(k + 1)
    fig = _figure(1.0 * (k + 1) + 2.5, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    ax.bar(x - 0.2, gold_counts, width=0.4, label="gold", color="tab:gray")
    ax.bar(x + 0.2, pred_counts, width=0.4, label=name, color="tab:blue")
    ax.set_xticks(x, labels + [UNPARSED])
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.set_title(f"{name}: score distribution (n={len(g_idx)})")
    ax.legend()
    fig.tight_layout()
    scores = out / f"{stem}_scores.png"
    fig.savefig(scores)
    return [confusion, scores]


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def format_table(rows: list[dict], columns: list[str]) -> str:
    """Aligned plain-text table: floats to 3 decimals, None or a missing key as '-', numbers right-aligned."""
    cells = [[_cell(row.get(col)) for col in columns] for row in rows]
    numeric = [
        all(
            isinstance(row.get(col), (int, float, np.integer, np.floating)) or row.get(col) is None
            for row in rows
        )
        and any(row.get(col) is not None for row in rows)
        for col in columns
    ]
    widths = [max([len(col)] + [len(r[i]) for r in cells]) for i, col in enumerate(columns)]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)]
        return "  ".join(parts).rstrip()

    out = [line(list(columns)), "  ".join("-" * w for w in widths)]
    out += [line(r) for r in cells]
    return "\n".join(out)


# ------------------------------------------------------------------------------------ more plots


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path)
    return path


def _finite(value: Any) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan


def plot_scenario_bars(
    out_dir: str | Path,
    by_scenario: dict[str, dict[str, dict]],
    metrics: Sequence[str] = ("mae", "agreement", "accuracy", "aggregate"),
    name: str = "scenarios",
) -> Path:
    """<name>_by_scenario.png: one panel per metric, a group of bars per scenario, one bar per judge."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    judges = list(by_scenario)
    scenarios = sorted({s for per in by_scenario.values() for s in per})
    x = np.arange(len(scenarios))
    width = 0.8 / max(1, len(judges))
    fig = _figure(max(6.0, 0.9 * len(scenarios) + 3.0), 2.6 * len(metrics) + 0.6)
    for row, metric in enumerate(metrics):
        ax = fig.add_subplot(len(metrics), 1, row + 1)
        for k, judge in enumerate(judges):
            values = [_finite(by_scenario[judge].get(s, {}).get(metric)) for s in scenarios]
            ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(values, nan=0.0), width=width, label=judge)
        ax.set_ylabel(metric)
        ax.set_xticks(x, scenarios if row == len(metrics) - 1 else [""] * len(scenarios),
                      rotation=30, ha="right")
        ax.axhline(0, color="black", linewidth=0.5)
        if row == 0:
            ax.set_title(f"{name}: metrics per scenario (missing values drawn as 0)")
            ax.legend(fontsize="small")
    return _save(fig, out / f"{_safe_name(name)}_by_scenario.png")


def plot_calibration(
    out_dir: str | Path,
    expected: Sequence[Any],
    gold: Sequence[Any],
    scale: tuple[int, int] = (1, 5),
    name: str = "judge",
    bins: int = 8,
) -> Path | None:
    """<name>_calibration.png: mean gold score per bin of the judge's expected score, with counts.

    None (no file) when the judge gave no expected score (no score distribution).
    """
    e, g = to_scores(expected, scale), to_scores(gold)
    if len(e) != len(g):
        raise ValueError(f"expected and gold differ in length: {len(e)} != {len(g)}")
    keep = ~np.isnan(e) & ~np.isnan(g)
    if not keep.any():
        return None
    e, g = e[keep], g[keep]
    low, high = float(scale[0]), float(scale[1])
    edges = np.linspace(low, high, bins + 1)
    which = np.clip(np.digitize(e, edges) - 1, 0, bins - 1)
    centers, means, counts = [], [], []
    for b in range(bins):
        sel = which == b
        if sel.any():
            centers.append(float(e[sel].mean()))
            means.append(float(g[sel].mean()))
            counts.append(int(sel.sum()))
    fig = _figure(5.5, 5.0)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot([low, high], [low, high], color="gray", linestyle="--", label="perfect calibration")
    ax.plot(centers, means, marker="o", color="tab:blue", label=name)
    for cx, cy, c in zip(centers, means, counts):
        ax.annotate(str(c), (cx, cy), textcoords="offset points", xytext=(4, 6), fontsize="small")
    ax.set_xlim(low - 0.2, high + 0.2)
    ax.set_ylim(low - 0.2, high + 0.2)
    ax.set_xlabel("expected score (probability-weighted)")
    ax.set_ylabel("mean gold score")
    ax.set_title(f"{name}: calibration (n={len(e)}; labels: records per bin)")
    ax.legend(fontsize="small")
    return _save(fig, Path(out_dir) / f"{_safe_name(name)}_calibration.png")


def plot_pairwise(out_dir: str | Path, overall_by_judge: dict[str, dict], name: str = "pairwise") -> Path:
    """<name>_consistency.png: accuracy, position consistency, tie rate and length bias per judge."""
    metrics = ["accuracy", "accuracy_without_ties", "position_consistency", "tie_rate", "longer_wins_share"]
    judges = list(overall_by_judge)
    x = np.arange(len(metrics))
    width = 0.8 / max(1, len(judges))
    fig = _figure(max(6.5, 1.4 * len(metrics) + 2), 4.2)
    ax = fig.add_subplot(1, 1, 1)
    for k, judge in enumerate(judges):
        values = [_finite(overall_by_judge[judge].get(m)) for m in metrics]
        ax.bar(x - 0.4 + width * (k + 0.5), np.nan_to_num(values, nan=0.0), width=width, label=judge)
    gold = [_finite(m.get("gold_longer_wins_share")) for m in overall_by_judge.values()]
    if gold and not math.isnan(gold[0]):
        ax.hlines(gold[0], x[-1] - 0.45, x[-1] + 0.45, colors="black", linestyles="--", label="gold: longer wins")
    ax.set_xticks(x, [m.replace("_", " ") for m in metrics], rotation=15)
    ax.set_ylim(0, 1.05)
    ax.set_title(f"{name}: pairwise accuracy, consistency across orders, length bias")
    ax.legend(fontsize="small")
    return _save(fig, Path(out_dir) / f"{_safe_name(name)}_consistency.png")


def plot_score_distributions(
    out_dir: str | Path, preds_by_judge: dict[str, Sequence[Any]], scale: tuple[int, int] = (1, 5),
    name: str = "judges",
) -> Path:
    """<name>_scores.png: each judge's (rounded) score counts side by side, unparsed last."""
    low, high = int(scale[0]), int(scale[1])
    k = high - low + 1
    labels = [str(s) for s in range(low, high + 1)] + [UNPARSED]
    judges = list(preds_by_judge)
    x = np.arange(k + 1)
    width = 0.8 / max(1, len(judges))
    fig = _figure(1.0 * (k + 1) + 3.0, 3.8)
    ax = fig.add_subplot(1, 1, 1)
    for j, judge in enumerate(judges):
        p = round_scores(to_scores(preds_by_judge[judge], scale))
        idx = np.where(np.isnan(p), k, np.nan_to_num(p, nan=low) - low).astype(int)
        ax.bar(x - 0.4 + width * (j + 0.5), np.bincount(idx, minlength=k + 1), width=width, label=judge)
    ax.set_xticks(x, labels)
    ax.set_xlabel("score")
    ax.set_ylabel("records")
    ax.set_title(f"{name}: score distribution per judge")
    ax.legend(fontsize="small")
    return _save(fig, Path(out_dir) / f"{_safe_name(name)}_scores.png")


def plot_judge_agreement(out_dir: str | Path, matrix: dict[str, dict[str, float]], name: str = "judges",
                         metric: str = "agreement") -> Path:
    """<name>_agreement.png: a judges x judges heatmap of `metric` between each pair (1 on the diagonal)."""
    judges = list(matrix)
    values = np.array([[1.0 if a == b else _finite(matrix[a].get(b)) for b in judges] for a in judges])
    fig = _figure(1.2 * len(judges) + 3.0, 1.0 * len(judges) + 2.2)
    ax = fig.add_subplot(1, 1, 1)
    im = ax.imshow(np.nan_to_num(values, nan=0.0), cmap="Greens", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, label=metric)
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, "nan" if math.isnan(v) else f"{v:.2f}", ha="center", va="center")
    ax.set_xticks(range(len(judges)), judges, rotation=30, ha="right")
    ax.set_yticks(range(len(judges)), judges)
    ax.set_title(f"{name}: {metric} between judges")
    return _save(fig, Path(out_dir) / f"{_safe_name(name)}_agreement.png")


# ---------------------------------------------------------------------------------------- HTML


@dataclass
class Section:
    title: str
    text: str = ""
    tables: list[tuple[str, list[dict], list[str]]] = field(default_factory=list)  # (caption, rows, columns)
    images: list[tuple[str, str]] = field(default_factory=list)  # (caption, file name relative to the page)


_STYLE = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em;font-size:0.9em}
th,td{border:1px solid #ccc;padding:0.25em 0.6em}th{background:#f3f3f3}td.num{text-align:right}
figure{display:inline-block;margin:0.5em 1em 1em 0;vertical-align:top}figcaption{font-size:0.85em;color:#555}
img{max-width:100%}caption{text-align:left;font-weight:bold;padding:0.3em 0}"""


def html_table(rows: list[dict], columns: list[str], caption: str = "") -> str:
    """A static HTML table: floats to 3 decimals, None as '-', every cell escaped."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = []
        for c in columns:
            value = row.get(c)
            numeric = isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)
            cls = ' class="num"' if numeric else ""
            cells.append(f"<td{cls}>{html.escape(_cell(value))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def write_html(path: str | Path, title: str, sections: list[Section], intro: str = "") -> Path:
    """A self-contained static page (no scripts); images are referenced by relative file name."""
    parts = [f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    if intro:
        parts.append(f"<p>{html.escape(intro)}</p>")
    for section in sections:
        parts.append(f"<h2>{html.escape(section.title)}</h2>")
        if section.text:
            parts.append(f"<p>{html.escape(section.text)}</p>")
        for caption, rows, columns in section.tables:
            parts.append(html_table(rows, columns, caption))
        for caption, file in section.images:
            src = html.escape(Path(file).name, quote=True)
            parts.append(f'<figure><img src="{src}" alt="{html.escape(caption, quote=True)}">'
                         f"<figcaption>{html.escape(caption)}</figcaption></figure>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- the whole report


def _prefix(benchmark: str, judge: str) -> str:
    # The validation split keeps the historical names (<judge>_confusion.png); others are prefixed.
    return judge if benchmark == "validation" else f"{benchmark}_{judge}"


def write_report(out_dir: str | Path, results: list, title: str = "Judge meta-evaluation") -> Path:
    """Every plot of every benchmark, and report.html that shows them with the metric tables.

    `results` are `results.BenchmarkResult`s with their summaries filled in.
    """
    from themis_ray.evaluate.results import headline_rows, scenario_rows

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for result in results:
        bench, kind, scale = result.benchmark.name, result.benchmark.kind, tuple(result.benchmark.scale)
        rows, columns = headline_rows(result)
        s_rows, s_columns = scenario_rows(result)
        text = f"{result.benchmark.source}. Records: {result.benchmark.num_records}; rejected: " \
               f"{result.benchmark.num_rejects}. Judges: " + \
               ", ".join(f"{j} ({result.judge_labels.get(j, '?')})" for j in result.graded)
        collapsed = [j for j, s in result.summaries.items() if s["overall"].get("collapsed")]
        if collapsed:
            text += (f". COLLAPSED: {', '.join(collapsed)} gave one score or verdict to at least "
                     f"{COLLAPSE_SHARE:.0%} of the records it answered, so it ranks nothing")
        if kind == "field":
            text += (". Rows baseline:random (uniform scores; a uniform A/B/tie verdict in each order) and "
                     "baseline:longer (the longer response wins) are scored by the same rule")
        caption = {"unlabelled": "per category", "field": "per subset"}.get(kind, "per scenario")
        section = Section(title=f"{bench} ({kind})", text=text,
                          tables=[("headline, one row per judge", rows, columns), (caption, s_rows, s_columns)])
        images = section.images
        if kind == "field":
            from themis_ray.evaluate.field import HEADLINE

            by_subset = {j: s["by_scenario"] for j, s in result.summaries.items()}
            if any(by_subset.values()):
                images.append(("the headline figure per subset, judges and baselines", plot_scenario_bars(
                    out, by_subset, metrics=(HEADLINE[bench][0], "parse_rate"), name=bench)))
        elif kind == "pointwise":
            by_scenario = {j: s["by_scenario"] for j, s in result.summaries.items()}
            if any(by_scenario.values()):
                images.append(("metrics per scenario", plot_scenario_bars(out, by_scenario, name=bench)))
            for judge, df in result.graded.items():
                if len(df):
                    for path in write_plots(out, df["predicted_score"], df["score"], scale, name=_prefix(bench, judge)):
                        images.append((f"{judge}: {path.stem.rsplit('_', 1)[-1]}", path))
                if "predicted_expected" in df:
                    path = plot_calibration(out, df["predicted_expected"], df["score"], scale, _prefix(bench, judge))
                    if path is not None:
                        images.append((f"{judge}: calibration of the expected score", path))
        elif kind == "pairwise":
            by_scenario = {j: s["by_scenario"] for j, s in result.summaries.items()}
            if any(by_scenario.values()):
                images.append(("metrics per scenario", plot_scenario_bars(
                    out, by_scenario, metrics=("accuracy", "position_consistency", "aggregate"), name=bench)))
            overall = {j: s["overall"] for j, s in result.summaries.items()}
            images.append(("pairwise consistency and length bias", plot_pairwise(out, overall, name=bench)))
        elif kind == "injection":
            by_scenario = {j: s["by_scenario"] for j, s in result.summaries.items()}
            if any(by_scenario.values()):
                images.append(("score shift under the injection, per scenario (0: immune)", plot_scenario_bars(
                    out, by_scenario, metrics=("score_shift", "expected_shift"), name=bench)))
        else:
            preds = {j: df["predicted_score"] for j, df in result.graded.items()}
            images.append(("score distribution per judge", plot_score_distributions(out, preds, scale, name=bench)))
            matrix = {j: {o: a.get("agreement") for o, a in s.get("vs_judges", {}).items()}
                      for j, s in result.summaries.items()}
            images.append(("Agr(2,2) between judges", plot_judge_agreement(out, matrix, name=bench)))
            vs_rows = [{"judge": j, "other": o, **a} for j, s in result.summaries.items()
                       for o, a in s.get("vs_judges", {}).items()]
            section.tables.append(("agreement between judges (the other judge's score taken as reference)", vs_rows,
                                   ["judge", "other", "n", "n_both_parsed", "mae", "agreement", "accuracy",
                                    "pearson", "spearman", "kendall", "responder_ranking_kendall"]))
            resp_rows = [{"judge": j, "responder": r, **m} for j, s in result.summaries.items()
                         for r, m in s.get("by_responder", {}).items()]
            section.tables.append(("mean score per responder", resp_rows,
                                   ["judge", "responder", "n", "parse_rate", "mean_score"]))
        sections.append(section)
    intro = ("Aggregate: each metric mapped linearly so that uniform random guessing over the scale, scored "
             "against these gold labels, is 0 and a perfect judge is 1, then averaged. Quality metrics are "
             "over parsed answers; read them with the parse rate. Intervals are percentile bootstrap.")
    return write_html(out / "report.html", title, sections, intro=intro)
