"""The trained scenario classifier: labelled-set loading and rejects, the stratified split, the confusion
matrix by hand; one real Ray Train run on two CPU workers that must beat chance on held-out rows."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from themis_ray.config import load
from themis_ray.classifier.trained import (
    CONFUSION_PNG,
    METRICS_FILE,
    ScenarioModel,
    accuracy,
    confusion,
    load_labelled,
    stratified_split,
    train_classifier,
)
from scenario_instructions import labelled_instructions


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_load_labelled_rejects_bad_rows_and_duplicates_naming_them(tmp_path):
    rows = [
        {"instruction": "Write a haiku about rain.", "scenario": "creative_writing"},
        {"instruction": "  write a HAIKU about rain!  ", "scenario": "creative_writing"},  # duplicate
        {"instruction": "", "scenario": "open_qa"},
        {"instruction": "What is 2 + 2?", "scenario": "arithmetic"},
        {"scenario": "open_qa"},
        {"instruction": "Translate 'cat' into French.", "scenario": "translation"},
    ]
    path = _write_jsonl(tmp_path / "l.jsonl", rows)
    ok, rejects = load_labelled(path, str(tmp_path), None)
    assert [r["scenario"] for r in ok] == ["creative_writing", "translation"]
    reasons = {r["row"]: r["reason"] for r in rejects}
    assert reasons == {
        "l.jsonl:2": "exact duplicate of l.jsonl:1",
        "l.jsonl:3": "field 'instruction' is missing or empty",
        "l.jsonl:4": "field 'scenario' is 'arithmetic', not a known scenario",
        "l.jsonl:5": "field 'instruction' is missing or empty",
    }
    assert len(ok) + len(rejects) == len(rows)


def test_load_labelled_errors_name_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x", "scenario": "open_qa"}\n{oops\n')
    with pytest.raises(ValueError, match=r"bad.jsonl: line 2 is not JSON"):
        load_labelled(str(bad), str(tmp_path), None)
    with pytest.raises(ValueError, match=r"\.jsonl or \.parquet"):
        (tmp_path / "x.csv").write_text("a")
        load_labelled(str(tmp_path / "x.csv"), str(tmp_path), None)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        load_labelled(str(tmp_path / "missing.jsonl"), str(tmp_path), None)


def test_stratified_split_holds_out_each_scenario_in_proportion():
    rows = labelled_instructions(per_scenario=12)
    train, test = stratified_split(rows, 0.25, seed=3)
    assert len(train) + len(test) == len(rows)
    assert Counter(r["scenario"] for r in test) == {s: 3 for s in {r["scenario"] for r in rows}}
    assert not {r["instruction"] for r in train} & {r["instruction"] for r in test}
    assert stratified_split(rows, 0.25, seed=3) == (train, test)  # seeded
    assert stratified_split(rows, 0.25, seed=4)[1] != test
    # a scenario with one row stays in train; two rows put one in test
    tiny = [{"instruction": "a", "scenario": "x"}, {"instruction": "b", "scenario": "y"},
            {"instruction": "c", "scenario": "y"}]
    tr, te = stratified_split(tiny, 0.1, seed=0)
    assert [r["scenario"] for r in te] == ["y"] and len(tr) == 2
    with pytest.raises(ValueError, match="test_fraction"):
        stratified_split(rows, 1.0, seed=0)


def test_confusion_and_accuracy_by_hand():
    gold = ["a", "a", "b", "c"]
    pred = ["a", "b", "b", "a"]
    assert confusion(gold, pred, ["a", "b", "c"]) == [[1, 1, 0], [0, 1, 0], [1, 0, 0]]
    assert accuracy(gold, pred) == 0.5
    assert accuracy([], []) is None


def test_labelled_set_is_deterministic_and_balanced():
    rows = labelled_instructions(per_scenario=20, seed=1)
    assert rows == labelled_instructions(per_scenario=20, seed=1)
    counts = Counter(r["scenario"] for r in rows)
    assert len(counts) == 10 and set(counts.values()) == {20}
    assert len({r["instruction"] for r in rows}) == len(rows)


@pytest.mark.integration
def test_train_classifier_on_two_workers_beats_chance_on_held_out_rows(ray_local, tmp_path):
    data = _write_jsonl(tmp_path / "labelled.jsonl", labelled_instructions(per_scenario=24)
                        + [{"instruction": "Unlabelled row.", "scenario": "no_such_scenario"}])
    cfg = load(None, [f"run_dir={tmp_path / 'run'}", f"train_classifier.data={data}",
                      "train_classifier.epochs=6", "train_classifier.compare_zero_shot=false"])
    metrics = train_classifier(cfg)
    out = tmp_path / "run" / "classifier"
    assert metrics["output_dir"] == str(out)
    assert metrics["train"] + metrics["test"] == 240 and metrics["rejected"] == 1
    assert metrics["test"] == 60  # a quarter of each scenario's 24 rows
    # the confusion matrix accounts for every held-out row, and its diagonal is the accuracy
    matrix = metrics["confusion"]
    assert sum(map(sum, matrix)) == metrics["test"]
    assert sum(matrix[i][i] for i in range(len(matrix))) / metrics["test"] == pytest.approx(metrics["accuracy"], abs=1e-3)
    assert metrics["accuracy"] > metrics["chance"] == 0.1
    assert metrics["accuracy"] > metrics["majority_baseline"]
    assert metrics["final_loss"] < metrics["first_loss"]
    saved = json.loads((out / METRICS_FILE).read_text())
    assert saved["accuracy"] == metrics["accuracy"]
    assert (out / CONFUSION_PNG).stat().st_size > 1000
    # the saved folder is a classifier the classify stage can load: it predicts known scenarios
    model = ScenarioModel(str(out))
    predictions = model.predict(["Translate into German: 'Good morning, everyone.'", "Write a haiku about snow."])
    assert all(name in metrics["labels"] and 0 < p <= 1 for name, p in predictions)
    # ...and the classify stage's processor routes with it when classify.method=trained
    from themis_ray.config import EngineConfig
    from themis_ray.schema import REJECT, output_schema
    from themis_ray.stages.classify import Classifier

    rows = [{"id": "r1", "instruction": "Write a limerick about closures.", "scenario": "creative_writing"}]
    processor = Classifier(output_schema("classify"), EngineConfig(), "classifier", None, model_dir=str(out))
    assert processor.predictor.engine is None  # no language model is loaded for a trained classifier
    [row] = processor.process(rows)
    assert row[REJECT] is None and row["synthesis_scenario"] == "creative_writing"
    assert row["scenario"] == row["predicted_scenario"] in metrics["labels"] and 0 < row["scenario_confidence"] <= 1
