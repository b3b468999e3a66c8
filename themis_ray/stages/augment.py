"""Custom-prompt augmentation of curated train records, and pairwise order swapping.

Each kind makes a copy of a kept train record, with a new id and an `augmentation` note; the original
stays as it was. Validation records are never copied, so the held-out evaluation is unchanged.

- **Paraphrased criteria**: a model rewrites each criterion of a scenario (`paraphrases_per_criterion`
  variants, on a Ray Data actor pool); the copy's prompt is rendered with paraphrased criteria; its
  evaluation and scores are unchanged.
- **Dropped criteria**: a random non-empty proper subset of the scenario's criteria is kept; the copy's
  prompt lists only those, its evaluation loses the lines of the dropped criteria, and its overall
  score is the prediction of a least-squares regression (per scenario, per kept subset) from the kept
  per-criterion scores, fitted on train records, measured (MAE) on validation records.
- **Other rating systems**: the copy's prompt is rendered on another scale and every `[[n]]` of its
  evaluation is mapped with `rescale_score`:

      1-5 score   1  2  3  4  5
      0-1         0  0  1  1  1     (3 "acceptable" and up passes)
      1-3         1  1  2  3  3
      1-10        1  3  6  8  10

  The rule: map linearly so the scales' ends meet, x = low' + (s - low) * (high' - low') / (high - low),
  then round to the nearest score; an exact half rounds away from the target scale's centre, and a
  value on the centre itself rounds up. The score distribution moves its mass to the mapped scores.
- **Pairwise order swap** (`swap_pairwise_rows`): the same comparison with the responses exchanged,
  its verdict A <-> B (C stays), so the judge cannot learn a position bias.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import pyarrow as pa

from themis_ray import judging
from themis_ray.engines import build_engine
from themis_ray.scenarios import Criterion, get_scenario
from themis_ray.schema import REJECT, stable_id
from themis_ray.executor import RowProcessor

AUGMENTATION = "augmentation"  # the column naming what a copy is; null on original records
LABEL_SCALE = judging.RatingScale(1, 5)  # the scale the teacher labels on
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


def _request(row: dict, **changes) -> judging.JudgeRequest:
    """The evaluation request behind a labelled row (as the label stage built it), with changes."""
    mode = row.get("mode") or "single"
    fields = dict(instruction=row["instruction"], scenario=row["scenario"], mode=mode,
                  response=row.get("response"), response_a=row.get("response_a"),
                  response_b=row.get("response_b"), reference=row.get("reference"))
    return judging.JudgeRequest(**{**fields, **changes})


def _copy(row: dict, kind: str, note: str, **changes) -> dict:
    out = {**row, **dict.fromkeys([c for c in MEASURED if c in row]), **changes}
    out["id"] = stable_id(row["id"], kind, note)
    out[AUGMENTATION] = note
    out[REJECT] = None
    return out


def rescale_record(row: dict, target: judging.RatingScale, scenarios_dir=None) -> dict:
    """The record on another rating system: prompt re-rendered, every `[[n]]` mapped. Raises ValueError
    when the evaluation has a score outside the labelling scale."""
    text = row["evaluation"]
    found = [float(m.group(1)) for m in _SCORE.finditer(text)]
    if not found or any(not LABEL_SCALE.low <= s <= LABEL_SCALE.high for s in found):
        raise ValueError(f"evaluation scores {found} are not all within {LABEL_SCALE.low}-{LABEL_SCALE.high}")
    evaluation = _SCORE.sub(lambda m: f"[[{rescale_score(float(m.group(1)), target)}]]", text)
    dist = rescale_distribution(_list(row.get("score_distribution")), target)
    return _copy(
        row, "scale", f"rating scale {target.low}-{target.high}",
        prompt=judging.render_prompt(_request(row, scale=target), scenarios_dir),
        evaluation=evaluation,
        score=float(rescale_score(row["score"], target)),
        criterion_scores=[float(rescale_score(s, target)) for s in _list(row.get("criterion_scores")) or []],
        score_distribution=dist,
        expected_score=judging.expected_score(dict(zip(target.scores, dist))) if dist else None,
    )


def _list(value) -> Optional[list]:
    """A list column's value as a list (pandas hands numpy arrays), None kept."""
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


