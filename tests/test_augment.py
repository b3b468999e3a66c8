"""Custom-prompt augmentation and pairwise swapping on hand-built records (no Ray: pure functions)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pyarrow as pa
import pytest

from themis_ray import judging
from themis_ray.config import AugmentConfig
from themis_ray.curate import augment as aug
from themis_ray.engines import Completion
from themis_ray.scenarios import get_scenario
from themis_ray.schema import REJECT

CRITERIA = get_scenario("close_qa").criteria  # Correctness, Directness, Completeness, Precision, ...


def _row(i: int, scores: list[float], overall: float, split: str = "train", scenario: str = "close_qa",
         named: bool = True) -> dict:
    request = judging.JudgeRequest(instruction=f"What is the capital of country {i}?", response=f"City {i}.",
                                   scenario=scenario)
    criteria = get_scenario(scenario).criteria
    lines = [f"[[{overall:g}]] Overall fine."] + [
        (f"{c.name}: [[{s:g}]] note {k}." if named else f"Point {k}: [[{s:g}]].")
        for k, (c, s) in enumerate(zip(criteria, scores))]
    return {"id": f"r{i}", "scenario": scenario, "mode": "single", "instruction": request.instruction,
            "response": request.response, "reference": None, "prompt": judging.render_prompt(request),
            "evaluation": "\n".join(lines), "score": float(overall), "criterion_scores": [float(s) for s in scores],
            "score_distribution": [0.1, 0.1, 0.2, 0.3, 0.3], "expected_score": 3.6, "ifd": 0.5, "ifd_ppl": 0.7,
            "prompt_tokens": 100, "split": split, aug.AUGMENTATION: None, aug.KIND: None, REJECT: None}


# ---------------------------------------------------------------------------- rating systems


def test_rescale_mapping_is_the_documented_table():
    table = {"0-1": [0, 0, 1, 1, 1], "1-3": [1, 1, 2, 3, 3], "1-10": [1, 3, 6, 8, 10], "1-5": [1, 2, 3, 4, 5]}
    for text, expected in table.items():
        scale = aug.parse_scale(text)
        assert [aug.rescale_score(s, scale) for s in range(1, 6)] == expected, text
    assert aug.rescale_score(4.5, aug.parse_scale("1-10")) == 9  # 8.875
    with pytest.raises(ValueError, match="low-high"):
        aug.parse_scale("ten")


def test_rescale_distribution_moves_mass_to_mapped_scores():
    got = aug.rescale_distribution([0.1, 0.2, 0.3, 0.25, 0.15], aug.parse_scale("1-3"))
    assert got == pytest.approx([0.3, 0.3, 0.4])
    assert aug.rescale_distribution([0.5, 0.5], aug.parse_scale("1-3")) is None  # not on the 1-5 scale


def test_request_rebuilds_the_label_prompt():
    row = _row(1, [5, 4, 3, 4, 2, 5], 4)
    assert judging.render_prompt(aug._request(row)) == row["prompt"]


def test_rescale_record_renders_the_new_scale_and_maps_every_score():
    row = _row(1, [5, 4, 3, 4, 2, 5], 4)
    scale = judging.RatingScale(1, 10)
    copy = aug.rescale_record(row, scale)
    assert copy["prompt"] == judging.render_prompt(aug._request(row, scale=scale))
    assert "from 1 to 10" in copy["prompt"] and copy["prompt"] != row["prompt"]
    parsed = judging.parse_evaluation(copy["evaluation"], scale=scale)
    assert parsed.score == 8 and copy["score"] == 8.0
    assert parsed.criterion_scores == [10, 8, 6, 8, 3, 10] == copy["criterion_scores"]
    assert copy["evaluation"].split("\n")[0] == "[[8]] Overall fine."
    assert copy["score_distribution"] == pytest.approx([0.1, 0, 0.1, 0, 0, 0.2, 0, 0.3, 0, 0.3])
    assert copy["expected_score"] == pytest.approx(judging.expected_score(dict(zip(scale.scores, copy["score_distribution"]))))
    assert copy["id"] != row["id"] and copy[aug.AUGMENTATION] == "rating scale 1-10"
    assert copy[aug.KIND] == "rescale:1-10"
    assert copy["ifd"] is None and copy["prompt_tokens"] is None  # measured for the other prompt
    assert copy["split"] == "train" and copy[REJECT] is None
    assert row["evaluation"].startswith("[[4]]")  # the original is untouched


def test_rescale_binary():
    copy = aug.rescale_record(_row(1, [2, 2, 3, 1, 2, 2], 2), judging.RatingScale(0, 1))
    assert judging.parse_evaluation(copy["evaluation"], scale=judging.RatingScale(0, 1)).score == 0
    assert copy["criterion_scores"] == [0, 0, 1, 0, 0, 0]


def test_rescale_refuses_scores_outside_the_label_scale():
    row = {**_row(1, [5, 4, 3, 4, 2, 5], 4), "evaluation": "[[4]] fine\nCorrectness: [[7]]"}
    with pytest.raises(ValueError, match="outside 1-5"):
        aug.rescale_record(row, judging.RatingScale(1, 3))


# ---------------------------------------------------------------------------- dropped criteria


def test_criterion_lines_by_name_by_position_or_none():
    named = aug.criterion_lines(_row(1, [5, 4, 3, 4, 2, 5], 4)["evaluation"], CRITERIA)
    assert {k: s for k, (_, s) in named.items()} == dict(enumerate([5, 4, 3, 4, 2, 5]))
    positional = aug.criterion_lines(_row(1, [5, 4, 3, 4, 2, 5], 4, named=False)["evaluation"], CRITERIA)
    assert [positional[k][1] for k in range(6)] == [5, 4, 3, 4, 2, 5]
    partial = aug.criterion_lines("[[4]] ok\nPrecision: [[3]] vague\nConcision: [[5]] short", CRITERIA)
    assert {k: s for k, (_, s) in partial.items()} == {3: 3, 5: 5}
    assert aug.criterion_lines("[[4]] ok\nPoint: [[3]] and [[2]]", CRITERIA) is None  # two scores on a line
    assert aug.criterion_lines("[[4]] ok\nSome point: [[3]]", CRITERIA) is None  # unnamed, count differs
    assert aug.criterion_lines("no score here", CRITERIA) is None


def _regression_rows(n: int, split: str, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        scores = rng.integers(1, 6, size=6).astype(float)
        overall = float(np.clip(np.floor(0.5 * scores[0] + 0.3 * scores[1] + 0.2 * scores[2] + 0.5), 1, 5))
        rows.append(_row(i + (1000 if split == "validation" else 0), scores.tolist(), overall, split))
    return rows


def _gram(rows: list[dict], blocks: int = 3) -> dict:
    """The normal equations summed over blocks, as the stage's pass merges them."""
    from themis_ray.store import merge_stats

    merged: dict = {}
    for part in np.array_split(np.arange(len(rows)), blocks):
        merged = merge_stats(merged, aug.gram_figures([rows[i] for i in part]))
    return merged


