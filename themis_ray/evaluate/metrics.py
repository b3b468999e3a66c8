"""Meta-evaluation metrics for judges, as in the Themis paper (arXiv 2502.02988).

Pure numpy/scipy functions over plain sequences (lists, numpy arrays, pandas Series).

Unparsable outputs. A pointwise prediction is *unparsed* when it is None, NaN, infinite or not a
number (and, in `pointwise_metrics`, when it lies outside the rating scale, as `parse_evaluation`
would reject it). A pairwise verdict is unparsed unless it is "A", "B" or "C" (C is a tie).
`parse_rate` reports how many were parsed; every other metric is computed on the parsed records only
(records whose gold label is missing are dropped as well), so a judge that fails to answer is not also
scored as if it had answered badly. Read the quality metrics together with the parse rate; the
`*_metrics` helpers return both, with `n` (records with a gold label) and `n_parsed`.
The one exception is `position_consistency`: a missing verdict in either order counts as
inconsistent, as `judging.combine_pairwise` treats it.

Undefined values are NaN (no parsed record, fewer than two points or constant input for a
correlation); no warnings are emitted for them.

Aggregation follows the paper: each metric is normalised linearly so that random guessing scores 0
and a perfect judge 1 (`normalize`, `random_baseline`), then the normalised values are averaged
(`aggregate`). MAE works the same way with its ideal at 0, because the map is linear.

The aggregate answers for every record, parsed or not. Given the parse rate p, a normalised metric
v measured on the parsed records only becomes `p * v + (1 - p) * min(v, 0)` (`credit_unparsed`): an
unparsed record earns what random guessing earns (0), or what the judge's parsed answers earn when
those are worse than random, so failing to answer never scores better than answering. A judge that
parses 1% of the records with perfect answers aggregates to 0.01, not 1; one that parses nothing, 0.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from themis_ray.judging import unswap_verdict

VERDICTS = ("A", "B", "C")  # A wins, B wins, tie

# --------------------------------------------------------------------------------------- helpers


def _as_array(x: Any) -> np.ndarray:
    """A 1-D numpy array of any sequence: float (NaN for None) when all values are numbers or None."""
    if isinstance(x, np.ndarray):
        arr = x
    elif hasattr(x, "to_numpy"):  # pandas Series / Index
        arr = x.to_numpy()
    else:
        arr = np.asarray(list(x), dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"expected a 1-D sequence, got shape {arr.shape}")
    if arr.dtype == object and arr.size and all(v is None or _is_number(v) for v in arr):
        arr = np.array([math.nan if v is None else float(v) for v in arr], dtype=float)
    return arr


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, (bool, np.bool_))


def _to_float(v: Any) -> float:
    """One value as a float, NaN when it is not a finite number."""
    if v is None or isinstance(v, (bool, np.bool_)):
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        return math.nan
    return f if math.isfinite(f) else math.nan


def to_scores(pred: Any, scale: Optional[tuple[float, float]] = None) -> np.ndarray:
    """Scores as a float array, NaN where unparsable (or outside `scale`, when given)."""
    arr = _as_array(pred)
    if arr.dtype.kind in "iuf":
        out = arr.astype(float)
        out[~np.isfinite(out)] = np.nan
    else:
        out = np.array([_to_float(v) for v in arr], dtype=float)
    if scale is not None:
        low, high = scale
        with np.errstate(invalid="ignore"):
            out[(out < low) | (out > high)] = np.nan
    return out


def to_verdicts(verdicts: Any) -> np.ndarray:
    """Verdicts as an object array of "A"/"B"/"C" ("tie" -> "C"), None where unparsable."""
    arr = _as_array(verdicts)
    out = np.empty(len(arr), dtype=object)
    for i, v in enumerate(arr):
        s = v.strip().upper() if isinstance(v, str) else None
        if s == "TIE":
            s = "C"
        out[i] = s if s in VERDICTS else None
    return out


def unswap(verdicts: Any) -> np.ndarray:
    """Verdicts given with A and B swapped, mapped back to the original order (A<->B, C stays)."""
    return np.array([unswap_verdict(v) for v in to_verdicts(verdicts)], dtype=object)


def round_scores(x: Any) -> np.ndarray:
    """Round to the nearest integer, halves up (2.5 -> 3), keeping NaN."""
    return np.floor(to_scores(x) + 0.5)


def _paired(pred: Any, gold: Any) -> tuple[np.ndarray, np.ndarray]:
    """The parsed (prediction, gold) pairs: records where both are finite numbers."""
    p, g = to_scores(pred), to_scores(gold)
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} != {len(g)}")
    keep = ~np.isnan(p) & ~np.isnan(g)
    return p[keep], g[keep]


# ------------------------------------------------------------------------------------ pointwise


def parse_rate(pred: Any) -> float:
    """Share of predictions that are finite numbers (NaN for no predictions)."""
    p = to_scores(pred)
    return float(np.mean(~np.isnan(p))) if len(p) else math.nan


def mae(pred: Any, gold: Any) -> float:
    """Mean absolute error over parsed records (lower is better)."""
    p, g = _paired(pred, gold)
    return float(np.mean(np.abs(p - g))) if len(p) else math.nan


def agreement(pred: Any, gold: Any, p: float = 2, q: float = 2) -> float:
    """Agr(p, q): mean of 1/(|pred-gold|+1)^q where |pred-gold| < p, else 0, over parsed records."""
    x, g = _paired(pred, gold)
    if not len(x):
        return math.nan
    d = np.abs(x - g)
    return float(np.mean(np.where(d < p, 1.0 / (d + 1.0) ** q, 0.0)))


def accuracy(pred: Any, gold: Any) -> float:
    """Exact-match rate after rounding predictions to the nearest integer (halves up)."""
    x, g = _paired(pred, gold)
    return float(np.mean(np.floor(x + 0.5) == g)) if len(x) else math.nan


def _correlation(fn: Callable, pred: Any, gold: Any) -> float:
    x, g = _paired(pred, gold)
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(g) == 0:
        return math.nan
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        r = float(fn(x, g).statistic)
    return r if math.isfinite(r) else math.nan


def pearson(pred: Any, gold: Any) -> float:
    """Pearson r over parsed records (NaN with < 2 points or constant input)."""
    return _correlation(stats.pearsonr, pred, gold)


def spearman(pred: Any, gold: Any) -> float:
    """Spearman rho over parsed records (NaN with < 2 points or constant input)."""
    return _correlation(stats.spearmanr, pred, gold)


def kendall(pred: Any, gold: Any) -> float:
    """Kendall tau-b over parsed records (NaN with < 2 points or constant input)."""
    return _correlation(stats.kendalltau, pred, gold)


POINTWISE_METRICS: dict[str, Callable[[Any, Any], float]] = {
    "mae": mae,
    "agreement": agreement,  # Agr(2, 2), as the paper reports
    "accuracy": accuracy,
    "pearson": pearson,
    "spearman": spearman,
    "kendall": kendall,
}
POINTWISE_IDEALS: dict[str, float] = {
    "mae": 0.0,
    "agreement": 1.0,
    "accuracy": 1.0,
    "pearson": 1.0,
    "spearman": 1.0,
    "kendall": 1.0,
}


def pointwise_metrics(pred: Any, gold: Any, scale: tuple[float, float] = (1, 5)) -> dict[str, float]:
    """All pointwise metrics plus n, n_parsed, parse_rate; out-of-scale predictions count as unparsed."""
    p, g = to_scores(pred, scale), to_scores(gold)
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} != {len(g)}")
    has_gold = ~np.isnan(g)
    p, g = p[has_gold], g[has_gold]
    n, n_parsed = len(g), int(np.sum(~np.isnan(p)))
    out: dict[str, float] = {
        "n": n,
        "n_parsed": n_parsed,
        "parse_rate": n_parsed / n if n else math.nan,
    }
    out.update({name: fn(p, g) for name, fn in POINTWISE_METRICS.items()})
    return out


# --------------------------------------------------------------------------------------- spread

COLLAPSE_SHARE = 0.9  # a judge that gives one value to this share of its parsed records is collapsed


def _parsed_values(values: Any) -> list[str]:
    """Parsed verdicts as they are and parsed scores rounded, as strings so both histogram alike."""
    out = []
    for v in _as_array(values):
        if isinstance(v, str) and v in VERDICTS:
            out.append(v)
        elif _is_number(v) and math.isfinite(float(v)):
            out.append(str(int(round(float(v)))))
    return out


def score_spread(values: Any) -> dict[str, float]:
    """Entropy (bits) of the histogram of parsed scores (rounded) or verdicts, the modal share, collapse.

    A judge that gives the same score or verdict to (nearly) everything ranks nothing, however good its
    MAE against a skewed gold: `collapsed` is True when one value covers COLLAPSE_SHARE of parsed records.
    """
    parsed = _parsed_values(values)
    if not parsed:
        return {"score_entropy": math.nan, "modal_share": math.nan, "collapsed": None}
    _, counts = np.unique(np.array(parsed), return_counts=True)
    share = counts / counts.sum()
    entropy = float(-(share * np.log2(share)).sum()) + 0.0
    modal = float(share.max())
    return {"score_entropy": entropy, "modal_share": modal, "collapsed": bool(modal >= COLLAPSE_SHARE)}


# ------------------------------------------------------------------------------------- pairwise


def _paired_verdicts(pred: Any, gold: Any) -> tuple[np.ndarray, np.ndarray]:
    p, g = to_verdicts(pred), to_verdicts(gold)
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} != {len(g)}")
    keep = np.array([a is not None and b is not None for a, b in zip(p, g)], dtype=bool)
    return p[keep], g[keep]


def pairwise_accuracy(pred: Any, gold: Any, with_ties: bool = True) -> float:
    """Share of parsed verdicts equal to gold; without ties: gold ties dropped, a predicted tie is wrong."""
    p, g = _paired_verdicts(pred, gold)
    if not with_ties:
        keep = g != "C"
        p, g = p[keep], g[keep]
    return float(np.mean(p == g)) if len(p) else math.nan


def position_consistency(verdict_ab: Any, verdict_ba_unswapped: Any) -> float:
    """Share of records judged the same in both orders (second already unswapped; None = inconsistent)."""
    a, b = to_verdicts(verdict_ab), to_verdicts(verdict_ba_unswapped)
    if len(a) != len(b):
        raise ValueError(f"verdict lists differ in length: {len(a)} != {len(b)}")
    if not len(a):
        return math.nan
    return float(np.mean([x is not None and x == y for x, y in zip(a, b)]))


def _lengths(x: Any) -> np.ndarray:
    arr = _as_array(x)
    if arr.dtype.kind in "iuf":
        return arr.astype(float)
    return np.array([len(v) if isinstance(v, str) else _to_float(v) for v in arr], dtype=float)


def longer_wins_share(verdicts: Any, len_a: Any, len_b: Any) -> float:
    """Share of decisive verdicts (A/B, lengths differ) won by the longer response; lengths or texts."""
    v, la, lb = to_verdicts(verdicts), _lengths(len_a), _lengths(len_b)
    if not len(v) == len(la) == len(lb):
        raise ValueError("verdicts, len_a and len_b differ in length")
    decisive = np.isin(v, ["A", "B"]) & ~np.isnan(la) & ~np.isnan(lb) & (la != lb)
    if not decisive.any():
        return math.nan
    a_longer = la[decisive] > lb[decisive]
    return float(np.mean((v[decisive] == "A") == a_longer))


def pairwise_metrics(
    pred: Any,
    gold: Any,
    verdict_ba_unswapped: Any = None,
    len_a: Any = None,
    len_b: Any = None,
) -> dict[str, Optional[float]]:
    """Pairwise accuracy with/without ties, tie rate, parse rate; consistency and length bias when given."""
    p, g = to_verdicts(pred), to_verdicts(gold)
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} != {len(g)}")
    has_gold = np.array([x is not None for x in g], dtype=bool)
    parsed = np.array([x is not None for x in p], dtype=bool) & has_gold
    n, n_parsed = int(has_gold.sum()), int(parsed.sum())
    out: dict[str, Optional[float]] = {
        "n": n,
        "n_parsed": n_parsed,
        "parse_rate": n_parsed / n if n else math.nan,
        "accuracy": pairwise_accuracy(p, g, with_ties=True),
        "accuracy_without_ties": pairwise_accuracy(p, g, with_ties=False),
        "tie_rate": float(np.mean(p[parsed] == "C")) if n_parsed else math.nan,
        "position_consistency": None,
        "longer_wins_share": None,
        "gold_longer_wins_share": None,
    }
    if verdict_ba_unswapped is not None:
        out["position_consistency"] = position_consistency(p, verdict_ba_unswapped)
    if len_a is not None and len_b is not None:
        out["longer_wins_share"] = longer_wins_share(p, len_a, len_b)
        out["gold_longer_wins_share"] = longer_wins_share(g, len_a, len_b)
    return out


# ---------------------------------------------------------------------------------- aggregation


def normalize(value: float, random: float, ideal: float) -> float:
    """Linear map with random -> 0 and ideal -> 1 (works for lower-is-better metrics too)."""
    if any(v is None or not math.isfinite(v) for v in (value, random, ideal)) or ideal == random:
        return math.nan
    return float((value - random) / (ideal - random))


def random_baseline(
    gold: Any,
    scale: Sequence[Any],
    metric_fn: Callable[[Any, Any], float],
    n_draws: int = 200,
    seed: int = 0,
) -> float:
    """Monte Carlo expected metric of uniform random predictions for these gold labels.

    `scale` is (low, high) for the integer scores low..high, or the labels to draw from, e.g.
    ("A", "B", "C") for pairwise verdicts. Draws whose metric is NaN are left out of the mean.
    """
    g = _as_array(gold)
    rng = np.random.default_rng(seed)
    if len(scale) == 2 and all(_is_number(s) for s in scale):
        g = to_scores(g)
        low, high = int(scale[0]), int(scale[1])
        draws = rng.integers(low, high + 1, size=(n_draws, len(g))).astype(float)
    else:
        draws = rng.choice(np.asarray(list(scale), dtype=object), size=(n_draws, len(g)))
    values = np.array([metric_fn(d, g) for d in draws], dtype=float)
    values = values[~np.isnan(values)]
    return float(values.mean()) if len(values) else math.nan


def pointwise_baselines(
    gold: Any, scale: tuple[int, int] = (1, 5), n_draws: int = 200, seed: int = 0
) -> dict[str, float]:
    """`random_baseline` of every metric in POINTWISE_METRICS for these gold scores."""
    return {name: random_baseline(gold, scale, fn, n_draws, seed) for name, fn in POINTWISE_METRICS.items()}


def credit_unparsed(value: float, parse_rate: Optional[float]) -> float:
    """A normalised metric measured on the parsed records, as a figure for all records.

    The parsed share `parse_rate` earns `value`; the unparsed share earns the random-guessing level
    (0), or `value` when that is below it: `p * value + (1 - p) * min(value, 0)`. With nothing parsed
    the result is 0 (`value` is then undefined). `parse_rate` None leaves `value` as it is.
    """
    if parse_rate is None:
        return value
    p = float(parse_rate)
    if not math.isfinite(p) or not 0 <= p <= 1:
        raise ValueError(f"parse_rate must be in [0, 1]; got {parse_rate}")
    if p == 0:
        return 0.0
    if value is None or not math.isfinite(value):
        return math.nan
    return float(p * value + (1 - p) * min(value, 0.0))


def aggregate(
    metrics: Mapping[str, Optional[float]],
    baselines: Mapping[str, float],
    ideals: Mapping[str, float],
    skipna: bool = False,
    parse_rate: Optional[float] = None,
    over_all_records: Sequence[str] = (),
) -> float:
    """Mean of normalised values over the metrics that have both a baseline and an ideal.

    A metric that is NaN (e.g. a correlation of constant predictions) makes the result NaN unless
    `skipna`, which averages the rest. With `parse_rate`, every metric except those named in
    `over_all_records` (already computed over every record, unparsed ones included) is taken as
    measured on the parsed records only and goes through `credit_unparsed`, so unparsed records count.
    A metric whose baseline is undefined (e.g. a correlation against constant gold labels) stays NaN.
    """
    keys = [k for k in metrics if k in baselines and k in ideals]
    if not keys:
        raise ValueError("no metric has both a baseline and an ideal")

    def one(k: str) -> float:
        value = normalize(metrics[k], baselines[k], ideals[k])
        if parse_rate is None or k in over_all_records:
            return value
        random, ideal = baselines[k], ideals[k]
        if random is None or not math.isfinite(random) or random == ideal:
            return math.nan  # no baseline: undefined, however many records parsed
        return credit_unparsed(value, parse_rate)

    values = np.array([one(k) for k in keys], dtype=float)
    if skipna:
        values = values[~np.isnan(values)]
        if not len(values):
            return math.nan
    return float(values.mean())


# ------------------------------------------------------------------------------------ bootstrap


def bootstrap_ci(
    pred: Any,
    gold: Any,
    metric_fn: Callable[[Any, Any], float],
    n: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) interval of metric_fn, resampling records with replacement."""
    p, g = _as_array(pred), _as_array(gold)
    if len(p) != len(g):
        raise ValueError(f"pred and gold differ in length: {len(p)} != {len(g)}")
    if not len(p):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(p), size=(n, len(p)))
    values = np.array([metric_fn(p[i], g[i]) for i in idx], dtype=float)
    values = values[~np.isnan(values)]
    if not len(values):
        return math.nan, math.nan
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# -------------------------------------------------------------------------------------- groups