@dataclass
class OverallRegression:
    """overall ~ intercept + weights . kept per-criterion scores, for one scenario and kept subset."""

    kept: tuple[int, ...]
    coef: np.ndarray
    n_fit: int
    n_validation: int = 0
    abs_errors: tuple[float, ...] = ()  # |written score - teacher score| on validation records

    def predict(self, scores: list[float]) -> float:
        return float(self.coef[0] + np.dot(self.coef[1:], [scores[k] for k in self.kept]))

    def predict_score(self, scores: list[float], scale: judging.RatingScale = LABEL_SCALE) -> int:
        """The score written into a record: the prediction clipped to the scale and rounded."""
        return int(min(max(math.floor(self.predict(scores) + 0.5), scale.low), scale.high))


def fit_overall(X: np.ndarray, y: np.ndarray, kept: tuple[int, ...]) -> OverallRegression:
    design = np.column_stack([np.ones(len(X)), X[:, list(kept)]])
    coef, *_ = np.linalg.lstsq(design, y, rcond=None)  # least squares; min-norm when collinear
    return OverallRegression(kept=kept, coef=coef, n_fit=len(X))


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
        row, "drop", note,
        prompt=judging.render_prompt(_request(row, criteria=kept), scenarios_dir),
        evaluation=evaluation, score=float(overall),
        criterion_scores=[scores[k] for k in model.kept],
        score_distribution=None, expected_score=None,
    )