def test_regression_from_summed_normal_equations_is_least_squares_on_every_subset():
    train, validation = _regression_rows(60, "train", 0), _regression_rows(30, "validation", 1)
    regressions = aug.Regressions(_gram(train), min_records=8)
    assert regressions.records("close_qa") == 60
    X = np.array([r["criterion_scores"] for r in train])
    y = np.array([r["score"] for r in train])
    for kept in [(0, 1, 2, 3, 4), (3, 4, 5), (1,)]:  # a subset's regression is a sub-block of the same equations
        design = np.column_stack([np.ones(len(X)), X[:, list(kept)]])
        expected, *_ = np.linalg.lstsq(design, y, rcond=None)
        assert regressions.model("close_qa", kept).coef == pytest.approx(expected, abs=1e-8)
    full = regressions.model("close_qa", (0, 1, 2, 3, 4))
    assert full.coef[1:4] == pytest.approx([0.5, 0.3, 0.2], abs=0.1)
    assert np.abs(full.coef[4:]).max() < 0.1  # the unused criteria get about no weight

    def mae(model):
        return np.mean([abs(model.predict_score(r["criterion_scores"]) - r["score"]) for r in validation])

    assert mae(full) < 0.3
    # without the most important criterion the overall score is much harder to predict
    assert mae(regressions.model("close_qa", (3, 4, 5))) > mae(full) + 0.3
    assert len(regressions.subsets("close_qa")) == 2 ** 6 - 2
    assert aug.Regressions(_gram(train[:5]), min_records=8).model("close_qa", (0, 1)) is None  # too few


