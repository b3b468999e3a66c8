"""Custom-prompt augmentation of curated train records, and pairwise order swapping.

Each kind makes a copy of a kept train record, with a new id, an `augmentation` note (what a person
reads) and an `augmentation_kind` (its id); the original stays as it was. Validation records are never
copied, so the held-out evaluation is unchanged. Which records are copied is a seeded draw per record
(its digest below the kind's fraction), so a worker decides from the record alone.

- **Paraphrased criteria** (`paraphrase`): a model rewrites each criterion of a scenario
  (`paraphrases_per_criterion` variants, on a Ray Data actor pool: `CriterionParaphraser`); the copy's
  prompt is rendered with paraphrased criteria; its evaluation and scores are unchanged.
- **Dropped criteria** (`drop_criteria`): a random non-empty proper subset of the scenario's criteria
  is kept; the copy's prompt lists only those, its evaluation loses the lines of the dropped criteria,
  and its overall score is the prediction of a least-squares regression (per scenario, per kept subset)
  from the kept per-criterion scores, fitted on train records, measured (MAE) on validation records.
  The regressions come from per-scenario Gram matrices (`X^T X`, `X^T y` with an intercept column,
  summed over blocks): a regression on a subset of criteria is a sub-block of the same normal equations,
  so one pass over the train records fits every subset.
- **Other rating systems** (`rescale:<low>-<high>`): the copy's prompt is rendered on another scale and
  every `[[n]]` of its evaluation is mapped with `rescale_score`:

      1-5 score   1  2  3  4  5
      0-1         0  0  1  1  1     (3 "acceptable" and up passes)
      1-3         1  1  2  3  3
      1-10        1  3  6  8  10

  The rule: map linearly so the scales' ends meet, x = low' + (s - low) * (high' - low') / (high - low),
  then round to the nearest score; an exact half rounds away from the target scale's centre, and a
  value on the centre itself rounds up. The score distribution moves its mass to the mapped scores.
- **Pairwise order swap** (`swap`): the same comparison with the responses exchanged, its verdict
  A <-> B (C stays), so the judge cannot learn a position bias. Train pairs only: the evaluate stage
  judges every validation pair in both orders itself.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import pyarrow as pa

from themis_ray import judging
from themis_ray.curate import keys
from themis_ray.curate.rules import LABEL_SCALE, RULE
from themis_ray.executor.processor import GenerationProcessor
from themis_ray.scenarios import Criterion, get_scenario
from themis_ray.schema import REJECT, stable_id

AUGMENTATION = "augmentation"  # what a copy is, for a person; null on original records
KIND = "augmentation_kind"  # its id: paraphrase | drop_criteria | rescale:<low>-<high> | swap
# Columns measured for the original prompt; a copy has another prompt, so they do not apply to it.
MEASURED = ("ce_conditioned", "ce_answer", "ifd", "ifd_ppl", "answer_tokens", "prompt_tokens",
            "completion_tokens")
_SCORE = judging._SCORE  # the one `[[n]]` pattern, shared with the parser


# ------------------------------------------------------------------------------ rating systems


def parse_scale(text: str) -> judging.RatingScale:
    """"1-10" -> RatingScale(1, 10)."""
    match = re.fullmatch(r"\s*(-?\d+)\s*-\s*(-?\d+)\s*", str(text))
    if not match:
        raise ValueError(f"a rating scale is written low-high, like 1-10; got {text!r}")
    return judging.RatingScale(int(match.group(1)), int(match.group(2)))


def rescale_score(score: float, target: judging.RatingScale, source: judging.RatingScale = LABEL_SCALE) -> int:
    """The documented mapping of a score from `source` onto `target` (see the module docstring)."""
    x = target.low + (score - source.low) * (target.high - target.low) / (source.high - source.low)
    low = math.floor(x)
    if not math.isclose(x - low, 0.5, abs_tol=1e-9):
        return int(min(max(round(x), target.low), target.high))
    return low + 1 if x >= (target.low + target.high) / 2 - 1e-9 else low


def rescale_distribution(probs: Optional[list[float]], target: judging.RatingScale,
                         source: judging.RatingScale = LABEL_SCALE) -> Optional[list[float]]:
    """P(score) over source.low..high -> P(score) over target.low..high, each mass at its mapped score."""
    if probs is None or len(probs) != len(source.scores):
        return None
    out = dict.fromkeys(target.scores, 0.0)
    for score, p in zip(source.scores, probs):
        out[rescale_score(score, target, source)] += p
    return list(out.values())


def _request(row: dict, scenarios_dir=None, **changes) -> judging.JudgeRequest:
    """The evaluation request behind a labelled row (as the label stage built it), with changes."""
    mode = "pairwise" if row.get("mode") == "pairwise" else None
    return judging.request_from_row(row, scenarios_dir, mode=mode, **changes)


def _copy(row: dict, kind: str, note: str, **changes) -> dict:
    out = {**row, **dict.fromkeys([c for c in MEASURED if c in row]), **changes}
    out["id"] = stable_id(row["id"], kind, note)
    out[AUGMENTATION] = note
    out[KIND] = kind
    out[RULE] = None
    out[REJECT] = None
    return out


def rescale_record(row: dict, target: judging.RatingScale, scenarios_dir=None) -> dict:
    """The record on another rating system: prompt re-rendered, every `[[n]]` mapped. Raises ValueError
    when the evaluation has a score outside the labelling scale."""
    text = row["evaluation"] or ""
    found = [float(m.group(1)) for m in _SCORE.finditer(text)]
    if not found or any(not LABEL_SCALE.low <= s <= LABEL_SCALE.high for s in found):
        raise ValueError(f"an evaluation score outside {LABEL_SCALE.low}-{LABEL_SCALE.high}")
    evaluation = _SCORE.sub(lambda m: f"[[{rescale_score(float(m.group(1)), target)}]]", text)
    dist = rescale_distribution(_list(row.get("score_distribution")), target)
    return _copy(
        row, f"rescale:{target.low}-{target.high}", f"rating scale {target.low}-{target.high}",
        prompt=judging.render_prompt(_request(row, scenarios_dir, scale=target), scenarios_dir),
        evaluation=evaluation,
        score=float(rescale_score(row["score"], target)),
        criterion_scores=[float(rescale_score(s, target)) for s in _list(row.get("criterion_scores")) or []],
        score_distribution=dist,
        expected_score=judging.expected_score(dict(zip(target.scores, dist))) if dist else None,
    )


def _list(value) -> Optional[list]:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return list(value)


# ----------------------------------------------------------------------------- dropped criteria


def criterion_lines(evaluation: str, criteria: tuple[Criterion, ...]) -> Optional[dict[int, tuple[int, float]]]:
    """{criterion index: (line index, score)} for an evaluation whose per-criterion lines can be told
    apart, else None.

    The first `[[n]]` is the overall score; every later one must sit on its own line. A line is
    attributed to the criterion it names; when no line names one and there is exactly one line per
    criterion, they are taken in the criteria's order.
    """
    lines = evaluation.split("\n")
    overall_line, scored = None, []
    for i, line in enumerate(lines):
        found = _SCORE.findall(line)
        if not found:
            continue
        if overall_line is None:
            if len(found) != 1:
                return None
            overall_line = i
        elif len(found) == 1:
            scored.append((i, float(found[0])))
        else:
            return None
    if overall_line is None or not scored:
        return None
    named: dict[int, tuple[int, float]] = {}
    for i, score in scored:
        head = lines[i].lower()
        hits = [k for k, c in enumerate(criteria) if c.name.lower() in head]
        if len(hits) == 1 and hits[0] not in named:
            named[hits[0]] = (i, score)
    if len(named) == len(scored):
        return named
    if not named and len(scored) == len(criteria):
        return {k: item for k, item in enumerate(scored)}
    return None


def complete_scores(row: dict, criteria: tuple[Criterion, ...]) -> Optional[list[float]]:
    """The per-criterion scores of a record that scores every criterion on its own line, else None."""
    lines = criterion_lines(row.get("evaluation") or "", criteria)
    if lines is None or len(lines) != len(criteria):
        return None
    return [lines[k][1] for k in range(len(criteria))]


def _score(row: dict) -> Optional[float]:
    score = row.get("score")
    return None if score is None or (isinstance(score, float) and math.isnan(score)) else float(score)


def gram_figures(rows: list[dict], scenarios_dir=None) -> dict:
    """Summable normal equations per scenario from records with every per-criterion score and an overall
    score: {scenario: {"xtx": {"i,j": sum}, "xty": {"i": sum}}} over [1, x_1..x_c] (index 0 the intercept)."""
    samples: dict[str, tuple[list, list]] = {}
    for row in rows:
        criteria = get_scenario(row["scenario"], scenarios_dir).criteria
        x, y = complete_scores(row, criteria), _score(row)
        if x is not None and y is not None:
            xs, ys = samples.setdefault(row["scenario"], ([], []))
            xs.append([1.0, *x])
            ys.append(y)
    out = {}
    for scenario, (xs, ys) in samples.items():
        z, y = np.asarray(xs, np.float64), np.asarray(ys, np.float64)
        xtx, xty = z.T @ z, z.T @ y
        out[scenario] = {"xtx": {f"{i},{j}": float(xtx[i, j]) for i in range(len(xtx)) for j in range(len(xtx))},
                         "xty": {str(i): float(v) for i, v in enumerate(xty)}}
    return out


@dataclass
class OverallRegression:
    """overall ~ intercept + weights . kept per-criterion scores, for one scenario and kept subset."""

    kept: tuple[int, ...]
    coef: np.ndarray
    n_fit: int

    def predict(self, scores: list[float]) -> float:
        return float(self.coef[0] + np.dot(self.coef[1:], [scores[k] for k in self.kept]))

    def predict_score(self, scores: list[float], scale: judging.RatingScale = LABEL_SCALE) -> int:
        """The score written into a record: the prediction clipped to the scale and rounded."""
        return int(min(max(math.floor(self.predict(scores) + 0.5), scale.low), scale.high))


class Regressions:
    """The per-scenario normal equations, and the regressions on any kept subset fitted from them lazily.

    Small (a (c+1) x (c+1) matrix per scenario), so it travels to the workers with the plan."""

    def __init__(self, figures: dict, min_records: int):
        self.min_records = min_records
        self.normal: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for scenario, g in (figures or {}).items():
            size = len(g["xty"])
            xtx = np.zeros((size, size))
            for key, value in g["xtx"].items():
                i, j = map(int, key.split(","))
                xtx[i, j] = value
            self.normal[scenario] = (xtx, np.array([g["xty"][str(i)] for i in range(size)]))
        self._models: dict[tuple[str, tuple[int, ...]], Optional[OverallRegression]] = {}

    def records(self, scenario: str) -> int:
        return int(round(self.normal[scenario][0][0, 0])) if scenario in self.normal else 0

    def model(self, scenario: str, kept: tuple[int, ...]) -> Optional[OverallRegression]:
        """Least squares of the overall score on the kept criteria (min-norm when collinear); None with
        too few train records."""
        key = (scenario, kept)
        if key not in self._models:
            n = self.records(scenario)
            if n < max(self.min_records, len(kept) + 2):
                self._models[key] = None
            else:
                xtx, xty = self.normal[scenario]
                index = [0, *(k + 1 for k in kept)]
                coef, *_ = np.linalg.lstsq(xtx[np.ix_(index, index)], xty[index], rcond=None)
                self._models[key] = OverallRegression(kept=kept, coef=coef, n_fit=n)
        return self._models[key]

    def subsets(self, scenario: str) -> list[tuple[int, ...]]:
        """Every non-empty proper subset of the scenario's criteria that has a regression."""
        if scenario not in self.normal:
            return []
        c = len(self.normal[scenario][1]) - 1
        return [kept for r in range(1, c) for kept in itertools.combinations(range(c), r)
                if self.model(scenario, kept) is not None]


