"""The curation rules, keyed by id, and how one block of rows is decided once their statistics are known.

The rules run in this order; the first rule that drops a row names it in `curate_rule` (its id) and
`reject_reason` (what a person reads):

| id | step | drops |
|---|---|---|
| ifd_above_one | Cherry: IFD > 1 | IFD > 1 (the prompt does not make the answer easier) |
| ifd_zscore | Themis: IFD z-score | |z| of IFD within the row's scenario above `max_ifd_zscore` (scenarios of 3+ rows) |
| ifd_top_k | Cherry: top k% by IFD | all but the ceil(k%) highest IFD of the rows still in, ties broken by id |
| rebalance_score | score rebalancing | pointwise rows of a (scenario, score) kept with probability cap / count |
| rebalance_verdict | pairwise verdict balancing | pairwise rows of a (scenario, verdict class), the same way |
| scenario_mix | scenario mix | rows of a scenario kept with probability cap / count toward `scenario_weights` |

Then every row still in gets a split: train or validation, stratified by scenario and drawn per source
document (then per instruction), so a validation record shares its document and instruction with no
training record wherever the data allows (`split_groups`).

A `Plan` carries what the rules need: the per-scenario IFD statistics, the top-k cut, the keep
fractions and the split's thresholds. The driver fills it pass by pass from map-side aggregations
(`curate.plan`); `decide(block, plan)` applies the rules whose figures are in the plan, so the same
function computes every pass's live rows and the final decision. A sampling rule keeps a row when its
seeded digest (`keys.unit`) is below the keep fraction: deterministic for a seed, and the kept counts
match the caps up to binomial noise (the expected count is the cap).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from themis_ray.curate import keys
from themis_ray.judging import RatingScale

RULE = "curate_rule"  # the rule id beside `reject_reason`
SPLIT = "split"
LABEL_SCALE = RatingScale(1, 5)  # the scale the teacher labels on
_EPS = 1e-9


@dataclass(frozen=True)
class Rule:
    id: str
    step: str  # the step's name in the manifest and the report


RULES = (
    Rule("ifd_above_one", "Cherry: IFD > 1"),
    Rule("ifd_zscore", "Themis: IFD z-score"),
    Rule("ifd_top_k", "Cherry: top k% by IFD"),
    Rule("rebalance_score", "score rebalancing"),
    Rule("rebalance_verdict", "pairwise verdict balancing"),
    Rule("scenario_mix", "scenario mix"),
)
RULE_IDS = tuple(r.id for r in RULES)
IFD_RULES = RULE_IDS[:3]
BALANCE_RULES = RULE_IDS[3:]  # rows these drop were past the IFD rules: "before rebalancing" counts them


def ifd_column(cfg) -> str:
    if cfg.ifd_measure not in ("loss", "perplexity"):
        raise ValueError(f"curate.ifd_measure must be 'loss' or 'perplexity', got {cfg.ifd_measure!r}")
    return "ifd" if cfg.ifd_measure == "loss" else "ifd_ppl"


def score_weights(cfg) -> dict[int, float]:
    scores = LABEL_SCALE.scores
    target = list(cfg.rebalance_target) if cfg.rebalance_target is not None else [1.0] * len(scores)
    if len(target) != len(scores) or any(w < 0 for w in target) or sum(target) <= 0:
        raise ValueError(f"curate.rebalance_target needs {len(scores)} non-negative weights (scores "
                         f"{scores[0]}..{scores[-1]}) with a positive sum; got {target}")
    return dict(zip(scores, map(float, target)))


def caps(counts: dict, weights: dict, ratio: float) -> dict:
    """How many of each class to keep: at most `ratio` times its target share of the scarcest class.

    counts: present classes -> rows; weights: class -> target weight (absent: 0). A class with weight 0
    keeps nothing; with uniform weights this is min(count, ceil(ratio * rarest count)).
    """
    counts = {k: n for k, n in counts.items() if n > 0}
    total = sum(weights.get(k, 0.0) for k in counts)
    if total <= 0:
        return dict(counts)  # no target among present classes: leave as is
    share = {k: weights.get(k, 0.0) / total for k in counts}
    scale = min(counts[k] / share[k] for k in counts if share[k] > 0)
    return {k: min(int(n), math.ceil(ratio * share[k] * scale - _EPS)) for k, n in counts.items()}


def keep_fractions(counts: dict, capped: dict) -> dict:
    """cap / count per class: the probability a row of the class is kept."""
    return {k: min(1.0, capped[k] / n) for k, n in counts.items() if n > 0}


def verdict_class(verdict: Optional[str], swap_pairwise: bool) -> str:
    """The class pairwise balancing counts: with swapping, A and B are one class (a swapped copy makes
    them equal by itself) and a tie counts twice; without, A, B and C each."""
    if verdict not in ("A", "B", "C"):
        return "invalid"
    if swap_pairwise:
        return "A or B" if verdict in ("A", "B") else "C"
    return verdict


def verdict_caps(counts: dict[str, int], swap_pairwise: bool, ratio: float) -> dict[str, int]:
    """Caps of the pairwise classes of one scenario (see verdict_class)."""
    if swap_pairwise:
        effective = {k: n * (2 if k == "C" else 1) for k, n in counts.items()}
        capped = caps(effective, {"A or B": 1.0, "C": 1.0}, ratio)
        return {k: (math.ceil(c / 2) if k == "C" else c) for k, c in capped.items()}
    return caps(counts, {"A": 1.0, "B": 1.0, "C": 1.0}, ratio)


@dataclass
class Plan:
    """What the workers need to decide a row. A rule applies once its figures are set."""

    column: str  # ifd or ifd_ppl
    seed: int = 0
    drop_ifd_above_one: bool = False
    max_ifd_zscore: Optional[float] = None
    zstats: Optional[dict[str, tuple[float, float, int]]] = None  # scenario -> (mean, sd, count)
    keep_top_percent: float = 100.0
    top_cut: Optional[str] = None  # a descending key: rows whose key is larger are below the top
    score_keep: Optional[dict[str, dict[int, float]]] = None  # scenario -> rounded score -> fraction
    verdict_keep: Optional[dict[str, dict[str, float]]] = None  # scenario -> verdict class -> fraction
    swap_pairwise: bool = True
    mix_keep: Optional[dict[str, float]] = None  # scenario -> fraction
    validation_fraction: Optional[float] = None  # the split applies once set
    # Scenarios split exactly: the largest split key that goes to validation ("" for none). Others draw.
    exact_split: dict[str, str] = field(default_factory=dict)


@dataclass
class Decision:
    rule: np.ndarray  # rule id or None, per row
    reason: np.ndarray  # reject_reason or None
    split: np.ndarray  # train | validation | None (dropped, or no split planned yet)

    @property
    def live(self) -> np.ndarray:
        return np.array([r is None for r in self.rule], dtype=bool)


def floats(batch: pa.Table, name: str) -> np.ndarray:
    """A numeric column as float64 with NaN for null (all NaN when the column is missing)."""
    if name not in batch.column_names:
        return np.full(batch.num_rows, np.nan)
    return np.asarray(batch[name].cast(pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


def strings(batch: pa.Table, name: str) -> list:
    return batch[name].to_pylist() if name in batch.column_names else [None] * batch.num_rows


def pairwise_mask(batch: pa.Table) -> np.ndarray:
    return np.array([m == "pairwise" for m in strings(batch, "mode")], dtype=bool)


def split_groups(batch: pa.Table) -> tuple[list[str], list[str]]:
    """Per row, its source document and its instruction, the groups the split keeps together: a row
    without a document (quizzing, a pair without one) is a group of its instruction, a row without an
    instruction id one of its own id."""
    ids = [str(i) for i in batch["id"].to_pylist()]
    instructions = [f"instruction:{i}" if i is not None else f"record:{r}"
                    for i, r in zip(strings(batch, "instruction_id"), ids)]
    docs = [f"doc:{d}" if d is not None else g for d, g in zip(strings(batch, "doc_id"), instructions)]
    return docs, instructions


def decide(batch: pa.Table, plan: Plan) -> Decision:
    """The rules in order over one block, each applied when its figures are in the plan."""
    n = batch.num_rows
    ids = [str(i) for i in batch["id"].to_pylist()]
    scenario = strings(batch, "scenario")
    x = floats(batch, plan.column)
    rule = np.full(n, None, dtype=object)
    reason = np.full(n, None, dtype=object)
    live = np.ones(n, dtype=bool)

    def drop(mask: np.ndarray, rule_id: str, why: str | Callable[[int], str]) -> None:
        hit = np.flatnonzero(mask & live)
        if len(hit):
            rule[hit] = rule_id
            reason[hit] = [why(i) for i in hit] if callable(why) else why
            live[hit] = False

    if plan.drop_ifd_above_one:
        with np.errstate(invalid="ignore"):
            drop(x > 1, "ifd_above_one", "IFD > 1: the prompt does not make the answer easier")
    if plan.max_ifd_zscore is not None and plan.zstats is not None:
        stats = [plan.zstats.get(s) for s in scenario]
        mean = np.array([s[0] if s else np.nan for s in stats], dtype=np.float64)
        sd = np.array([s[1] if s else np.nan for s in stats], dtype=np.float64)
        count = np.array([s[2] if s else 0 for s in stats])
        with np.errstate(all="ignore"):
            z = np.abs(x - mean) / sd
            far = z > plan.max_ifd_zscore
        drop(far & (count >= 3), "ifd_zscore",  # a z-score of two points means nothing
             f"IFD z-score within scenario > {plan.max_ifd_zscore:g}")
    if plan.top_cut is not None:
        cut = plan.top_cut
        below = np.array([k > cut for k in keys.desc_keys(x, ids)], dtype=bool)
        drop(below, "ifd_top_k", f"IFD below the top {plan.keep_top_percent:g}%")
    pairwise = pairwise_mask(batch)
    hashes = keys.id_hashes(ids) if (plan.score_keep is not None or plan.verdict_keep is not None
                                     or plan.mix_keep is not None or plan.validation_fraction is not None) else None
    if plan.score_keep is not None or plan.verdict_keep is not None:
        u = keys.unit_of(hashes, plan.seed, "rebalance")
    if plan.score_keep is not None:
        score = floats(batch, "score")
        scored = ~pairwise & ~np.isnan(score)
        rounded = np.where(scored, np.round(np.nan_to_num(score)), 0).astype(int)
        fraction = np.array([plan.score_keep.get(s, {}).get(int(r), 1.0) if ok else 1.0
                             for s, r, ok in zip(scenario, rounded, scored)])
        drop(scored & (u >= fraction), "rebalance_score",
             lambda i: f"rebalanced: score {rounded[i]} over-represented in {scenario[i]}")
    if plan.verdict_keep is not None:
        klass = [verdict_class(v, plan.swap_pairwise) for v in strings(batch, "verdict")]
        fraction = np.array([plan.verdict_keep.get(s, {}).get(k, 1.0) if p else 1.0
                             for s, k, p in zip(scenario, klass, pairwise)])
        drop(pairwise & (u >= fraction), "rebalance_verdict",
             lambda i: f"pairwise balance: verdict {klass[i]} over-represented in {scenario[i]}")
    if plan.mix_keep is not None:
        fraction = np.array([plan.mix_keep.get(s, 1.0) for s in scenario])
        drop(keys.unit_of(hashes, plan.seed, "mix") >= fraction, "scenario_mix",
             lambda i: f"scenario mix: {scenario[i]} above its weight")
    split = np.full(n, None, dtype=object)
    if plan.validation_fraction is not None and live.any():
        docs, instructions = split_groups(batch)
        rows = np.flatnonzero(live)
        # Exact scenarios compare the row's key with the cut; the others draw per document.
        split_key = keys.split_keys([ids[i] for i in rows], [docs[i] for i in rows], [instructions[i] for i in rows],
                                    plan.seed)
        draw = keys.unit([docs[i] for i in rows], plan.seed, "split")
        for k, i in enumerate(rows):
            s = scenario[i]
            if s in plan.exact_split:
                validation = split_key[k] <= plan.exact_split[s]
            else:
                validation = draw[k] < plan.validation_fraction
            split[i] = "validation" if validation else "train"
    return Decision(rule=rule, reason=reason, split=split)