def test_drop_criteria_copy_keeps_the_kept_criteria_and_predicts_the_score():
    plan = aug.AugmentPlan(drop_criteria_fraction=1.0,
                           regressions=aug.Regressions(_gram(_regression_rows(40, "train", 0)), min_records=8))
    row = _row(7, [5, 1, 2, 4, 4, 3], 3)
    copy, kept = plan.copy(row, "drop_criteria")
    assert plan.copy(row, "drop_criteria") == (copy, kept)  # the choice is seeded by the record
    model = plan.regressions.model("close_qa", kept)
    kept_c = [CRITERIA[k] for k in kept]
    dropped = [c for c in CRITERIA if c not in kept_c]
    names = [c.strip() for c in copy[aug.AUGMENTATION].removeprefix("dropped criteria: ").split(",")]
    assert sorted(names) == sorted(c.name for c in dropped) and 1 <= len(kept) < len(CRITERIA)
    assert copy[aug.KIND] == "drop_criteria"
    assert copy["prompt"] == judging.render_prompt(aug._request(row, criteria=kept_c))
    for c in dropped:
        assert f"{c.name}: {c.description}" not in copy["prompt"] and c.name + ":" not in copy["evaluation"]
    for c in kept_c:
        assert f"{c.name}: {c.description}" in copy["prompt"] and c.name + ":" in copy["evaluation"]
    parsed = judging.parse_evaluation(copy["evaluation"])
    assert parsed.score == copy["score"] == model.predict_score(row["criterion_scores"])
    assert parsed.criterion_scores == copy["criterion_scores"] == [row["criterion_scores"][k] for k in kept]
    assert copy["score_distribution"] is None


def test_drop_criteria_needs_enough_records_and_complete_scores():
    plan = aug.AugmentPlan(drop_criteria_fraction=1.0,
                           regressions=aug.Regressions(_gram(_regression_rows(5, "train", 0)), min_records=8))
    with pytest.raises(ValueError, match="too few"):
        plan.copy(_row(1, [5, 4, 3, 4, 2, 5], 4), "drop_criteria")
    partial = {**_row(2, [5, 4, 3, 4, 2, 5], 4), "evaluation": "[[4]] ok\nPrecision: [[3]] vague"}
    with pytest.raises(ValueError, match="every criterion"):
        plan.copy(partial, "drop_criteria")


# ---------------------------------------------------------------------------- paraphrased criteria


@pytest.mark.parametrize("text,ok", [
    ("The answer gives the correct fact without contradictions.", True),
    ('Rewritten criterion: "States the true fact and nothing against it."', True),
    ("Sure! Here is the rewritten criterion:\nStates the true fact and nothing against it.", True),
    ("Here is the rewritten sentence.", False),
    ("", False), ("Fine [[5]]", False), ("Short", False),
    ("The answer states the right fact and nothing that contradicts it.", False),  # unchanged
])
def test_clean_paraphrase(text, ok):
    got, issue, why = aug.clean_paraphrase(text, CRITERIA[0].description)
    assert (got is not None) == ok and (why is None) == ok and (issue is None) == ok
    if ok:
        assert not got.startswith(("Rewritten", '"'))


class FakeEngine:
    def __init__(self):
        self.seen = []

    def generate(self, conversations, sampling):
        self.seen += conversations
        outs = []
        for conv in conversations:
            text = conv[-1]["content"].split("Criterion: ")[1]
            outs.append(Completion(text="" if "contradicts" in text else f"In other words: {text.lower()}\nextra line"))
        return outs