def drop_criteria_record(row: dict, criteria: tuple[Criterion, ...], lines: dict[int, tuple[int, float]],
                         model: OverallRegression, scenarios_dir=None) -> dict:
    """The copy that keeps only `model.kept` criteria, with the regression's overall score."""
    scores = [lines[k][1] for k in range(len(criteria))]
    overall = model.predict_score(scores)
    dropped_lines = {lines[k][0] for k in range(len(criteria)) if k not in model.kept}
    text_lines = [line for i, line in enumerate(row["evaluation"].split("\n")) if i not in dropped_lines]
    evaluation = _SCORE.sub(f"[[{overall}]]", "\n".join(text_lines), count=1)
    kept = [criteria[k] for k in model.kept]
    note = "dropped criteria: " + ", ".join(c.name for k, c in enumerate(criteria) if k not in model.kept)
    return _copy(
        row, "drop_criteria", note,
        prompt=judging.render_prompt(_request(row, scenarios_dir, criteria=kept), scenarios_dir),
        evaluation=evaluation, score=float(overall),
        criterion_scores=[scores[k] for k in model.kept],
        score_distribution=None, expected_score=None,
    )


def choose_kept(n_criteria: int, rng: np.random.Generator) -> tuple[int, ...]:
    """A random non-empty proper subset of the criteria to keep."""
    n_drop = int(rng.integers(1, n_criteria))
    return tuple(sorted(rng.choice(n_criteria, size=n_criteria - n_drop, replace=False).tolist()))