class CriteriaDropper:
    """Fits the per-scenario regressions lazily and makes the dropped-criteria copies."""

    def __init__(self, train: list[dict], validation: list[dict], min_records: int, scenarios_dir=None):
        self.scenarios_dir, self.min_records = scenarios_dir, min_records
        self.data = {"train": self._complete(train), "validation": self._complete(validation)}
        self.models: dict[tuple[str, tuple[int, ...]], Optional[OverallRegression]] = {}

    def _complete(self, rows: list[dict]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """Per scenario: (per-criterion scores, overall) of the records with a score for every criterion."""
        by_scenario: dict[str, list] = {}
        for row in rows:
            criteria = get_scenario(row["scenario"], self.scenarios_dir).criteria
            lines = criterion_lines(row["evaluation"], criteria)
            if lines is not None and len(lines) == len(criteria) and row.get("score") is not None:
                by_scenario.setdefault(row["scenario"], []).append(
                    ([lines[k][1] for k in range(len(criteria))], float(row["score"])))
        return {s: (np.array([x for x, _ in v], float), np.array([y for _, y in v], float))
                for s, v in by_scenario.items()}

    def model(self, scenario: str, kept: tuple[int, ...]) -> Optional[OverallRegression]:
        key = (scenario, kept)
        if key not in self.models:
            X, y = self.data["train"].get(scenario, (np.zeros((0, 0)), np.zeros(0)))
            if len(y) < max(self.min_records, len(kept) + 2):
                self.models[key] = None
            else:
                model = fit_overall(X, y, kept)
                Xv, yv = self.data["validation"].get(scenario, (np.zeros((0, 0)), np.zeros(0)))
                model.abs_errors = tuple(abs(model.predict_score(list(x)) - t) for x, t in zip(Xv, yv))
                model.n_validation = len(yv)
                self.models[key] = model
        return self.models[key]

    def augment(self, row: dict, rng: np.random.Generator) -> dict:
        """The copy of `row`; raises ValueError naming why it cannot be made."""
        criteria = get_scenario(row["scenario"], self.scenarios_dir).criteria
        lines = criterion_lines(row["evaluation"], criteria)
        if lines is None or len(lines) != len(criteria):
            raise ValueError("the evaluation does not score every criterion on its own line")
        if len(criteria) < 2:
            raise ValueError("a scenario with one criterion has none to drop")
        n_drop = int(rng.integers(1, len(criteria)))
        kept = tuple(sorted(rng.choice(len(criteria), size=len(criteria) - n_drop, replace=False).tolist()))
        model = self.model(row["scenario"], kept)
        if model is None:
            raise ValueError("too few train records with every per-criterion score to fit the regression")
        return drop_criteria_record(row, criteria, lines, model, self.scenarios_dir)

    def report(self) -> dict:
        """Validation MAE of the regressions that were used, overall and per scenario."""
        used = [m for m in self.models.values() if m is not None]
        by_scenario = {}
        for (scenario, _), m in self.models.items():
            if m is not None:
                entry = by_scenario.setdefault(scenario, {"regressions": 0, "errors": []})
                entry["regressions"] += 1
                entry["errors"] += list(m.abs_errors)
        errors = [e for m in used for e in m.abs_errors]
        return {
            "regressions": len(used),
            "validation_mae": round(float(np.mean(errors)), 4) if errors else None,
            "validation_predictions": len(errors),
            "by_scenario": {s: {"regressions": v["regressions"],
                                "validation_mae": round(float(np.mean(v["errors"])), 4) if v["errors"] else None}
                            for s, v in sorted(by_scenario.items())},
        }


# ---------------------------------------------------------------------------- paraphrased criteria

PARAPHRASE_PROMPT = (
    "Rewrite the following criterion for judging an AI assistant's answer in different words, keeping "
    "its meaning. Reply with the rewritten sentence only.\n\nCriterion: {description}"
)
PARAPHRASE_SCHEMA = pa.schema([("id", pa.string()), ("scenario", pa.string()), ("criterion", pa.int64()),
                               ("name", pa.string()), ("description", pa.string()),
                               ("paraphrase", pa.string()), (REJECT, pa.string())])


_PREAMBLE = re.compile(r"^(sure|here is|here's|certainly|okay|of course)\b", re.I)


def clean_paraphrase(text: str, original: str) -> tuple[Optional[str], Optional[str]]:
    """A model's answer -> (paraphrase, None) or (None, why it is unusable)."""
    lines = [line.strip() for line in (text or "").strip().split("\n") if line.strip()]
    # Skip a preamble ("Sure! Here is the rewritten criterion:") to the sentence itself.
    lines = [line for line in lines if not (line.endswith(":") or _PREAMBLE.match(line))]
    if not lines:
        return None, "empty paraphrase"
    line = re.sub(r"^(rewritten( criterion)?|criterion|paraphrase)\s*:\s*", "", lines[0], flags=re.I)
    line = line.strip().strip('"\'“”').strip()
    if "[" in line or "]" in line:
        return None, "brackets could forge a score or a data marker"
    if not 10 <= len(line) <= 3 * len(original) + 40:
        return None, f"length {len(line)} is implausible for a {len(original)}-character criterion"
    if line.rstrip(".").lower() == original.rstrip(".").lower():
        return None, "the same as the original"
    return line, None


class CriterionParaphraser(RowProcessor):
    stage = "curate"

    def __init__(self, output_schema, engine_cfg, sampling):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.sampling = sampling

    def process(self, rows: list[dict]) -> list[dict]:
        messages = [[{"role": "user", "content": PARAPHRASE_PROMPT.format(description=r["description"])}]
                    for r in rows]
        out = []
        for row, done in zip(rows, self.engine.generate(messages, self.sampling)):
            text, why = (None, f"engine error: {done.error}") if done.error else clean_paraphrase(
                done.text, row["description"])
            out.append({**row, "paraphrase": text, REJECT: why})
        return out


def criteria_to_paraphrase(scenarios: list[str], variants: int, scenarios_dir=None) -> pa.Table:
    rows = []
    for scenario in sorted(set(scenarios)):
        for k, c in enumerate(get_scenario(scenario, scenarios_dir).criteria):
            for v in range(variants):
                rows.append({"id": stable_id(scenario, c.name, c.description, v), "scenario": scenario,
                             "criterion": k, "name": c.name, "description": c.description})
    return pa.Table.from_pylist(rows, schema=PARAPHRASE_SCHEMA.remove(PARAPHRASE_SCHEMA.get_field_index(REJECT))
                                .remove(PARAPHRASE_SCHEMA.get_field_index("paraphrase")))


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
                 prompt=judging.render_prompt(_request(row, criteria=new), scenarios_dir))


# ------------------------------------------------------------------------------------- pairwise

_SWAP_VERDICT = {"A": "B", "B": "A", "C": "C"}


def _swap_letters(text: str) -> str:
    """[[A]] <-> [[B]] and "Response A" <-> "Response B" in one pass."""
    text = re.sub(r"\[\[\s*([AB])\s*\]\]", lambda m: f"[[{_SWAP_VERDICT[m.group(1)]}]]", text)
    return re.sub(r"\b(Response|response|Assistant|assistant)\s+([AB])\b",
                  lambda m: f"{m.group(1)} {_SWAP_VERDICT[m.group(2)]}", text)


