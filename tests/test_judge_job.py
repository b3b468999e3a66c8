"""`themis-ray judge`: a user's dataset judged on the streaming data plane.

A 2,000-row JSONL with broken rows, input and output in a loopback S3 bucket, judged through the
openai engine against a real OpenAI-compatible server; the driver killed with SIGKILL mid-run and the
same command run again, the server's request log showing nothing asked twice beyond what was in
flight; and the embedded model judging a handful of rows through the hf engine.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from local_ray import free_ports  # noqa: E402
from openai_server import start_process  # noqa: E402

from themis_ray import fs  # noqa: E402
from themis_ray.config import load  # noqa: E402
from themis_ray.judge_job import input_schema, judge_step, prepare, router_step, schemas  # noqa: E402
from themis_ray.judging import RatingScale  # noqa: E402
from themis_ray.records import user_rows  # noqa: E402
from themis_ray.schema import REJECT, REJECT_CODE  # noqa: E402
from themis_ray.store import StageStore  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
N = 2000
BROKEN = {7: "not json at all", 70: json.dumps([1, 2]), 700: json.dumps({"prompt": "What?", "completion": "   "}),
          1400: json.dumps({"prompt": "Why?", "completion": "Because.", "scenario": "poetry"}),
          1999: json.dumps({"completion": "an answer to nothing"})}


def dataset_lines() -> list[str]:
    lines = []
    for i in range(N):
        row = {"prompt": f"What is {i} + {i}?", "completion": f"It is {2 * i}.", "rating": i % 5, "tags": ["math"]}
        lines.append(BROKEN.get(i, json.dumps(row)))
    return lines


# ---------------------------------------------------------------------------------- unit: mapping


def test_rows_are_mapped_and_bad_ones_name_file_row_and_column():
    records = pa.table({"_file": ["d.jsonl"] * 4, "_row": [1, 2, 3, 4],
                        "_record": [json.dumps({"prompt": "Q?", "completion": "A.", "score": 3}), "oops",
                                    json.dumps({"prompt": "Q?", "completion": ""}),
                                    json.dumps({"prompt": "Q?", "a": "x", "b": "y", "mode": "pairwise"})],
                        "_error": [None, "invalid JSON: Expecting value", None, None]})
    prepared, output = schemas(input_schema({"prompt": {"str": 1}, "completion": {"str": 1}, "score": {"int": 1},
                                             "a": {"str": 1}, "b": {"str": 1}, "mode": {"str": 1}}))
    # An input column the judge writes itself keeps its value under "input.": nothing of the user's is lost.
    assert "input.score" in output.names and "input.prompt" in output.names and "score" in output.names
    rows = prepare(records, prepared, columns={"instruction": "prompt", "response": "completion", "response_a": "a",
                                               "response_b": "b"}, mode=None, scenario="open_qa",
                   scenarios=["open_qa"]).to_pylist()
    assert rows[0][REJECT] is None and rows[0]["instruction"] == "Q?" and rows[0]["response"] == "A."
    assert rows[0]["input.score"] == 3 and rows[0]["input.prompt"] == "Q?" and rows[0]["scenario"] == "open_qa"
    assert rows[1][REJECT] == "d.jsonl:2: invalid JSON: Expecting value" and rows[1][REJECT_CODE] == "bad_record"
    assert rows[2][REJECT] == "d.jsonl:3: column 'completion' (response) is empty"
    assert rows[3][REJECT] is None and rows[3]["mode"] == "pairwise" and rows[3]["response_b"] == "y"


def test_the_judge_job_and_the_labelled_file_benchmark_reject_a_row_in_the_same_words():
    from omegaconf import OmegaConf

    from themis_ray.config import LabelledFileConfig
    from themis_ray.evaluate.benchmarks import parse_file_rows

    records = pa.table({"_file": ["d.jsonl"] * 2, "_row": [1, 2],
                        "_record": [json.dumps({"q": "Q?", "answer": " ", "score": 3}), "oops"],
                        "_error": [None, "invalid JSON: Expecting value"]})
    prepared, _ = schemas(input_schema({"q": {"str": 1}, "answer": {"str": 1}, "score": {"int": 1}}))
    columns = {"instruction": "q", "response": "answer"}
    judged = prepare(records, prepared, columns=columns, mode=None, scenario="open_qa", scenarios=["open_qa"])
    fc = OmegaConf.merge(OmegaConf.structured(LabelledFileConfig), {"columns": columns})
    _, evaluated = parse_file_rows(user_rows(records), fc)
    assert judged[REJECT].to_pylist() == evaluated[REJECT].to_pylist() == [
        "d.jsonl:1: column 'answer' (response) is empty", "d.jsonl:2: invalid JSON: Expecting value"]


def test_the_parse_rate_counts_unparsable_answers_by_their_code_not_their_text():
    from themis_ray.judge_job import judge_stats

    prepared, output = schemas(input_schema({"q": {"str": 1}}))
    rows = [{"id": "a", "prompt_tokens": 10, "completion_tokens": 5, "cost_usd": 0.5, REJECT_CODE: "unparsable",
             REJECT: "as given: unparsable evaluation: no [[A]]; swapped: engine error: timeout"},
            {"id": "b", "prompt_tokens": 7, "completion_tokens": 0, "cost_usd": 0.0, REJECT_CODE: "bad_record",
             REJECT: "unparsable evaluation.jsonl:3: column 'response' (response) is missing"},
            {"id": "c", "prompt_tokens": 3, "completion_tokens": 1, "cost_usd": 0.25, REJECT_CODE: "engine_error",
             REJECT: "engine error: unparsable evaluation body"}]
    stats = judge_stats(pa.Table.from_pylist(rows, schema=output), rejected=True)
    assert stats == {"prompt_tokens": 20, "completion_tokens": 6, "cost_usd": 0.75, "unparsable": 1}
    assert REJECT_CODE in prepared.names and output.names[-2:] == [REJECT, REJECT_CODE]


def test_the_scenario_router_declares_its_engine_so_it_is_preflighted_and_given_gpus():
    import importlib.util

    from themis_ray.executor import StepEngine
    from themis_ray.executor.plan import actor_gpus, preflight_step

    cfg = load(None, ["judge.classify.method=zero_shot", "judge.classify.engine.kind=vllm",
                      "judge.classify.engine.tensor_parallel_size=2", "judge.classify.pool.num_gpus=0"])
    step = router_step(cfg)
    assert step.engine == StepEngine(cfg.judge.classify.engine, "judge.classify.engine", scores=True)
    assert actor_gpus(step) == 2  # each router actor holds the GPUs its vllm engine runs on
    if importlib.util.find_spec("vllm") is None:  # the driver stops before any actor waits
        with pytest.raises(RuntimeError, match=r"judge\.classify\.engine\.kind is 'vllm' but vLLM is not installed"):
            preflight_step(step)
    trained = router_step(load(None, ["judge.classify.method=trained"]))
    assert trained.engine is None and actor_gpus(trained) == 0  # a trained classifier builds no engine


def test_a_step_that_scores_text_with_an_engine_that_cannot_fails_on_the_driver_naming_its_key():
    from themis_ray.executor.plan import preflight_step

    remote = ["judge.engine.kind=openai", "judge.classify.engine.kind=openai", "judge.classify.method=zero_shot"]
    cfg = load(None, remote + ["judge.rationale=false"])
    with pytest.raises(ValueError, match=r"^judge scores given text .* a 'openai' engine cannot do; "
                                         r"set judge\.engine\.kind to hf or vllm$"):
        preflight_step(judge_step(cfg, RatingScale(1, 5)))
    with pytest.raises(ValueError, match=r"set judge\.classify\.engine\.kind to hf or vllm$"):
        preflight_step(router_step(cfg))  # zero-shot classification scores each scenario's name
    preflight_step(judge_step(load(None, remote), RatingScale(1, 5)))  # with a rationale it only generates


# ------------------------------------------------------------------------ the openai engine on S3


@pytest.mark.integration
def test_a_dataset_in_a_bucket_judged_killed_and_resumed_without_asking_twice(s3_server, tmp_path):
    import boto3

    bucket = s3_server.split("://", 1)[1]
    boto3.client("s3").put_object(Bucket=bucket, Key="data/answers.jsonl", Body="\n".join(dataset_lines()).encode())
    (port,) = free_ports(1)
    log = tmp_path / "requests.log"
    server = start_process(port, log, latency_s=0.02)
    output = f"{s3_server}/judged/answers"
    args = [str(Path(sys.executable).with_name("themis-ray")), "judge", "--config", str(ROOT / "configs/quickstart.yaml"),
            f"input={s3_server}/data/answers.jsonl", f"output={output}", "judge.engine.kind=openai",
            f"judge.engine.base_url=http://127.0.0.1:{port}/v1", "judge.engine.model=teacher",
            "judge.engine.max_concurrency=16", "judge.scenario=open_qa", "judge.columns.instruction=prompt",
            "judge.columns.response=completion", "judge.pool.num_cpus=0", "judge.pool.batch_size=50",
            "judge.sampling.logprobs=0", "judge.sampling.max_tokens=32"]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    store = StageStore.at(output)
    try:
        first = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                 start_new_session=True)
        deadline = time.time() + 300
        while len(store.written_files()) < 5 and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert first.poll() is None, "the first run ended before it could be killed"
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
        time.sleep(2)
        assert 0 < sum(Counter(log.read_text().split()).values()) < N
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
        assert second.returncode == 0, second.stderr[-3000:]
        # The stages' runner: it kept the interrupted run's parts and said so.
        assert "judge: resuming an interrupted run" in second.stdout, second.stdout[-3000:]
    finally:
        server.kill()
    manifest = store.manifest()
    assert manifest["rows_in"] == N == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["rows_rejected"] == len(BROKEN) and manifest["parse_rate"] == 1.0
    paid = Counter(log.read_text().split())
    assert len(paid) == N - len(BROKEN)  # every judgeable row asked, the broken ones never
    twice = sum(n - 1 for n in paid.values())
    # Answers that arrived before the kill are in the request cache (in the output's _cache/): only the
    # requests in flight at the kill (judge.engine.max_concurrency, one actor) may be paid twice.
    assert twice <= 16, f"{twice} rows asked twice: more than the requests in flight at the kill"
    # Read back with pyarrow alone, from the parts the manifest lists.
    filesystem, _ = fs.resolve(output)
    judged = pa.concat_tables([pq.read_table(fs.resolve(fs.join(output, f))[1], filesystem=filesystem)
                               for f in manifest["files"]])
    assert judged.num_rows == N - len(BROKEN) and set(judged["score"].to_pylist()) == {4.0}
    assert set(judged["input.prompt"].to_pylist()) == set(judged["instruction"].to_pylist())
    assert sorted(set(judged["rating"].to_pylist())) == [0, 1, 2, 3, 4]  # the input's own columns, typed
    rejects = {r["_row"]: r[REJECT] for r in store.read_rejects().to_pylist()}
    assert sorted(rejects) == sorted(k + 1 for k in BROKEN)
    assert rejects[8].endswith("answers.jsonl:8: invalid JSON: Expecting value")
    assert rejects[71].endswith(":71: expected a JSON object, got list")
    assert rejects[701].endswith(":701: column 'completion' (response) is empty")
    assert "unknown scenario 'poetry'" in rejects[1401] and rejects[2000].endswith("(instruction) is missing")
    assert fs.exists(fs.join(output, "score_histogram.png"))


# ------------------------------------------------------------------------- the embedded model (hf)


@pytest.mark.integration
def test_the_embedded_model_judges_a_handful_of_rows_through_the_hf_engine(tmp_path):
    import ray

    data = tmp_path / "answers.parquet"
    # Three answers graded against a gold one, and a pair (no single answer, two to compare).
    pq.write_table(pa.table({"question": ["What is 2 + 2?", "Name a prime number.", "What colour is the sky?",
                                          "Which number is prime?"],
                             "answer": ["4", "7 is prime.", "Blue on a clear day.", None],
                             "gold": ["4", "7", "blue", None],
                             "first": [None, None, None, "7"], "second": [None, None, None, "8"]}), data)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = load(ROOT / "configs" / "quickstart.yaml", [
        f"input={data}", f"output={tmp_path / 'out'}", "judge.scenario=close_qa", "judge.prefill_score=true",
        "judge.columns.instruction=question", "judge.columns.response=answer", "judge.columns.reference=gold",
        "judge.columns.response_a=first", "judge.columns.response_b=second",
        "judge.sampling.max_tokens=24", "judge.pool.batch_size=4"])
    from themis_ray.judge_job import judge_dataset

    try:
        manifest = judge_dataset(cfg)
    finally:
        ray.shutdown()
    assert manifest["rows_in"] == 4 == manifest["rows_out"] + manifest["rows_rejected"]
    assert manifest["judge"] == "hf:smollm2-135m-instruct"
    store = StageStore.at(str(tmp_path / "out"))
    judged = store.read().to_pylist()
    for row in judged:
        if row["mode"] == "pairwise":
            continue
        assert row["mode"] == "reference" and row["evaluation"].startswith("[[")  # graded against the gold answer
        assert 1 <= row["score"] <= 5 and abs(sum(row["score_distribution"]) - 1) < 1e-6
        assert row["prompt_tokens"] > 0 and row["judge"] == "hf:smollm2-135m-instruct"
    # The pair, judged or not, was asked in both orders with the answer opened at its verdict.
    rejects = store.read_rejects()
    (pair,) = [r for r in judged + (rejects.to_pylist() if rejects.num_rows else []) if r["mode"] == "pairwise"]
    assert pair["evaluation"].startswith("[[") and pair["evaluation_swapped"].startswith("[[")


@pytest.mark.parametrize("output", ["data", "data/answers.jsonl", "data/judged", "."])
def test_an_output_that_holds_or_lies_in_the_input_is_refused_and_the_input_survives(tmp_path, monkeypatch, output):
    from themis_ray.judge_job import judge_dataset

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    answers = tmp_path / "data" / "answers.jsonl"
    answers.write_text("\n".join(dataset_lines()[:3]) + "\n")
    before = answers.read_bytes()
    for given in ("data/answers.jsonl", "data"):
        cfg = load(ROOT / "configs/quickstart.yaml", [f"input={given}", f"output={output}",
                                                       "judge.columns.instruction=prompt"])
        if given == "data/answers.jsonl" and output == "data/judged":
            continue  # a folder beside the input file: allowed (see below)
        with pytest.raises(ValueError, match=f"output {output} (contains the input|is inside the input folder)"):
            judge_dataset(cfg)
    assert answers.read_bytes() == before and sorted(p.name for p in (tmp_path / "data").iterdir()) == ["answers.jsonl"]


def test_a_non_empty_output_folder_that_is_no_stage_is_refused_before_anything_runs(tmp_path):
    from themis_ray.judge_job import judge_dataset

    (tmp_path / "answers.jsonl").write_text("\n".join(dataset_lines()[:3]) + "\n")
    reports = tmp_path / "reports"
    reports.mkdir()
    (reports / "q3.csv").write_text("keep me")
    cfg = load(ROOT / "configs/quickstart.yaml", [f"input={tmp_path / 'answers.jsonl'}", f"output={reports}"])
    with pytest.raises(FileExistsError, match=f"{reports} is not empty .* not a themis-ray stage folder"):
        judge_dataset(cfg)
    assert (reports / "q3.csv").read_text() == "keep me" and [p.name for p in reports.iterdir()] == ["q3.csv"]