# ---------------------------------------------------------------------------- paraphrased criteria

PARAPHRASE_PROMPT = (
    "Rewrite the following criterion for judging an AI assistant's answer in different words, keeping "
    "its meaning. Reply with the rewritten sentence only.\n\nCriterion: {description}"
)
PARAPHRASE_INPUT = pa.schema([("id", pa.string()), ("scenario", pa.string()), ("criterion", pa.int64()),
                              ("name", pa.string()), ("description", pa.string())])
# `issue`: why a paraphrase is unusable, as a short fixed phrase (counted in the manifest); the reject
# reason adds the detail.
PARAPHRASE_SCHEMA = pa.schema([*PARAPHRASE_INPUT, ("paraphrase", pa.string()), ("issue", pa.string()),
                               (REJECT, pa.string())])

_PREAMBLE = re.compile(r"^(sure|here is|here's|certainly|okay|of course)\b", re.I)


def clean_paraphrase(text: str, original: str) -> tuple[Optional[str], Optional[str], Optional[str]]:
    """A model's answer -> (paraphrase, None, None) or (None, issue, why it is unusable)."""
    lines = [line.strip() for line in (text or "").strip().split("\n") if line.strip()]
    # Skip a preamble ("Sure! Here is the rewritten criterion:") to the sentence itself.
    lines = [line for line in lines if not (line.endswith(":") or _PREAMBLE.match(line))]
    if not lines:
        return None, "empty", "empty paraphrase"
    line = re.sub(r"^(rewritten( criterion)?|criterion|paraphrase)\s*:\s*", "", lines[0], flags=re.I)
    line = line.strip().strip('"\'“”').strip()
    if "[" in line or "]" in line:
        return None, "brackets", "brackets could forge a score or a data marker"
    if not 10 <= len(line) <= 3 * len(original) + 40:
        return None, "length", f"length {len(line)} is implausible for a {len(original)}-character criterion"
    if line.rstrip(".").lower() == original.rstrip(".").lower():
        return None, "unchanged", "the same as the original"
    return line, None, None


