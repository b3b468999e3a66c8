"""Judges grading on the real embedded model: the grader alone, then the whole stage on Ray."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pyarrow as pa
import pytest
from omegaconf import OmegaConf

from themis_ray import judging
from themis_ray.config import EngineConfig, LabelledFileConfig, SamplingConfig, load
from themis_ray.evaluate import benchmarks as B
from themis_ray.evaluate.grading import JudgeGrader, graded_schema
from themis_ray.records import numbered_rows
from themis_ray.schema import REJECT

sys.path.insert(0, str(Path(__file__).parent))
from stage_io import finished_stage, run_one, stage_path  # noqa: E402



def file_records(fmt, rows, **kwargs):
    """A labelled file's records as the file benchmark prepares them (parse_file_rows, in this process):
    (records, schema, scale)."""
    fc = OmegaConf.merge(OmegaConf.structured(LabelledFileConfig), {"format": fmt, **kwargs})
    records, rejects = B.parse_file_rows(numbered_rows(rows), fc)
    assert rejects.num_rows == 0
    return records, B.FILE_SCHEMAS[fmt], (fc.scale_low, fc.scale_high)


POINTWISE = [
    {"instruction": "What is 2+2?", "response": "2+2 equals 4.", "reference": "4", "score": 5, "scenario": "math_qa"},
    {"instruction": "What is 2+2?", "response": "It is 5.", "reference": "4", "score": 1, "scenario": "math_qa"},
]
PAIRWISE = [
    {"instruction": "What is the capital of France?", "response_a": "Paris.", "response_b": "Berlin, I think.",
     "winner": "A", "scenario": "close_qa"},
]


def grader(schema, pairwise, scale, **kwargs):
    args = dict(judge="base", engine_cfg=EngineConfig(), sampling=SamplingConfig(max_tokens=8, logprobs=5),
                prefill=True, scale=scale)
    return JudgeGrader(graded_schema(schema, pairwise), **{**args, **kwargs})


@pytest.mark.integration  # loads the real model
def test_real_judge_grades_pointwise_and_pairwise_records():
    points, point_schema, scale = file_records("pointwise", POINTWISE)
    pairs, pair_schema, _ = file_records("pairwise", PAIRWISE)
    judge = grader(point_schema, False, scale)
    out = judge.process(points.to_pylist())
    assert [r["id"] for r in out] == points["id"].to_pylist()
    for row in out:
        assert row["judge"] == "base" and row[REJECT] is None
        assert row["judge_output"].startswith("[[")  # the prefill is part of the answer
        if row["predicted_score"] is None:
            assert row["judge_error"]  # unparsed: measured by the parse rate, with the reason
        else:
            assert 1 <= row["predicted_score"] <= 5 and row["judge_error"] is None
        if row["predicted_distribution"] is not None:  # the first token is the score: a distribution
            assert sum(row["predicted_distribution"]) == pytest.approx(1.0)
            assert 1 <= row["predicted_expected"] <= 5
    pa.Table.from_pylist(out, schema=judge.schema)  # rows fit the declared schema

    judge.schema = graded_schema(pair_schema, pairwise=True)
    (row,) = judge.process(pairs.to_pylist())
    assert row["judge_output"].startswith("[[") and row["judge_output_ba"].startswith("[[")
    assert row["verdict_ab"] in ("A", "B", "C", None) and row["verdict_ba"] in ("A", "B", "C", None)
    if None in (row["verdict_ab"], row["verdict_ba"]):
        assert row["verdict"] is None and row["consistent"] is False and row["judge_error"]
    else:
        unswapped = {"A": "B", "B": "A", "C": "C"}[row["verdict_ba"]]
        assert row["consistent"] == (row["verdict_ab"] == unswapped)
        assert row["verdict"] == (row["verdict_ab"] if row["consistent"] else "C")
    pa.Table.from_pylist([row], schema=judge.schema)


@pytest.mark.integration  # loads the real model
def test_without_a_rationale_each_order_is_one_forward_pass_and_the_answer_is_the_choice(hf_engine):
    points, point_schema, scale = file_records("pointwise", POINTWISE)
    pairs, pair_schema, _ = file_records("pairwise", PAIRWISE)
    judge = grader(point_schema, False, scale, rationale=False)
    for row in judge.process(points.to_pylist()):
        lp = hf_engine.choice_logprobs(judging.build_messages(row["prompt"], prefill=True), judging.choice_options())
        _, _, dist = judging.evaluation_from_choices(lp)
        assert row["predicted_distribution"] == pytest.approx(list(dist.values()), abs=1e-5)
        assert row["judge_output"] == f"[[{int(row['predicted_score'])}]]" and row["judge_error"] is None
        assert row["predicted_score"] == max(dist, key=dist.get)
    judge.schema = graded_schema(pair_schema, pairwise=True)
    (row,) = judge.process(pairs.to_pylist())
    assert row["verdict_ab"] in "ABC" and row["verdict_ba"] in "ABC" and row["judge_output"] == f"[[{row['verdict_ab']}]]"
    assert (row["verdict"], row["consistent"]) == judging.combine_pairwise(row["verdict_ab"], row["verdict_ba"])


@pytest.mark.integration  # loads the real model
def test_calibrated_choice_divides_out_the_judges_prior_on_a_content_free_record(hf_engine):
    points, point_schema, scale = file_records("pointwise", POINTWISE)
    pairs, pair_schema, _ = file_records("pairwise", PAIRWISE)

    def choice(prompt, mode="single"):
        return hf_engine.choice_logprobs(judging.build_messages(prompt, prefill=True), judging.choice_options(mode))

    judge = grader(point_schema, False, scale, rationale=False, calibrate=True)
    plain = grader(point_schema, False, scale, rationale=False)
    for row, raw in zip(judge.process(points.to_pylist()), plain.process(points.to_pylist())):
        prior = choice(judging.content_free_prompt(row["scenario"], row["mode"]))
        _, _, dist = judging.evaluation_from_choices([a - b for a, b in zip(choice(row["prompt"]), prior)])
        assert row["predicted_distribution"] == pytest.approx(list(dist.values()), abs=1e-5)
        assert row["predicted_score"] == max(dist, key=dist.get)
        assert row["predicted_distribution"] != pytest.approx(raw["predicted_distribution"], abs=1e-3)
    judge.schema = graded_schema(pair_schema, pairwise=True)
    (row,) = judge.process(pairs.to_pylist())
    prior = choice(judging.content_free_prompt(row["scenario"], "pairwise"), "pairwise")
    _, parsed, _ = judging.evaluation_from_choices([a - b for a, b in zip(choice(row["prompt"], "pairwise"), prior)],
                                                   "pairwise")
    assert row["verdict_ab"] == parsed.verdict


@pytest.mark.integration  # loads the real model
def test_a_judge_that_cannot_answer_is_measured_not_dropped():
    points, schema, scale = file_records("pointwise", POINTWISE[:1])
    judge = grader(schema, False, scale, engine_cfg=EngineConfig(max_model_len=64))  # the prompt does not fit
    (row,) = judge.process(points.to_pylist())
    assert row[REJECT] is None and row["predicted_score"] is None
    assert row["judge_error"].startswith("engine error") and "max_model_len" in row["judge_error"]


@pytest.mark.integration
def test_stage_runs_two_judges_on_validation_file_and_mtbench(ray_module, tmp_path):
    from themis_ray import judging

    curated = []
    for i, (response, score, split) in enumerate([("4", 5.0, "validation"), ("5", 1.0, "validation"),
                                                  ("four", 4.0, "train")]):
        request = judging.JudgeRequest(instruction="What is 2+2?", response=response, scenario="math_qa",
                                       reference="4", mode="reference")
        curated.append({"id": f"v{i}", "scenario": "math_qa", "mode": "reference", "instruction": "What is 2+2?",
                        "response": response, "reference": "4", "score": score, "split": split,
                        "prompt": judging.render_prompt(request)})
    labels = tmp_path / "human.jsonl"
    labels.write_text("\n".join(json.dumps(r) for r in POINTWISE) + "\nnot json\n")
    run_dir = tmp_path / "run"
    cfg = load(None, [
        f"run_dir={run_dir}",
        "evaluate.benchmarks=[validation,file,mtbench]",
        f"evaluate.file.path={labels}",
        "evaluate.judges=[{name: base},{name: sampled, model: smollm2-135m-instruct, prefill_score: false}]",
        "evaluate.sampling.max_tokens=8",
        "evaluate.bootstrap=50",
        "evaluate.mtbench.questions=2",
        "evaluate.mtbench.categories=[math]",
        "evaluate.pool.num_cpus=0.5",
    ])
    cfg.evaluate.mtbench.responders[0].sampling.max_tokens = 12
    finished_stage(run_dir, "curate", pa.Table.from_pylist(curated))
    # Evaluate's inputs are curate and train; these judges never load the trained one, so an empty
    # finished train stage stands in for it.
    finished_stage(run_dir, "train", pa.table({"id": pa.array([], pa.string())}))
    # The driver dies just before the commit; the same command again resumes: every record is graded
    # already, so it grades none again (the parts are the first run's) and writes the rejects again.
    _, _, store = run_one(cfg, "evaluate", commit=False)
    parts = store.written_files(rejects=False)
    manifest, result, store = run_one(cfg, "evaluate")
    assert store.written_files(rejects=False) == parts

    # 2 validation + 2 file records + 2 MT-Bench answers, each by 2 judges, and the file's bad line.
    assert result.rows_in == manifest["rows_in"] == (2 + 2 + 2) * 2 + 1
    assert (manifest["rows_out"], manifest["rows_rejected"]) == (12, 1)
    graded = store.read(columns=["benchmark", "judge", "id"]).to_pylist()
    assert len(graded) == 12 and len({(r["benchmark"], r["judge"], r["id"]) for r in graded}) == 12
    assert {(r["benchmark"], r["judge"]) for r in graded} == {(b, j) for b in ("validation", "file", "mtbench")
                                                              for j in ("base", "sampled")}
    assert {r["id"] for r in graded if r["benchmark"] == "validation"} == {"v0", "v1"}  # not the train row
    rejects = store.read_rejects().to_pylist()
    assert [(r["benchmark"], r["row"]) for r in rejects] == [("file", 3)]
    assert rejects[0]["file"] == str(labels) and rejects[0]["raw"] == "not json"
    assert rejects[0][REJECT].startswith(f"{labels}:3: invalid JSON")

    staging = stage_path(store)
    metrics = json.loads((staging / "metrics.json").read_text())
    assert set(metrics) == {"base", "sampled"}
    for judge in metrics.values():
        assert judge["benchmark"] == "validation" and judge["overall"]["n"] == 2
        assert 0 <= judge["overall"]["parse_rate"] <= 1
        for key in ("mae", "agreement", "accuracy", "aggregate", "aggregate_parsed", "mae_ci", "agreement_ci"):
            assert key in judge["overall"]
        assert list(judge["by_scenario"]) == ["math_qa"]
        assert judge["benchmarks"]["file"]["overall"]["n"] == 2
        mt = judge["benchmarks"]["mtbench"]
        assert mt["kind"] == "unlabelled" and mt["overall"]["n"] == 2 and set(mt["by_category"]) == {"math"}
    assert metrics["base"]["benchmarks"]["mtbench"]["vs_judges"]["sampled"]["n"] == 2
    assert result.extra["metrics_benchmark"] == "validation" and set(result.extra["metrics"]) == {"base", "sampled"}
    assert manifest["metrics_benchmark"] == "validation"

    page = (staging / "report.html").read_text()
    assert "Records: 2; rejected: 1" in page  # the file benchmark: 2 records, the bad line
    for name in ("base_confusion.png", "file_sampled_scores.png", "mtbench_agreement.png", "validation_by_scenario.png"):
        assert f'src="{name}"' in page and (staging / name).stat().st_size > 0