def swap_pairwise_row(row: dict, scenarios_dir=None) -> dict:
    """The same comparison with the two responses exchanged; verdict A <-> B, C unchanged."""
    swapped = judging.swap_pair(_request(row))
    return _copy(
        row, "swap", "order swapped",
        response_a=row.get("response_b"), response_b=row.get("response_a"),
        verdict=_SWAP_VERDICT[row["verdict"]],
        prompt=judging.render_prompt(swapped, scenarios_dir),
        evaluation=_swap_letters(row["evaluation"]) if row.get("evaluation") else row.get("evaluation"),
    )


def swap_pairwise_rows(rows: list[dict], scenarios_dir=None) -> list[dict]:
    return [swap_pairwise_row(r, scenarios_dir) for r in rows if r.get("mode") == "pairwise"]


# ------------------------------------------------------------------------------------ all kinds


def _sample(rows: list[dict], fraction: float, rng: np.random.Generator) -> list[dict]:
    n = min(len(rows), int(math.floor(len(rows) * fraction + 0.5)))
    return [rows[i] for i in sorted(rng.choice(len(rows), size=n, replace=False))] if n else []


def augment(train: list[dict], validation: list[dict], cfg, seed: int, scenarios_dir=None,
            paraphrase: Optional[Callable[[pa.Table], pa.Table]] = None) -> tuple[list[dict], dict]:
    """Copies of pointwise train records per `cfg` (an AugmentConfig) and a report of what was made.

    `paraphrase` turns a table of criteria (criteria_to_paraphrase) into the same rows with a
    `paraphrase` column and a reject reason; the curate stage passes one that runs the model on an
    actor pool.
    """
    rng = np.random.default_rng(seed)
    pointwise = [r for r in train if (r.get("mode") or "single") != "pairwise"]
    copies: list[dict] = []
    made: Counter = Counter()
    skipped: Counter = Counter()
    report: dict = {}

    picked = _sample(pointwise, cfg.paraphrase_fraction, rng)
    if picked:
        if paraphrase is None:
            raise ValueError("paraphrase augmentation needs a paraphrasing function")
        table = paraphrase(criteria_to_paraphrase([r["scenario"] for r in picked],
                                                   cfg.paraphrases_per_criterion, scenarios_dir))
        usable: dict[str, dict[int, list[str]]] = {}
        reasons = Counter()
        for p in table.to_pylist():
            if p[REJECT] is None:
                usable.setdefault(p["scenario"], {}).setdefault(p["criterion"], []).append(p["paraphrase"])
            else:
                reasons[p[REJECT].split(":")[0]] += 1
        report["paraphrases"] = {"asked": table.num_rows, "usable": table.num_rows - sum(reasons.values()),
                                 "unusable": dict(reasons)}
        for row in picked:
            try:
                copies.append(paraphrase_record(row, usable.get(row["scenario"], {}), rng, scenarios_dir))
                made["paraphrased criteria"] += 1
            except ValueError as err:
                skipped[f"paraphrased criteria: {err}"] += 1

    picked = _sample(pointwise, cfg.drop_criteria_fraction, rng)
    dropper = CriteriaDropper(pointwise, validation, cfg.min_regression_records, scenarios_dir)
    for row in picked:
        try:
            copies.append(dropper.augment(row, rng))
            made["dropped criteria"] += 1
        except ValueError as err:
            skipped[f"dropped criteria: {err}"] += 1
    if picked:
        report["criteria_regression"] = dropper.report()

    scales = [s for s in map(parse_scale, cfg.rating_scales) if s != LABEL_SCALE]  # 1-5 would be a duplicate
    picked = _sample(pointwise, cfg.rescale_fraction, rng) if scales else []
    for k, row in enumerate(picked):
        target = scales[k % len(scales)]  # in turn, so every scale gets its share
        try:
            copies.append(rescale_record(row, target, scenarios_dir))
            made[f"rating scale {target.low}-{target.high}"] += 1
        except ValueError as err:
            skipped[f"rating scale: {err}"] += 1
    return copies, {"augmented": dict(made), "augmentation_skipped": dict(skipped), **report}
