"""Judges grading on the real embedded model: the grader alone, then the whole stage on Ray."""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.compute as pc
import pytest
from omegaconf import OmegaConf

from themis_ray.config import EngineConfig, LabelledFileConfig, SamplingConfig, load
from themis_ray.evaluate import benchmarks as B
from themis_ray.evaluate.grading import JudgeGrader, graded_schema
from themis_ray.schema import REJECT


def file_records(tmp_path, fmt, rows, **kwargs):
    path = tmp_path / f"{fmt}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fc = OmegaConf.merge(OmegaConf.structured(LabelledFileConfig), {"path": str(path), "format": fmt, **kwargs})
    return B.file_benchmark(fc)


POINTWISE = [
    {"instruction": "What is 2+2?", "response": "2+2 equals 4.", "reference": "4", "score": 5, "scenario": "math_qa"},
    {"instruction": "What is 2+2?", "response": "It is 5.", "reference": "4", "score": 1, "scenario": "math_qa"},
]
PAIRWISE = [
    {"instruction": "What is the capital of France?", "response_a": "Paris.", "response_b": "Berlin, I think.",
     "winner": "A", "scenario": "close_qa"},
]


def grader(bench, **kwargs):
    args = dict(judge="base", engine_cfg=EngineConfig(), sampling=SamplingConfig(max_tokens=8, logprobs=5),
                prefill=True, scale=bench.scale)
    return JudgeGrader(graded_schema(bench.records.schema, bench.pairwise), **{**args, **kwargs})


def test_real_judge_grades_pointwise_and_pairwise_records(tmp_path):
    points = file_records(tmp_path, "pointwise", POINTWISE)
    pairs = file_records(tmp_path, "pairwise", PAIRWISE)
    judge = grader(points)
    out = judge.process(points.records.to_pylist())
    assert [r["id"] for r in out] == points.records["id"].to_pylist()
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

    judge.schema = graded_schema(pairs.records.schema, pairwise=True)
    (row,) = judge.process(pairs.records.to_pylist())
    assert row["judge_output"].startswith("[[") and row["judge_output_ba"].startswith("[[")
    assert row["verdict_ab"] in ("A", "B", "C", None) and row["verdict_ba"] in ("A", "B", "C", None)
    if None in (row["verdict_ab"], row["verdict_ba"]):
        assert row["verdict"] is None and row["consistent"] is False and row["judge_error"]
    else:
        unswapped = {"A": "B", "B": "A", "C": "C"}[row["verdict_ba"]]
        assert row["consistent"] == (row["verdict_ab"] == unswapped)
        assert row["verdict"] == (row["verdict_ab"] if row["consistent"] else "C")


def test_a_judge_that_cannot_answer_is_measured_not_dropped(tmp_path):
    points = file_records(tmp_path, "pointwise", POINTWISE[:1])
    judge = grader(points, engine_cfg=EngineConfig(max_model_len=64))  # the prompt does not fit
    (row,) = judge.process(points.records.to_pylist())
    assert row[REJECT] is None and row["predicted_score"] is None
    assert row["judge_error"].startswith("engine error") and "max_model_len" in row["judge_error"]


@pytest.mark.integration
def test_stage_runs_two_judges_on_validation_file_and_mtbench(tmp_path):
    import ray

    from themis_ray import judging
    from themis_ray.stages.evaluate import run

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
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
    cfg = load(None, [
        f"run_dir={tmp_path / 'run'}",
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
    staging = tmp_path / "evaluate"
    staging.mkdir()
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        result = run(cfg, {"curate": pa.Table.from_pylist(curated)}, staging)
    finally:
        ray.shutdown()

    # 2 validation + 2 file records + 2 MT-Bench answers, each by 2 judges, and the file's bad line.
    assert result.rows_in == (2 + 2 + 2) * 2 + 1
    table = result.table
    assert table.num_rows == result.rows_in
    rejects = table.filter(pc.is_valid(table[REJECT])).to_pylist()
    assert [(r["benchmark"], r["row"]) for r in rejects] == [("file", 3)]
    assert rejects[0][REJECT].startswith("row 3: invalid JSON")

    metrics = json.loads((staging / "metrics.json").read_text())
    assert set(metrics) == {"base", "sampled"}
    for judge in metrics.values():
        assert judge["benchmark"] == "validation" and judge["overall"]["n"] == 2
        assert 0 <= judge["overall"]["parse_rate"] <= 1
        for key in ("mae", "agreement", "accuracy", "aggregate", "mae_ci", "agreement_ci"):
            assert key in judge["overall"]
        assert list(judge["by_scenario"]) == ["math_qa"]
        assert judge["benchmarks"]["file"]["overall"]["n"] == 2
        mt = judge["benchmarks"]["mtbench"]
        assert mt["kind"] == "unlabelled" and mt["overall"]["n"] == 2 and set(mt["by_category"]) == {"math"}
    assert metrics["base"]["benchmarks"]["mtbench"]["vs_judges"]["sampled"]["n"] == 2
    assert result.extra["metrics_benchmark"] == "validation" and set(result.extra["metrics"]) == {"base", "sampled"}

    page = (staging / "report.html").read_text()
    for name in ("base_confusion.png", "file_sampled_scores.png", "mtbench_agreement.png", "validation_by_scenario.png"):
        assert f'src="{name}"' in page and (staging / name).stat().st_size > 0