ENGINE_KEY = "curate.augment.engine"


class CriterionParaphraser(GenerationProcessor):
    """Criteria -> paraphrases: one generate call per batch, on the augment pool's engine."""

    stage = "curate"

    def __init__(self, output_schema, engine_cfg, sampling, with_engine: bool = True):
        super().__init__(output_schema, engine_cfg, with_engine, ENGINE_KEY)
        self.sampling = sampling

    def conversations(self, rows: list[dict]) -> list:
        return [[{"role": "user", "content": PARAPHRASE_PROMPT.format(description=r["description"])}]
                for r in rows]

    def parse(self, rows: list[dict], completions: list) -> list[dict]:
        out = []
        for row, done in zip(rows, completions):
            if done.error:
                text, issue, why = None, "engine error", f"engine error: {done.error}"
            else:
                text, issue, why = clean_paraphrase(done.text, row["description"])
            out.append({**row, "paraphrase": text, "issue": issue, REJECT: why})
        return out


def criteria_to_paraphrase(scenarios: list[str], variants: int, scenarios_dir=None) -> list[dict]:
    rows = []
    for scenario in sorted(set(scenarios)):
        for k, c in enumerate(get_scenario(scenario, scenarios_dir).criteria):
            for v in range(variants):
                rows.append({"id": stable_id(scenario, c.name, c.description, v), "scenario": scenario,
                             "criterion": k, "name": c.name, "description": c.description})
    return rows


