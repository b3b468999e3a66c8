"""Map-side figures of the curation: each block reduced to summable numbers, merged on the driver.

Two kinds:

- the passes before the write (`count_pass`, `top_pass`, `gram_pass`, `audit_pass`): each decides its
  block with the plan as far as it is known (`rules.decide`) and sums what the next decision needs:
  per-scenario counts, IFD moments, score and verdict counts, the keys around the top-k cut, the split
  keys of small scenarios, the regressions' normal equations, what augmentation made and could not make;
- `written_stats`: what each written part holds (kept rows per scenario, rejects per rule and scenario,
  splits, copies per kind, score and IFD histograms per scenario and fate), summed from the parts'
  footers into the manifest and the report. No row ever reaches the driver.

Every function returns JSON-able dicts with string keys (`executor.partials` sends them as JSON).
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Optional

import numpy as np
import pyarrow as pa

from themis_ray.curate import keys
from themis_ray.curate.augment import KIND, AugmentPlan, complete_scores, copies_of, gram_figures
from themis_ray.curate.rules import (
    RULE,
    RULE_IDS,
    RULES,
    SPLIT,
    Plan,
    decide,
    floats,
    pairwise_mask,
    split_groups,
    strings,
    verdict_class,
)
from themis_ray.scenarios import get_scenario

BINS_PER_OCTAVE = 32  # IFD histograms: bins of 2**(1/32) (2.2%) in ratio, so any range fits


def _count(values) -> dict[str, int]:
    return {str(k): int(v) for k, v in Counter(values).items()}


def _nested(pairs) -> dict:
    """[(outer, inner)] -> {outer: {inner: count}}."""
    out: dict = {}
    for outer, inner in pairs:
        d = out.setdefault(str(outer), {})
        d[str(inner)] = d.get(str(inner), 0) + 1
    return out


# ------------------------------------------------------------------------------------ the passes


def count_pass(batch: pa.Table, plan: Plan, moments: bool = False, scores: bool = False,
               collect_split: tuple = ()) -> dict:
    """Rows still in per scenario (`live`), pairwise verdict classes (`verdicts`), and on request:
    IFD moments per scenario over finite values (`moments`: n, sum and sum of squares of IFD - 1, the
    shift keeping the sums well conditioned), rounded pointwise scores per scenario (`scores`), and the
    split keys of the rows of the scenarios in `collect_split` (`split_keys`)."""
    d = decide(batch, plan)
    live = d.live
    scenario = strings(batch, "scenario")
    pairwise = pairwise_mask(batch)
    out: dict = {"live": _count(s for s, ok in zip(scenario, live) if ok)}
    verdict = strings(batch, "verdict")
    out["verdicts"] = _nested((scenario[i], verdict_class(verdict[i], plan.swap_pairwise))
                              for i in np.flatnonzero(live & pairwise))
    if moments:
        x = floats(batch, plan.column) - 1.0
        figures: dict = {}
        for i in np.flatnonzero(live & np.isfinite(x)):
            m = figures.setdefault(scenario[i], {"n": 0, "s": 0.0, "ss": 0.0})
            m["n"] += 1
            m["s"] += float(x[i])
            m["ss"] += float(x[i]) ** 2
        out["moments"] = figures
    if scores:
        score = floats(batch, "score")
        ok = live & ~pairwise & ~np.isnan(score)
        out["scores"] = _nested((scenario[i], int(np.round(score[i]))) for i in np.flatnonzero(ok))
    if collect_split:
        wanted = set(collect_split)
        rows = [i for i in np.flatnonzero(live) if scenario[i] in wanted]
        ids = [str(batch["id"][i].as_py()) for i in rows]
        docs, instructions = split_groups(batch)
        split_keys = keys.split_keys(ids, [docs[i] for i in rows], [instructions[i] for i in rows], plan.seed)
        out["split_keys"] = {}
        for i, key in zip(rows, split_keys):
            out["split_keys"].setdefault(scenario[i], {})[key] = 1
    return out


def top_pass(batch: pa.Table, plan: Plan, prefix: str = "", width: int = 0, collect: bool = False) -> dict:
    """Descending IFD keys of the rows still in that start with `prefix`: counted by their next `width`
    characters (`labels`, with `live` per scenario), or all of them (`keys`) when `collect`."""
    d = decide(batch, plan)
    live = np.flatnonzero(d.live)
    x = floats(batch, plan.column)[live]
    ids = [str(v) for v in batch["id"].take(pa.array(live, pa.int64())).to_pylist()] if len(live) else []
    found = [k for k in keys.desc_keys(x, ids) if k.startswith(prefix)]
    if collect:
        return {"keys": _count(found)}
    out = {"labels": _count(k[len(prefix):len(prefix) + width] for k in found)}
    if not prefix:
        scenario = strings(batch, "scenario")
        out["live"] = _count(scenario[i] for i in live)
    return out


def _rows(batch: pa.Table, mask: np.ndarray) -> list[dict]:
    index = np.flatnonzero(mask)
    return batch.take(pa.array(index, pa.int64())).to_pylist() if len(index) else []


def gram_pass(batch: pa.Table, plan: Plan, scenarios_dir: Optional[str] = None) -> dict:
    """The normal equations of the overall score on the criteria, per scenario, over the kept pointwise
    train records that score every criterion (`augment.gram_figures`)."""
    d = decide(batch, plan)
    train = d.live & (d.split == "train") & ~pairwise_mask(batch)
    return gram_figures(_rows(batch, train), scenarios_dir)


def audit_pass(batch: pa.Table, plan: Plan, augment: AugmentPlan) -> dict:
    """What augmentation makes of this block's kept train records (`made` per kind, `skipped` per
    kind and reason, the kept subsets the drop_criteria copies use), and the absolute errors of every
    regression on its kept validation records (`errors`: scenario -> subset -> e (sum), n)."""
    d = decide(batch, plan)
    pairwise = pairwise_mask(batch)
    train = d.live & (d.split == "train")
    ids = [str(i) for i in batch["id"].to_pylist()]
    picks = augment.picked(ids, train & ~pairwise) if augment.copies_pointwise else {}
    pairs = train & pairwise if augment.swap_pairwise else np.zeros(batch.num_rows, dtype=bool)
    wanted = pairs.copy()
    for mask in picks.values():
        wanted |= mask
    index = np.flatnonzero(wanted)
    rows = _rows(batch, wanted)
    made: Counter = Counter()
    skipped: Counter = Counter()
    used: list = []
    for kind, copy, why, kept in copies_of(rows, {k: m[index] for k, m in picks.items()}, pairs[index], augment):
        if copy is None:
            skipped[f"{kind}: {why}"] += 1
        else:
            made[kind] += 1
        if kept is not None:
            used.append((copy["scenario"], ",".join(map(str, kept))))
    out = {"made": dict(made), "skipped": dict(skipped), "used": _nested(used)}
    if augment.regressions is not None:
        errors: dict = {}
        validation = d.live & (d.split == "validation") & ~pairwise
        for row in _rows(batch, validation):
            scenario = row["scenario"]
            x = complete_scores(row, get_scenario(scenario, augment.scenarios_dir).criteria)
            score = row.get("score")
            if x is None or score is None or math.isnan(score):
                continue
            for kept in augment.regressions.subsets(scenario):
                model = augment.regressions.model(scenario, kept)
                e = errors.setdefault(scenario, {}).setdefault(",".join(map(str, kept)), {"e": 0.0, "n": 0})
                e["e"] += abs(model.predict_score(x) - score)
                e["n"] += 1
        out["errors"] = errors
    return out


# ---------------------------------------------------------------------------- what was written


def ifd_bucket(value: Optional[float]) -> str:
    """The histogram bin of an IFD value: floor(log2(v) * BINS_PER_OCTAVE), or zero / nan."""
    if value is None or not math.isfinite(value) or value < 0:
        return "nan"
    if value == 0:
        return "zero"
    return str(math.floor(math.log2(value) * BINS_PER_OCTAVE))


def bucket_edges(bucket: str) -> Optional[tuple[float, float]]:
    if bucket in ("nan", "zero"):
        return None
    b = int(bucket)
    return 2 ** (b / BINS_PER_OCTAVE), 2 ** ((b + 1) / BINS_PER_OCTAVE)


def written_stats(table: pa.Table, rejected: bool, column: str) -> dict:
    """Summable figures of one written part (see the module docstring). Copies (a non-null
    augmentation_kind) count in `splits` and `augmented` only."""
    kinds = strings(table, KIND)
    original = np.array([k is None for k in kinds], dtype=bool)
    scenario = strings(table, "scenario")
    fate = strings(table, RULE) if rejected else ["kept"] * table.num_rows
    out: dict = {}
    if rejected:
        out["rejected"] = _nested((fate[i], scenario[i]) for i in np.flatnonzero(original))
    else:
        out["splits"] = _count(strings(table, SPLIT))
        out["augmented"] = _count(k for k in kinds if k is not None)
        out["kept"] = _count(scenario[i] for i in np.flatnonzero(original))
    score = floats(table, "score")
    x = floats(table, column)
    scores: dict = {}
    ifd: dict = {}
    for i in np.flatnonzero(original):
        by_fate = scores.setdefault(scenario[i], {}).setdefault(fate[i], {})
        if not math.isnan(score[i]):
            s = str(int(np.round(score[i])))
            by_fate[s] = by_fate.get(s, 0) + 1
        bins = ifd.setdefault(scenario[i], {}).setdefault(fate[i], {})
        b = ifd_bucket(None if math.isnan(x[i]) else float(x[i]))
        bins[b] = bins.get(b, 0) + 1
    out["scores"], out["ifd"] = scores, ifd
    return out


def step_counts(kept: dict[str, int], rejected: dict[str, dict[str, int]]) -> list[dict]:
    """Records remaining after every rule, overall and per scenario: [{step, rule, dropped, remaining,
    by_scenario}], from the written parts' counts."""
    scenarios = sorted(set(kept) | {s for by in rejected.values() for s in by})
    remaining = {s: kept.get(s, 0) + sum(rejected.get(r, {}).get(s, 0) for r in RULE_IDS) for s in scenarios}
    out = [{"step": "labelled", "rule": None, "dropped": 0, "remaining": sum(remaining.values()),
            "by_scenario": dict(remaining)}]
    for rule in RULES:
        dropped = rejected.get(rule.id, {})
        remaining = {s: n - dropped.get(s, 0) for s, n in remaining.items()}
        out.append({"step": rule.step, "rule": rule.id, "dropped": sum(dropped.values()),
                    "remaining": sum(remaining.values()), "by_scenario": dict(remaining)})
    return out


def score_histograms(scores: dict, fates: tuple[str, ...]) -> dict[str, int]:
    """Scores summed over scenarios and the given fates ("kept" and/or rule ids), score -> count."""
    out: Counter = Counter()
    for by_fate in scores.values():
        for fate in fates:
            out.update(by_fate.get(fate, {}))
    return {k: out[k] for k in sorted(out, key=int)}