def per_group(
    data: Any,
    group_key: Any,
    fn: Callable[[Any], dict],
    overall: Optional[str] = None,
) -> dict[Any, dict]:
    """fn(sub-DataFrame) for each group -> {group: metrics}; `overall` names an extra all-records entry.

    `data` is a DataFrame, a list of record dicts or a dict of equal-length lists; `group_key` is a
    column name or a sequence of group labels aligned with the records. Example:
    ``per_group(df, "scenario", lambda g: pointwise_metrics(g["pred"], g["gold"]))``.
    """
    import pandas as pd

    df = data if isinstance(data, pd.DataFrame) else pd.DataFrame(data)
    if isinstance(group_key, str):
        key: Any = group_key
    else:
        labels = list(group_key)
        if len(labels) != len(df):
            raise ValueError(f"group labels ({len(labels)}) and records ({len(df)}) differ in length")
        key = pd.Series(labels, index=df.index, dtype=object)
    out = {name: fn(group) for name, group in df.groupby(key, sort=True, dropna=False)}
    if overall is not None:
        out[overall] = fn(df)
    return out


__all__ = [
    "VERDICTS",
    "POINTWISE_METRICS",
    "POINTWISE_IDEALS",
    "to_scores",
    "to_verdicts",
    "unswap",
    "round_scores",
    "parse_rate",
    "mae",
    "agreement",
    "accuracy",
    "pearson",
    "spearman",
    "kendall",
    "pointwise_metrics",
    "pairwise_accuracy",
    "position_consistency",
    "longer_wins_share",
    "pairwise_metrics",
    "normalize",
    "credit_unparsed",
    "random_baseline",
    "pointwise_baselines",
    "aggregate",
    "bootstrap_ci",
    "per_group",
]
