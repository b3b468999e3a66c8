"""The job entrypoints in jobs/: submitted to a real local Ray cluster with the job SDK, end to end."""

from __future__ import annotations

import importlib.util
import json
import runpy
import shlex
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from themis_ray.pipeline import STAGES
from themis_ray.store import MANIFEST

ROOT = Path(__file__).resolve().parents[1]
JOBS = ROOT / "jobs"


def load_job_module():
    spec = importlib.util.spec_from_file_location("themis_jobs_common", JOBS / "_job.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_one_entrypoint_per_stage_and_one_for_the_pipeline_each_running_its_own_command(monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(JOBS))  # as `python jobs/<name>.py` finds `_job`
    for name in [*STAGES, "pipeline"]:
        path = JOBS / f"{name}.py"
        assert path.is_file(), f"missing job entrypoint {path}"
        monkeypatch.setattr(sys, "argv", [str(path), "--help"])
        with pytest.raises(SystemExit) as exit_:
            runpy.run_path(str(path), run_name="__main__")
        assert exit_.value.code == 0, path
        out = capsys.readouterr().out
        assert f"themis-ray {name} job on" in out  # the job driver's banner, then the command's own help
        assert f"usage: themis-ray {name} " in out, path


def test_export_option_is_taken_out_of_the_cli_arguments():
    job = load_job_module()
    argv = ["--config", "configs/quickstart.yaml", "--export", "s3://bucket/run", "run_dir=/x", "--force"]
    export, rest = job._split_export(argv)
    assert export == "s3://bucket/run"
    assert rest == ["--config", "configs/quickstart.yaml", "run_dir=/x", "--force"]
    assert job._config(rest).run_dir == "/x"


def test_export_copies_finished_stages_through_pyarrow_filesystems(tmp_path):
    job = load_job_module()
    stage = tmp_path / "run" / "label"
    (stage / "_rejects").mkdir(parents=True)
    pq.write_table(pa.table({"a": [1, 2]}), stage / "part-00000.parquet")
    pq.write_table(pa.table({"a": [3]}), stage / "_rejects" / "part-00000.parquet")
    (stage / MANIFEST).write_text(json.dumps({"stage": "label"}))
    destination = tmp_path / "bucket"
    (destination / "label").mkdir(parents=True)
    (destination / "label" / "stale.parquet").write_text("from an older run")
    (destination / "label" / MANIFEST).write_text(json.dumps({"stage": "label"}))

    copied = job.export_run(str(tmp_path / "run"), ["label"], f"file://{destination}")

    assert copied == [f"file://{destination}/label"]
    assert sorted(p.relative_to(destination).as_posix() for p in destination.rglob("*") if p.is_file()) == [
        "label/_manifest.json", "label/_rejects/part-00000.parquet", "label/part-00000.parquet"]
    assert pq.read_table(destination / "label" / "part-00000.parquet")["a"].to_pylist() == [1, 2]
    with pytest.raises(FileNotFoundError, match="no finished output"):
        job.export_run(str(tmp_path / "run"), ["ifd"], str(destination))
    # A folder of the stage's name that no export made is refused, and left as it was.
    (tmp_path / "elsewhere" / "label").mkdir(parents=True)
    (tmp_path / "elsewhere" / "label" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a themis-ray stage folder"):
        job.export_run(str(tmp_path / "run"), ["label"], str(tmp_path / "elsewhere"))
    assert [p.name for p in (tmp_path / "elsewhere" / "label").iterdir()] == ["notes.txt"]


def runtime_env() -> dict:
    """cluster/runtime-env.yaml, the documented runtime env, with this checkout as working_dir."""
    env = yaml.safe_load((ROOT / "cluster" / "runtime-env.yaml").read_text())
    assert env["working_dir"] == "."
    return {**env, "working_dir": str(ROOT)}


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_pipeline_job_runs_on_a_real_cluster(tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from local_ray import LocalRayHead

    job = load_job_module()
    run_dir, export = tmp_path / "run", tmp_path / "export"
    args = ["--config", "configs/quickstart.yaml", f"run_dir={run_dir}", "stages=[synthesize,classify]",
            "corpus.max_docs=1", "synthesize.scenarios_per_doc=1", "synthesize.instructions_per_prompt=1",
            "synthesize.quizzes=1", "synthesize.sampling.max_tokens=48", "--export", f"file://{export}"]
    entrypoint = shlex.join(["python", "jobs/pipeline.py", *args])

    with LocalRayHead(num_cpus=2) as head:
        client = JobSubmissionClient(head.dashboard_url)
        submission_id = client.submit_job(entrypoint=entrypoint, runtime_env=runtime_env(),
                                          entrypoint_num_cpus=job.ENTRYPOINT_NUM_CPUS,
                                          entrypoint_num_gpus=job.ENTRYPOINT_NUM_GPUS)
        # Follow the job's logs as they grow, until it reaches a terminal state.
        printed, deadline = 0, time.monotonic() + 840
        status = client.get_job_status(submission_id)
        while time.monotonic() < deadline:
            status = client.get_job_status(submission_id)
            logs = client.get_job_logs(submission_id)
            sys.stdout.write(logs[printed:])
            printed = len(logs)
            if status.is_terminal():
                break
            time.sleep(2)
        else:
            client.stop_job(submission_id)
        logs = client.get_job_logs(submission_id)
        info = client.get_job_info(submission_id)

    assert status == JobStatus.SUCCEEDED, f"{status}: {info.message}\n{logs[-3000:]}"
    assert "themis-ray pipeline job on" in logs  # the driver found the cluster through RAY_ADDRESS
    assert "RAY_ADDRESS is not set" not in logs

    synthesize = json.loads((run_dir / "synthesize" / MANIFEST).read_text())
    classify = json.loads((run_dir / "classify" / MANIFEST).read_text())
    assert synthesize["rows_out"] > 0
    assert classify["rows_in"] == synthesize["rows_out"]
    assert classify["rows_in"] == classify["units_ok"] + classify["rows_rejected"]
    # the manifest lists the parts the workers wrote, and their footers hold its count
    assert sum(pq.read_metadata(run_dir / "classify" / name).num_rows for name in classify["files"]) == classify["rows_out"]
    assert not (run_dir / "respond").exists()  # only the stages asked for
    for stage in ("synthesize", "classify"):
        assert f"exported file://{export}/{stage}" in logs
        assert json.loads((export / stage / MANIFEST).read_text()) == json.loads((run_dir / stage / MANIFEST).read_text())