def test_paraphraser_processor_cleans_and_rejects():
    rows = aug.criteria_to_paraphrase(["close_qa", "close_qa"], variants=2)
    assert len(rows) == 12 and len({r["id"] for r in rows}) == 12
    processor = aug.CriterionParaphraser(aug.PARAPHRASE_SCHEMA, engine_cfg=None, sampling=None, with_engine=False)
    processor.engine = FakeEngine()
    out = processor(pa.Table.from_pylist(rows, schema=aug.PARAPHRASE_INPUT))
    assert out.schema == aug.PARAPHRASE_SCHEMA
    result = out.to_pylist()
    assert all(CRITERIA[r["criterion"]].description in c[-1]["content"]
               for r, c in zip(result, processor.engine.seen))
    bad = [r for r in result if r[REJECT]]
    assert {r["criterion"] for r in bad} == {0} and all(r["paraphrase"] is None for r in bad)
    assert {r["issue"] for r in bad} == {"empty"}
    good = [r for r in result if not r[REJECT]]
    assert all(r["paraphrase"].startswith("In other words") and "\n" not in r["paraphrase"] for r in good)
    usable, summary = aug.usable_paraphrases(result)
    assert summary == {"asked": 12, "usable": 10, "unusable": {"empty": 2}}
    assert sorted(usable["close_qa"]) == [1, 2, 3, 4, 5] and all(len(v) == 2 for v in usable["close_qa"].values())


def test_paraphrase_record_uses_the_paraphrases():
    row = _row(1, [5, 4, 3, 4, 2, 5], 4)
    paraphrases = {1: ["Gives the answer first, no digressions."], 3: ["Exact names and numbers."]}
    copy = aug.paraphrase_record(row, paraphrases, np.random.default_rng(0))
    assert "Directness: Gives the answer first, no digressions." in copy["prompt"]
    assert "Precision: Exact names and numbers." in copy["prompt"]
    assert f"Correctness: {CRITERIA[0].description}" in copy["prompt"]  # no paraphrase: unchanged
    assert CRITERIA[1].description not in copy["prompt"]
    assert copy["evaluation"] == row["evaluation"] and copy["score"] == row["score"]
    assert copy[aug.AUGMENTATION].startswith("paraphrased criteria: 2 of 6") and copy[aug.KIND] == "paraphrase"
    with pytest.raises(ValueError, match="no usable paraphrase"):
        aug.paraphrase_record(row, {}, np.random.default_rng(0))


# ------------------------------------------------------------------------------------- all kinds


def _plan(train: list[dict], **fractions) -> aug.AugmentPlan:
    cfg = AugmentConfig(min_regression_records=8, **fractions)
    plan = aug.AugmentPlan.from_config(cfg, seed=0, swap_pairwise=True)
    plan.regressions = aug.Regressions(_gram(train), cfg.min_regression_records)
    plan.paraphrases = {"close_qa": {k: [f"Put differently, {c.description.lower()}"] for k, c in enumerate(CRITERIA)}}
    return plan


def test_copies_are_drawn_per_record_near_the_fractions_and_seeded():
    train = _regression_rows(3000, "train", 0)
    plan = _plan(train, paraphrase_fraction=0.1, drop_criteria_fraction=0.2, rescale_fraction=0.3)
    ids = [r["id"] for r in train]
    picks = plan.picked(ids, np.ones(len(ids), dtype=bool))
    for kind, fraction in (("paraphrase", 0.1), ("drop_criteria", 0.2), ("rescale", 0.3)):
        n = int(picks[kind].sum())
        assert abs(n - fraction * 3000) < 4 * np.sqrt(3000 * fraction * (1 - fraction)), kind
    assert all((picks[k] == plan.picked(ids, np.ones(len(ids), dtype=bool))[k]).all() for k in picks)  # seeded
    other = aug.AugmentPlan.from_config(AugmentConfig(paraphrase_fraction=0.1), seed=1, swap_pairwise=True)
    assert not (other.picked(ids, np.ones(len(ids), dtype=bool))["paraphrase"] == picks["paraphrase"]).all()
    assert not plan.picked(ids, np.zeros(len(ids), dtype=bool))["rescale"].any()  # only the records offered
    # the three kinds draw independently: about 0.1 x 0.2 of the records get both of the first two
    both = int((picks["paraphrase"] & picks["drop_criteria"]).sum())
    assert abs(both - 60) < 4 * np.sqrt(60)

    rows = train[:300]
    sub = {k: m[:300] for k, m in picks.items()}
    made = list(aug.copies_of(rows, sub, [False] * 300, plan))
    copies = [c for _, c, _, _ in made if c is not None]
    assert len(made) == sum(int(m.sum()) for m in sub.values()) and all(why is None for _, _, why, _ in made)
    assert Counter(k.split(":")[0] for k, *_ in made) == {k: int(m.sum()) for k, m in sub.items() if m.sum()}
    scales = Counter(c[aug.KIND] for c in copies if c[aug.KIND].startswith("rescale"))
    assert set(scales) == {"rescale:0-1", "rescale:1-3", "rescale:1-10"}
    assert len({c["id"] for c in copies} | {r["id"] for r in rows}) == len(copies) + 300
    assert all(c["split"] == "train" and c[aug.AUGMENTATION] for c in copies)
    again = [c["id"] for _, c, _, _ in aug.copies_of(rows, sub, [False] * 300, plan)]
    assert again == [c["id"] for c in copies]  # seeded


