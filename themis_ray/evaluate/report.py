"""Plots and plain-text tables for a judge's meta-evaluation.

Plots are drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch), so they
are safe to make from workers and threads without a display.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from themis_ray.evaluate.metrics import round_scores, to_scores

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