def usable_paraphrases(rows: list[dict]) -> tuple[dict[str, dict[int, list[str]]], dict]:
    """The paraphraser's rows -> ({scenario: {criterion: [paraphrases]}}, the manifest's summary)."""
    usable: dict[str, dict[int, list[str]]] = {}
    issues: dict[str, int] = {}
    for p in sorted(rows, key=lambda r: r["id"]):  # the pool returns them in any order
        if p[REJECT] is None:
            usable.setdefault(p["scenario"], {}).setdefault(int(p["criterion"]), []).append(p["paraphrase"])
        else:
            issues[p["issue"] or "other"] = issues.get(p["issue"] or "other", 0) + 1
    return usable, {"asked": len(rows), "usable": len(rows) - sum(issues.values()), "unusable": issues}


def paraphrase_record(row: dict, paraphrases: dict[int, list[str]], rng: np.random.Generator,
                      scenarios_dir=None) -> dict:
    """The copy whose prompt lists paraphrased criteria (one variant each, at random)."""
    criteria = get_scenario(row["scenario"], scenarios_dir).criteria
    if not any(paraphrases.get(k) for k in range(len(criteria))):
        raise ValueError("no usable paraphrase of this scenario's criteria")
    new = [Criterion(c.name, str(rng.choice(paraphrases[k]))) if paraphrases.get(k) else c
           for k, c in enumerate(criteria)]
    changed = sum(a != b for a, b in zip(new, criteria))
    return _copy(row, "paraphrase", f"paraphrased criteria: {changed} of {len(criteria)}"
                 + f" ({stable_id(*[c.description for c in new])[:8]})",
                 prompt=judging.render_prompt(_request(row, scenarios_dir, criteria=new), scenarios_dir))


# ------------------------------------------------------------------------------------- pairwise


def _swap_letters(text: str) -> str:
    """[[A]] <-> [[B]] and "Response A" <-> "Response B" in one pass."""
    text = re.sub(r"\[\[\s*([AB])\s*\]\]", lambda m: f"[[{judging.SWAPPED[m.group(1)]}]]", text)
    return re.sub(r"\b(Response|response|Assistant|assistant)\s+([AB])\b",
                  lambda m: f"{m.group(1)} {judging.SWAPPED[m.group(2)]}", text)


def swap_pairwise_row(row: dict, scenarios_dir=None) -> dict:
    """The same comparison with the two responses exchanged; verdict A <-> B, C unchanged."""
    if row.get("verdict") not in judging.SWAPPED:
        raise ValueError("the verdict is not A, B or C")
    swapped = judging.swap_pair(_request(row, scenarios_dir))
    return _copy(
        row, "swap", "order swapped",
        response_a=row.get("response_b"), response_b=row.get("response_a"),
        verdict=judging.SWAPPED[row["verdict"]],
        prompt=judging.render_prompt(swapped, scenarios_dir),
        evaluation=_swap_letters(row["evaluation"]) if row.get("evaluation") else row.get("evaluation"),
    )


# ------------------------------------------------------------------------------------ all kinds