def test_copies_that_cannot_be_made_say_why():
    rows = [_row(i, [5, 4, 3, 4, 2, 5], 4) for i in range(4)]
    rows[0]["evaluation"] = "[[4]] fine\nCorrectness: [[9]]"
    plan = _plan([], drop_criteria_fraction=1.0, rescale_fraction=1.0)
    plan.scales = [judging.RatingScale(1, 3)]
    made = list(aug.copies_of(rows, {"drop_criteria": [True] * 4, "rescale": [True] * 4}, [False] * 4, plan))
    assert Counter(k for k, c, _, _ in made if c is not None) == {"rescale:1-3": 3}
    why = Counter((k, w) for k, c, w, _ in made if c is None)
    assert why == {("drop_criteria", "too few train records with every per-criterion score to fit the regression"): 3,
                   ("drop_criteria", "the evaluation does not score every criterion on its own line"): 1,
                   ("rescale", "an evaluation score outside 1-5"): 1}


# ------------------------------------------------------------------------------------- pairwise


def _pair(i: int, verdict: str, evaluation: str = None) -> dict:
    request = judging.JudgeRequest(instruction=f"Which is better {i}?", response_a=f"first {i}",
                                   response_b=f"second {i}", scenario="open_qa", mode="pairwise")
    return {"id": f"p{i}", "scenario": "open_qa", "mode": "pairwise", "instruction": request.instruction,
            "response": None, "response_a": request.response_a, "response_b": request.response_b,
            "reference": None, "prompt": judging.render_prompt(request), "verdict": verdict, "score": None,
            "evaluation": evaluation or f"[[{verdict}]] Response A is shorter than Response B.", "split": "train",
            aug.AUGMENTATION: None, REJECT: None}


def test_swap_pairwise_row():
    row = _pair(1, "A")
    swapped = aug.swap_pairwise_row(row)
    assert swapped["verdict"] == "B"
    assert (swapped["response_a"], swapped["response_b"]) == (row["response_b"], row["response_a"])
    assert swapped["prompt"] == judging.render_prompt(judging.swap_pair(aug._request(row)))
    assert swapped["prompt"].index("second 1") < swapped["prompt"].index("first 1")
    assert swapped["evaluation"] == "[[B]] Response B is shorter than Response A."
    assert judging.parse_evaluation(swapped["evaluation"], mode="pairwise").verdict == "B"
    assert swapped[aug.AUGMENTATION] == "order swapped" and swapped[aug.KIND] == "swap" and swapped["id"] != row["id"]
    assert aug.swap_pairwise_row(_pair(2, "C"))["verdict"] == "C"
    # swapping twice gives the original comparison back
    twice = aug.swap_pairwise_row(swapped)
    assert (twice["prompt"], twice["verdict"], twice["evaluation"]) == (row["prompt"], "A", row["evaluation"])
    with pytest.raises(ValueError, match="not A, B or C"):
        aug.swap_pairwise_row(_pair(3, "D"))


def test_copies_of_swaps_the_pairs_it_is_given():
    rows = [_pair(1, "A"), _row(2, [5, 4, 3, 4, 2, 5], 4), _pair(3, "C")]
    made = list(aug.copies_of(rows, {}, [True, False, True], aug.AugmentPlan(swap_pairwise=True)))
    assert [c["verdict"] for _, c, _, _ in made] == ["B", "C"]
    assert Counter(r["verdict"] for r in [rows[0], rows[2]] + [c for _, c, _, _ in made]) == {"A": 1, "B": 1, "C": 2}
