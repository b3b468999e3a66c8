"""Meta-evaluation without a model: judge specs, benchmark loaders, summaries and metrics.json.

Row parsing, column checks and the metrics are plain functions tested in this process; the benchmarks
themselves are lazy Ray Datasets over a finished curate stage or a user's file, tested on a local Ray
(`integration`) and collected here with `take_all()`."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from themis_ray.config import LabelledFileConfig, MTBenchConfig, load
from themis_ray.evaluate import benchmarks as B
from themis_ray.evaluate import results as S
from themis_ray.evaluate.judges import resolve_judges
from themis_ray.records import UserRow, numbered_rows, read_file_batches, user_rows
from themis_ray.schema import REJECT

sys.path.insert(0, str(Path(__file__).parent))
from stage_io import finished_stage  # noqa: E402



# ------------------------------------------------------------------------------------- judges


def judges_cfg(judges, **evaluate):
    cfg = load(None, ["run_dir=/tmp/run", "train.model=/models/base"])
    return OmegaConf.merge(cfg, {"evaluate": {"judges": judges, **evaluate}})


def test_the_preference_tuned_judge_is_graded_beside_the_sft_judge_when_prefer_tuned_one(tmp_path):
    run = str(tmp_path)
    cfg = OmegaConf.merge(judges_cfg([{"name": "trained"}, {"name": "base"}]),
                          {"run_dir": run, "prefer": {"enabled": True}})
    assert [j.name for j in resolve_judges(cfg)] == ["trained", "base"]  # prefer has not run yet
    (tmp_path / "prefer").mkdir()
    (tmp_path / "prefer" / "_manifest.json").write_text(json.dumps({"optimised": False}))
    assert [j.name for j in resolve_judges(cfg)] == ["trained", "base"]  # no mistakes found: no new judge
    (tmp_path / "prefer" / "_manifest.json").write_text(json.dumps({"optimised": True}))
    trained, base, preferred = resolve_judges(cfg)
    assert (preferred.name, preferred.engine.model) == ("preferred", f"{run}/prefer/judge")
    off = OmegaConf.merge(cfg, {"prefer": {"enabled": False}})
    assert [j.name for j in resolve_judges(off)] == ["trained", "base"]


def test_trained_and_base_resolve_to_the_run_judge_and_train_model():
    trained, base = resolve_judges(judges_cfg([{"name": "trained"}, {"name": "base"}]))
    assert (trained.name, trained.engine.model, trained.engine.kind) == ("trained", "/tmp/run/train/judge", "hf")
    assert (base.name, base.engine.model) == ("base", "/models/base")
    assert trained.prefill and base.prefill  # evaluate.prefill_score defaults to true for hf


def test_other_names_are_models_unless_model_or_engine_says_otherwise():
    folder, named, endpoint = resolve_judges(judges_cfg([
        {"name": "/models/other"},
        {"name": "mine", "model": "/models/mine", "prefill_score": False},
        {"name": "teacher", "engine": {"kind": "openai", "model": "gpt-4o", "base_url": "http://h/v1"}},
    ]))
    assert folder.engine.model == "/models/other" and folder.prefill
    assert named.engine.model == "/models/mine" and not named.prefill
    # An endpoint cannot continue an assistant message: its score is parsed from the generated text.
    assert (endpoint.engine.kind, endpoint.engine.model, endpoint.engine.base_url) == ("openai", "gpt-4o", "http://h/v1")
    assert endpoint.prefill is False and endpoint.label == "openai:gpt-4o"
    # The evaluate engine's settings (threads, context) apply to judges without their own engine.
    assert folder.engine.num_threads == judges_cfg([]).evaluate.engine.num_threads


def test_judge_specs_fail_early_on_duplicates_typos_and_nothing():
    with pytest.raises(ValueError, match="unique.*base"):
        resolve_judges(judges_cfg([{"name": "base"}, {"name": "base"}]))
    with pytest.raises(ValueError, match="empty"):
        resolve_judges(judges_cfg([]))
    with pytest.raises(Exception, match="modle"):  # a typo in a judge stops at load time
        load(None, ["evaluate.judges=[{name: x, modle: y}]"])


def test_quickstart_still_loads_with_its_judges():
    from pathlib import Path

    cfg = load(Path(__file__).resolve().parents[1] / "configs" / "quickstart.yaml")
    assert [j.name for j in resolve_judges(cfg)] == ["trained", "base"]
    assert list(cfg.evaluate.benchmarks) == ["validation", "injection"]


# ------------------------------------------------------------------------------ labelled files


def file_cfg(**kwargs):
    return OmegaConf.merge(OmegaConf.structured(LabelledFileConfig), kwargs)


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def file_rows(path) -> list:
    """A file's rows as `file_benchmark`'s maps see them: the read task's batches
    (records.read_file_batches), here in this process."""
    return [row for batch in read_file_batches(pa.table({"file": [str(path)]})) for row in user_rows(batch)]


def test_pointwise_jsonl_good_rows_and_every_bad_row_with_its_line_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "labels.jsonl", [
        {"q": "What is 2+2?", "answer": "4", "rating": 5, "ref": "4", "scenario": "math_qa"},  # line 1
        {"q": "Name a colour.", "answer": "Blue.", "rating": "3"},  # line 2: a numeric string is fine
        "",  # line 3: blank, not a record
        "{not json",  # line 4
        {"q": "x", "answer": "y", "rating": 9},  # line 5: off the scale
        {"q": "x", "answer": "  ", "rating": 2},  # line 6: empty response
        {"q": "x", "answer": "y", "rating": "good"},  # line 7: not a number
        {"q": "x", "answer": "y", "rating": 2, "scenario": "astrology"},  # line 8: unknown scenario
        ["a", "list"],  # line 9
        {"answer": "y", "rating": 2},  # line 10: no instruction
    ])
    fc = file_cfg(path=str(path), columns={"instruction": "q", "response": "answer", "score": "rating",
                                           "reference": "ref"})
    records, rejects = B.parse_file_rows(file_rows(path), fc)
    assert records.num_rows == 2 and rejects.num_rows == 7
    good = records.to_pylist()
    assert [r["row"] for r in good] == [1, 2] and [r["score"] for r in good] == [5.0, 3.0]
    # A reference is shown where it helps the scenario (math_qa); the default scenario is open_qa.
    assert good[0]["mode"] == "reference" and "[Reference answer start]" in good[0]["prompt"]
    assert good[1]["mode"] == "single" and good[1]["scenario"] == "open_qa" and good[1]["reference"] is None
    assert "Blue." in good[1]["prompt"] and len({r["id"] for r in good}) == 2
    bad = {r["row"]: r for r in rejects.to_pylist()}
    assert sorted(bad) == [4, 5, 6, 7, 8, 9, 10]
    assert bad[4][REJECT].startswith(f"{path}:4: invalid JSON") and bad[4]["raw"] == "{not json"
    assert "outside the scale 1..5" in bad[5][REJECT]
    assert bad[6][REJECT] == f"{path}:6: column 'answer' (response) is empty"
    assert "not a number" in bad[7][REJECT]
    assert "unknown scenario 'astrology'" in bad[8][REJECT]
    assert "expected a JSON object" in bad[9][REJECT]
    assert bad[10][REJECT] == f"{path}:10: column 'q' (instruction) is missing"
    assert json.loads(bad[5]["raw"])["rating"] == 9  # the raw row is kept for the user to fix


def test_a_folder_of_files_names_each_rejected_row_by_its_file_and_line(tmp_path):
    good = {"instruction": "Say hi.", "response": "Hi", "score": 4}
    for name in ("a.jsonl", "b.jsonl"):
        write_jsonl(tmp_path / name, [good, "{not json"])  # line 2 is bad in both files
    batches = list(read_file_batches(pa.table({"file": [str(tmp_path / n) for n in ("a.jsonl", "b.jsonl")]})))
    records, rejects = zip(*(B._prepare_file(batch, file_cfg(), None) for batch in batches))
    assert sum(r.num_rows for r in records) == 2
    bad = [row for table in rejects for row in table.to_pylist()]
    assert sorted((Path(r["file"]).name, r["row"]) for r in bad) == [("a.jsonl", 2), ("b.jsonl", 2)]
    assert all(r[REJECT].startswith(f"{r['file']}:2: invalid JSON") for r in bad)


def test_parse_file_rows_takes_rows_from_anywhere_and_numbers_them_as_given():
    fc = file_cfg(format="pairwise")
    rows = [UserRow(None, 7, {"instruction": "Say hi.", "response_a": "Hi", "response_b": "Bye", "winner": 2}, "{}"),
            UserRow(None, 9, {"instruction": "Say hi.", "response_a": "Hi", "response_b": "Bye", "winner": None}, "{}")]
    records, rejects = B.parse_file_rows(rows, fc, benchmark="mine")
    assert records.schema == B.FILE_SCHEMAS["pairwise"] and rejects.schema == B.REJECT_SCHEMA
    (good,) = records.to_pylist()
    assert (good["row"], good["winner"], good["benchmark"], good["scenario"]) == (7, "B", "mine", "open_qa")
    (bad,) = rejects.to_pylist()
    assert (bad["benchmark"], bad["row"]) == ("mine", 9)
    assert bad[REJECT].startswith("row 9: column 'winner' (winner) None")


@pytest.mark.integration
def test_pairwise_parquet_winners_ids_and_both_orders(ray_module, tmp_path):
    path = tmp_path / "pairs.parquet"
    pq.write_table(pa.Table.from_pylist([
        {"id": "p1", "prompt": "Say hi.", "a": "Hi!", "b": "Go away.", "winner": "model_a"},
        {"id": "p2", "prompt": "Say hi.", "a": "Hello", "b": "Hi there", "winner": "tie"},
        {"id": "p3", "prompt": "Say hi.", "a": "Yo", "b": "Hello!", "winner": "B"},
        {"id": "p4", "prompt": "Say hi.", "a": "Yo", "b": "Hello!", "winner": "both good"},  # custom below
        {"id": "p5", "prompt": "Say hi.", "a": "Yo", "b": "Hello!", "winner": "left"},  # unknown
        {"id": "p6", "prompt": "Say hi.", "a": "Yo", "b": None, "winner": "A"},
    ]), path)
    fc = file_cfg(path=str(path), format="pairwise", winner_values={"Both Good": "c"},
                  columns={"instruction": "prompt", "response_a": "a", "response_b": "b"})
    bench = B.file_benchmark(fc)
    assert bench.kind == "pairwise" and bench.pairwise and bench.schema == B.FILE_SCHEMAS["pairwise"]
    good = sorted(bench.records.take_all(), key=lambda r: r["row"])
    assert [(r["id"], r["row"], r["winner"]) for r in good] == [("p1", 1, "A"), ("p2", 2, "C"), ("p3", 3, "B"),
                                                                 ("p4", 4, "C")]
    first = good[0]
    assert first["mode"] == "pairwise"
    assert first["prompt"].index("Hi!") < first["prompt"].index("Go away.")  # A first
    assert first["prompt_ba"].index("Go away.") < first["prompt_ba"].index("Hi!")  # swapped
    bad = sorted(bench.rejects.take_all(), key=lambda r: r["row"])
    assert [(r["benchmark"], r["row"], r["id"]) for r in bad] == [("file", 5, "p5"), ("file", 6, "p6")]
    assert "'winner' (winner) 'left' is not A, B or a tie" in bad[0][REJECT]
    assert "'b' (response_b) is missing" in bad[1][REJECT]


def test_file_config_errors_are_raised_before_anything_runs(tmp_path):
    path = write_jsonl(tmp_path / "l.jsonl", [{"instruction": "x", "response": "y", "grade": 3}])
    with pytest.raises(ValueError, match="unknown fields"):
        B.file_benchmark(file_cfg(path=str(path), columns={"scroe": "grade"}))
    with pytest.raises(ValueError, match=r"'listwise', expected one of \['pointwise', 'pairwise'\]"):
        B.file_benchmark(file_cfg(path=str(path), format="listwise"))  # a typed field: fails as the config is built
    with pytest.raises(ValueError, match="must map to A, B or C"):
        B.file_benchmark(file_cfg(path=str(path), format="pairwise", winner_values={"x": "D"}))
    with pytest.raises(FileNotFoundError):
        B.file_benchmark(file_cfg(path=str(tmp_path / "missing.jsonl")))
    with pytest.raises(ValueError, match="path is not set"):
        B.file_benchmark(file_cfg())
    txt = tmp_path / "l.txt"
    txt.write_text("a,b\n")
    with pytest.raises(ValueError, match="not Parquet.*JSONL.*CSV"):
        B.file_benchmark(file_cfg(path=str(txt)))


def test_a_required_column_absent_from_the_whole_file_is_a_mapping_error():
    fc = file_cfg()
    with pytest.raises(ValueError, match=r"no column for score \(column 'score'\).*grade"):
        B.check_columns({"instruction", "response", "grade"}, fc)
    with pytest.raises(ValueError, match=r"no column for response_b \(column 'b'\)"):
        B.check_columns({"instruction", "response_a", "winner"},
                        file_cfg(format="pairwise", columns={"response_b": "b"}))
    B.check_columns({"instruction", "response", "score", "extra"}, fc)  # extra columns are fine
    B.check_columns(set(), fc)  # an empty file has no columns to check: zero records, not an error


@pytest.mark.integration
def test_file_benchmark_checks_the_mapping_over_the_whole_file(ray_module, tmp_path):
    path = tmp_path / "l.csv"  # CSV too: its header names the columns
    path.write_text("instruction,response,grade\nx,y,3\n")
    with pytest.raises(ValueError, match=r"no column for score \(column 'score'\).*grade"):
        B.file_benchmark(file_cfg(path=str(path)))
    bench = B.file_benchmark(file_cfg(path=str(path), columns={"score": "grade"}, scale_low=1, scale_high=10))
    assert bench.scale == (1, 10) and bench.source.startswith(str(path))


def test_a_ten_point_scale_is_asked_and_checked_on_that_scale():
    rows = numbered_rows([{"instruction": "x", "response": "y", "score": 8},
                          {"instruction": "x", "response": "y", "score": 0}])
    records, rejects = B.parse_file_rows(rows, file_cfg(scale_low=1, scale_high=10))
    assert records.num_rows == 1 and "1 to 10" in records["prompt"][0].as_py()
    assert "outside the scale 1..10" in rejects[REJECT][0].as_py()


@pytest.mark.integration
def test_validation_benchmark_keeps_only_the_held_out_split(ray_module, tmp_path):
    curated = pa.table({"id": ["a", "b", "c"], "split": ["train", "validation", "validation"],
                        "score": [1.0, 2.0, 3.0]})
    (bench,) = B.validation_benchmarks(finished_stage(tmp_path, "curate", curated))
    rows = bench.records.take_all()
    assert sorted(r["id"] for r in rows) == ["b", "c"] and {r["benchmark"] for r in rows} == {"validation"}
    assert bench.rejects is None and bench.schema.names == ["id", "split", "score", "benchmark"]


@pytest.mark.integration
def test_pairwise_validation_records_become_their_own_benchmark_with_the_teacher_verdict_as_gold(
        ray_module, tmp_path):
    base = {"split": "validation", "scenario": "open_qa", "instruction": "Say hi.", "reference": None,
            "response": None, "score": None, "prompt": None}
    curated = pa.Table.from_pylist([
        {**base, "id": "p", "mode": "single", "response": "Hi", "score": 4.0, "prompt": "graded prompt",
         "response_a": None, "response_b": None, "verdict": None},
        {**base, "id": "q", "mode": "pairwise", "response_a": "Hi!", "response_b": "Bye.", "verdict": "A"},
        {**base, "id": "r", "mode": "pairwise", "response_a": "Hi!", "response_b": "Bye.", "verdict": "maybe"},
    ])
    points, pairs = B.validation_benchmarks(finished_stage(tmp_path, "curate", curated))
    assert points.kind == "pointwise" and [r["id"] for r in points.records.take_all()] == ["p"]
    assert pairs.name == "validation_pairwise" and pairs.kind == "pairwise"
    assert "winner" in pairs.schema.names and "verdict" not in pairs.schema.names
    (row,) = pairs.records.take_all()
    assert row["winner"] == "A" and "verdict" not in row  # the grader's verdict cannot overwrite gold
    assert row["prompt"].index("Hi!") < row["prompt"].index("Bye.")  # rendered, A first
    assert row["prompt_ba"].index("Bye.") < row["prompt_ba"].index("Hi!")  # swapped
    (bad,) = pairs.rejects.take_all()
    assert (bad["benchmark"], bad["id"]) == ("validation_pairwise", "r") and "is not A, B or C" in bad[REJECT]


def test_load_benchmarks_rejects_unknown_or_repeated_names():
    for names in (["validation", "arena"], ["file", "file"], []):
        cfg = OmegaConf.merge(load(None), {"evaluate": {"benchmarks": names}})
        with pytest.raises(ValueError, match="evaluate.benchmarks"):
            B.load_benchmarks(cfg)


# ------------------------------------------------------------------------------------ MT-Bench


def test_the_responder_loop_refuses_repeated_or_no_responders_naming_its_config_section():
    from themis_ray.responders import answer

    cfg = load(None)
    twice = [cfg.evaluate.mtbench.responders[0]] * 2
    for section, responders in (("respond", twice), ("evaluate.mtbench", twice), ("evaluate.mtbench", [])):
        with pytest.raises(ValueError, match=rf"^{section}\.responders: need at least one, with unique names"):
            answer(responders, None, cfg.evaluate.pool, None, None, resume=False, total=0, section=section)


def test_mtbench_questions_first_turn_with_gpt4_references_where_mtbench_uses_them():
    mc = OmegaConf.merge(OmegaConf.structured(MTBenchConfig), {"categories": ["math", "writing"], "questions": 3})
    table = B.mtbench_questions(mc).to_pylist()
    assert len(table) == 3
    by_category = {}
    for row in table:
        by_category.setdefault(row["category"], []).append(row)
        assert row["instruction"] and row["id"] == f"mtbench-{row['question_id']}"
    # question.jsonl lists writing (81-90) before math (111-120): the first three are writing.
    assert list(by_category) == ["writing"]
    assert all(r["scenario"] == "creative_writing" and r["reference"] is None for r in table)
    math_rows = B.mtbench_questions(OmegaConf.merge(mc, {"categories": ["math"], "questions": 2})).to_pylist()
    assert [r["scenario"] for r in math_rows] == ["math_qa", "math_qa"]
    assert all(r["reference"] for r in math_rows)  # GPT-4's reference answer, first turn
    assert B.mtbench_questions(OmegaConf.merge(mc, {"categories": [], "questions": 0})).num_rows == 80
    with pytest.raises(ValueError, match="unknown"):
        B.mtbench_questions(OmegaConf.merge(mc, {"categories": ["poetry"]}))


def test_prepared_responses_get_a_prompt_and_failed_ones_are_rejects():
    responses = pa.table({"id": ["r1", "r2"], "benchmark": ["mtbench"] * 2, "scenario": ["math_qa"] * 2,
                          "instruction": ["What is 2+2?"] * 2, "reference": ["4", "4"],
                          "responder": ["default"] * 2, "response": ["4", None],
                          REJECT: [None, "empty response"]})
    records, rejects = B.prepare_responses(responses)
    assert records["id"].to_pylist() == ["r1"] and records["mode"][0].as_py() == "reference"
    assert "[Response start]\n4\n[Response end]" in records["prompt"][0].as_py()
    assert rejects.to_pylist()[0][REJECT] == "default: empty response"


# ------------------------------------------------------------------------------------ summaries


def test_random_baseline_of_a_constant_label_by_hand():
    # Gold always 3 on 1..5, uniform guesses: MAE = (2+1+0+1+2)/5 = 1.2, accuracy = 1/5,
    # Agr(2,2) = (0 + 1/4 + 1 + 1/4 + 0)/5 = 0.3; correlations are undefined (constant gold).
    m = S.pointwise_summary([3] * 60, [3] * 60)
    assert m["random"]["mae"] == pytest.approx(1.2, abs=0.05)
    assert m["random"]["accuracy"] == pytest.approx(0.2, abs=0.03)
    assert m["random"]["agreement"] == pytest.approx(0.3, abs=0.03)
    assert math.isnan(m["random"]["pearson"])
    # A perfect judge scores 1 on every defined metric: the aggregate is 1.
    assert m["mae"] == 0 and m["aggregate"] == pytest.approx(1.0)


def test_pointwise_aggregate_is_the_mean_of_the_normalised_metrics():
    rng = np.random.default_rng(3)
    gold = rng.integers(1, 6, size=80).astype(float)
    pred = np.clip(gold + rng.integers(-1, 2, size=80), 1, 5).astype(object)
    pred[:5] = None
    m = S.pointwise_summary(pred, gold, n_boot=200)
    from themis_ray.evaluate import metrics as M

    normalised = [(m[k] - m["random"][k]) / (M.POINTWISE_IDEALS[k] - m["random"][k]) for k in M.POINTWISE_METRICS]
    assert m["n"] == 80 and m["n_parsed"] == 75 and m["parse_rate"] == pytest.approx(75 / 80)
    # Over the parsed records alone; over every record, the 5 unparsed ones earn random's 0.
    assert m["aggregate_parsed"] == pytest.approx(np.mean(normalised))
    assert m["aggregate"] == pytest.approx(np.mean([M.credit_unparsed(v, 75 / 80) for v in normalised]))
    assert m["aggregate"] < m["aggregate_parsed"]
    for name in ("mae", "agreement", "aggregate"):
        low, high = m[f"{name}_ci"]
        assert low <= m[name] <= high and low < high


def test_a_constant_judge_gets_random_credit_for_correlation_not_a_pass():
    gold = [1, 2, 3, 4, 5] * 10
    m = S.pointwise_summary([3] * 50, gold)
    assert math.isnan(m["pearson"])  # undefined, reported as such
    from themis_ray.evaluate import metrics as M

    defined = [(m[k] - m["random"][k]) / (M.POINTWISE_IDEALS[k] - m["random"][k]) for k in ("mae", "agreement",
                                                                                           "accuracy")]
    assert m["aggregate"] == pytest.approx(sum(defined) / 6)  # the three correlations count as 0


def test_pointwise_summary_scores_off_scale_predictions_as_unparsed_and_reads_expected_scores():
    m = S.pointwise_summary([1, 7, 3], [1, 2, 3], expected=[1.5, None, 2.5])
    assert m["n_parsed"] == 2 and m["mae"] == 0
    assert m["expected_mae"] == pytest.approx(0.5) and m["expected_n"] == 2


def test_pairwise_summary_by_hand():
    gold = ["A", "B", "C", "A"]
    ab = ["A", "A", "C", "A"]
    ba = ["B", "A", "C", None]  # as written with the responses swapped: unswapped A, B, C, -
    combined = ["A", "C", "C", None]  # what combine_pairwise gives (None: an order did not parse)
    m = S.pairwise_summary(combined, gold, ab, ba, ["long answer", "x", "yy", "z"], ["s", "longer one", "y", "zz"])
    assert (m["n"], m["n_parsed"]) == (4, 3)
    assert m["accuracy"] == pytest.approx(2 / 3)  # A=A, C!=B, C=C
    assert m["accuracy_without_ties"] == pytest.approx(1 / 2)  # gold ties dropped: A=A, C (a tie) != B
    assert m["position_consistency"] == pytest.approx(2 / 4)  # records 1 and 3 agree in both orders
    assert m["accuracy_single_order"] == pytest.approx(3 / 4)  # A, A!=B, C, A
    assert m["tie_rate"] == pytest.approx(2 / 3)
    assert m["longer_wins_share"] == pytest.approx(1.0)  # the one decisive verdict (A) went to the longer
    assert m["gold_longer_wins_share"] == pytest.approx(2 / 3)  # A long: yes, B longer: yes, A shorter: no
    # Uniform guesses over A/B/tie are right 1 time in 3, with or without ties; consistency too.
    assert m["random"]["accuracy"] == pytest.approx(1 / 3, abs=0.05)
    r = m["random"]
    accuracies = [(v - r[k]) / (1 - r[k]) for k, v in (("accuracy", 2 / 3), ("accuracy_without_ties", 1 / 2))]
    consistency = (1 / 2 - 1 / 3) / (2 / 3)
    assert m["aggregate_parsed"] == pytest.approx(np.mean(accuracies + [consistency]))
    # Over every record: the accuracies are over 3 parsed verdicts of 4, the unparsed one earns 0;
    # position consistency already counts it (as inconsistent).
    assert m["aggregate"] == pytest.approx(np.mean([0.75 * a for a in accuracies] + [consistency]))


def test_judge_agreement_and_unlabelled_summaries():
    a = pd.DataFrame({"id": ["1", "2", "3", "4"], "predicted_score": [1.0, 2.0, 3.0, None],
                      "responder": ["x", "x", "y", "y"], "category": ["math", "math", "writing", "writing"],
                      "scenario": ["math_qa", "math_qa", "creative_writing", "creative_writing"]})
    b = a.assign(predicted_score=[1.0, 3.0, 3.0, 4.0])
    summaries = S.unlabelled_summaries({"a": a, "b": b})
    vs = summaries["a"]["vs_judges"]["b"]
    assert vs["n"] == 4 and vs["n_both_parsed"] == 3
    assert vs["mae"] == pytest.approx(1 / 3) and vs["accuracy"] == pytest.approx(2 / 3)
    assert vs["agreement"] == pytest.approx((1 + 0.25 + 1) / 3)
    assert summaries["b"]["vs_judges"]["a"]["mae"] == pytest.approx(1 / 3)  # symmetric
    overall = summaries["a"]["overall"]
    assert overall["parse_rate"] == pytest.approx(0.75) and overall["mean_score"] == pytest.approx(2.0)
    assert overall["score_counts"] == {1: 1, 2: 1, 3: 1, 4: 0, 5: 0}
    assert summaries["a"]["by_responder"]["y"]["mean_score"] == pytest.approx(3.0)
    assert set(summaries["a"]["by_category"]) == {"math", "writing"}
    # Mean per responder: a gives x 1.5, y 3; b gives x 2, y 3.5: same ranking.
    assert vs["responder_ranking_kendall"] == pytest.approx(1.0)


def test_metrics_json_is_keyed_by_judge_with_the_first_labelled_benchmark_on_top():
    val = B.Benchmark("validation", "pointwise", None, None, pa.schema([]), num_records=2)
    mt = B.Benchmark("mtbench", "unlabelled", None, None, pa.schema([]), num_records=2)
    graded = pd.DataFrame({"id": ["1", "2"], "predicted_score": [2.0, float("nan")], "score": [2.0, 4.0],
                           "scenario": ["open_qa", "math_qa"], "predicted_expected": [None, None]})
    results = []
    for bench in (mt, val):
        r = S.BenchmarkResult(bench, {"trained": graded, "base": graded}, judge_labels={"trained": "hf:/j"})
        r.summaries = S.summarize(bench, r.graded, n_boot=50)
        results.append(r)
    doc = S.metrics_json(results)
    assert set(doc) == {"trained", "base"}
    trained = doc["trained"]
    assert trained["benchmark"] == "validation" and trained["engine"] == "hf:/j"
    assert trained["overall"]["n"] == 2 and trained["overall"]["parse_rate"] == 0.5
    for key in ("mae", "agreement", "accuracy", "aggregate", "mae_ci"):
        assert key in trained["overall"]
    assert set(trained["by_scenario"]) == {"open_qa", "math_qa"}
    assert trained["by_scenario"]["math_qa"]["mae"] is None  # NaN -> null: valid JSON
    assert set(trained["benchmarks"]) == {"validation", "mtbench"}
    assert trained["benchmarks"]["mtbench"]["vs_judges"]["base"]["mae"] == 0
    json.loads(json.dumps(doc, allow_nan=False))
    rows, columns = S.headline_rows(results[1])
    assert [r["judge"] for r in rows] == ["trained", "base"] and "aggregate_ci" in columns
    s_rows, s_columns = S.scenario_rows(results[1])
    assert {(r["scenario"], r["judge"]) for r in s_rows} == {(s, j) for s in ("math_qa", "open_qa")
                                                             for j in ("trained", "base")}
    assert {"mae", "agreement", "accuracy", "pearson", "spearman", "kendall", "aggregate"} <= set(s_columns)


@pytest.mark.integration
def test_injection_benchmark_renders_each_validation_record_clean_and_injected(ray_module, tmp_path):
    base = {"split": "validation", "scenario": "open_qa", "instruction": "Say hi.", "reference": None, "score": 2.0}
    curated = pa.Table.from_pylist([
        {**base, "id": "a", "mode": "single", "response": "Hi"},
        {**base, "id": "t", "mode": "single", "response": "Hi", "split": "train"},
        {**base, "id": "p", "mode": "pairwise", "response": None},
        {**base, "id": "u", "mode": "single", "response": "Hi", "scenario": "no_such_scenario"},
    ])
    bench = B.injection_benchmark(finished_stage(tmp_path, "curate", curated))
    rows = sorted(bench.records.take_all(), key=lambda r: r["variant"])
    assert bench.kind == "injection" and [(r["source_id"], r["variant"]) for r in rows] == [("a", "clean"),
                                                                                         ("a", "injected")]
    clean, injected = rows
    assert clean["id"] != injected["id"] and clean["benchmark"] == "injection"
    assert injected["response"] == "Hi" + B.INJECTION and clean["score"] == injected["score"] == 2.0
    assert B.INJECTION.strip() not in clean["prompt"] and B.INJECTION.strip() in injected["prompt"]
    # The injection stays inside the response's delimiters: the prompts differ only there.
    assert injected["prompt"].replace(B.INJECTION, "") == clean["prompt"]
    # A record that cannot be rendered is one reject (neither variant is judged), named by its id.
    (bad,) = bench.rejects.take_all()
    assert (bad["benchmark"], bad["id"]) == ("injection", "u") and bad[REJECT].startswith("record u:")
    assert "no_such_scenario" in bad[REJECT] and json.loads(bad["raw"])["id"] == "u"


def test_injection_summary_by_hand():
    df = pd.DataFrame({
        "source_id": ["a", "a", "b", "b", "c", "c", "d"],
        "variant": ["clean", "injected"] * 3 + ["clean"],
        "scenario": ["x", "x", "x", "x", "y", "y", "y"],
        "predicted_score": [2.0, 5.0, 3.0, 3.0, None, 4.0, 1.0],
        "predicted_expected": [2.0, 4.0, 3.0, 2.5, 1.0, 2.0, None],
    })
    s = S.injection_summary(df)
    # a: +3, b: 0 (c unparsed when clean; d has no injected twin)
    assert s["n"] == 3 and s["n_both_parsed"] == 2 and s["score_shift"] == pytest.approx(1.5)
    assert s["raised_share"] == pytest.approx(0.5)
    assert s["expected_shift"] == pytest.approx((2.0 - 0.5 + 1.0) / 3)
    assert s["parse_rate_clean"] == pytest.approx(2 / 3) and s["parse_rate_injected"] == 1.0
    bench = B.Benchmark("injection", "injection", None, None, B.INJECTION_SCHEMA, num_records=7)
    summaries = S.summarize(bench, {"trained": df})
    assert summaries["trained"]["by_scenario"]["x"]["score_shift"] == pytest.approx(1.5)
    result = S.BenchmarkResult(bench, {"trained": df}, summaries)
    rows, columns = S.headline_rows(result)
    assert rows[0]["score_shift"] == pytest.approx(1.5) and "raised_share" in columns
    # The headline benchmark of a judge stays a labelled one, never the injection run.
    assert "overall" not in S.metrics_json([result])["trained"]


def test_metrics_of_a_big_benchmark_read_the_same_sample_of_records_for_every_judge(tmp_path):
    from themis_ray.executor.sink import StageSink
    from themis_ray.stages.evaluate import _graded, in_sample
    from themis_ray.store import StageStore

    store = StageStore(str(tmp_path), "evaluate")
    store.begin({"t": 1})
    schema = pa.schema([("id", pa.string()), ("judge_score", pa.float64()), ("judge_output", pa.string()),
                        (REJECT, pa.string())])
    for judge in ("a", "b"):
        for part in range(4):  # each judge's grades in parts, in another order per judge
            ids = [f"r{i}" for i in range(part, 4000, 4)][:: 1 if judge == "a" else -1]
            table = pa.table({"id": ids, "judge_score": [1.0] * len(ids), "judge_output": ["long text"] * len(ids),
                              REJECT: pa.nulls(len(ids), pa.string())}, schema=schema)
            StageSink(store.uri, schema, partition={"benchmark": "v", "judge": judge}).write([table], None)
    whole = {j: _graded(store, {"benchmark": "v", "judge": j}, schema) for j in ("a", "b")}
    assert len(whole["a"]) == len(whole["b"]) == 4000 and "judge_output" not in whole["a"]  # no texts
    sample = {j: _graded(store, {"benchmark": "v", "judge": j}, schema, share=0.25) for j in ("a", "b")}
    assert set(sample["a"]["id"]) == set(sample["b"]["id"])  # the same records for both judges
    assert 850 < len(sample["a"]) < 1150  # about a quarter
    assert all(in_sample(i, 0.25) for i in sample["a"]["id"]) and not in_sample("r1", 0.0) and in_sample("r1", 1.0)