KINDS = ("paraphrase", "drop_criteria", "rescale")


@dataclass
class AugmentPlan:
    """What a worker needs to copy a kept train record: the fractions, the paraphrases, the regressions."""

    seed: int = 0
    paraphrase_fraction: float = 0.0
    drop_criteria_fraction: float = 0.0
    rescale_fraction: float = 0.0
    scales: list = field(default_factory=list)  # RatingScales other than the labelling scale
    swap_pairwise: bool = False
    paraphrases: dict = field(default_factory=dict)  # scenario -> criterion -> [paraphrases]
    regressions: Optional[Regressions] = None
    scenarios_dir: Optional[str] = None

    @classmethod
    def from_config(cls, cfg, seed: int, swap_pairwise: bool, scenarios_dir=None) -> "AugmentPlan":
        """cfg: an AugmentConfig. Paraphrases and regressions are added when they are known."""
        scales = [s for s in map(parse_scale, cfg.rating_scales) if s != LABEL_SCALE]  # 1-5 would duplicate
        return cls(seed=seed, paraphrase_fraction=cfg.paraphrase_fraction,
                   drop_criteria_fraction=cfg.drop_criteria_fraction,
                   rescale_fraction=cfg.rescale_fraction if scales else 0.0, scales=scales,
                   swap_pairwise=swap_pairwise, scenarios_dir=scenarios_dir)

    def fraction(self, kind: str) -> float:
        return getattr(self, f"{kind}_fraction")

    @property
    def copies_pointwise(self) -> bool:
        return any(self.fraction(k) > 0 for k in KINDS)

    def picked(self, ids: list[str], pointwise: np.ndarray) -> dict[str, np.ndarray]:
        """Per kind, which of these (kept, train) records it copies: a seeded draw per record."""
        hashes = keys.id_hashes(ids)
        return {kind: pointwise & (keys.unit_of(hashes, self.seed, f"augment:{kind}") < self.fraction(kind))
                for kind in KINDS if self.fraction(kind) > 0}

    def copy(self, row: dict, kind: str) -> tuple[dict, Optional[tuple[int, ...]]]:
        """The `kind` copy of `row` (and the kept subset of a drop_criteria copy); raises ValueError
        with a fixed phrase naming why it cannot be made."""
        rng = np.random.default_rng(keys.row_seed(row["id"], self.seed, f"augment:{kind}:choice"))
        if kind == "paraphrase":
            return paraphrase_record(row, self.paraphrases.get(row["scenario"], {}), rng, self.scenarios_dir), None
        if kind == "rescale":
            target = self.scales[min(int(rng.random() * len(self.scales)), len(self.scales) - 1)]
            return rescale_record(row, target, self.scenarios_dir), None
        criteria = get_scenario(row["scenario"], self.scenarios_dir).criteria
        lines = criterion_lines(row.get("evaluation") or "", criteria)
        if lines is None or len(lines) != len(criteria):
            raise ValueError("the evaluation does not score every criterion on its own line")
        if len(criteria) < 2:
            raise ValueError("a scenario with one criterion has none to drop")
        kept = choose_kept(len(criteria), rng)
        model = self.regressions.model(row["scenario"], kept) if self.regressions else None
        if model is None:
            raise ValueError("too few train records with every per-criterion score to fit the regression")
        return drop_criteria_record(row, criteria, lines, model, self.scenarios_dir), kept


def copies_of(rows: list[dict], picks: dict[str, list[bool]], pairs: list[bool], plan: AugmentPlan):
    """Copies of kept train records. Yields (kind, copy or None, why not or None, kept subset or None)."""
    for i, row in enumerate(rows):
        for kind in KINDS:
            if kind in picks and picks[kind][i]:
                try:
                    made, kept = plan.copy(row, kind)
                    yield made[KIND], made, None, kept
                except ValueError as err:
                    yield kind, None, str(err), None
        if pairs[i]:
            try:
                yield "swap", swap_pairwise_row(row, plan.scenarios_dir), None, None
            except ValueError as err:
                yield "swap", None, str(err), None

