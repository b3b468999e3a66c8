"""A slice of the pipeline with `run_dir` in a bucket: respond -> label -> ifd -> curate, every stage read
from and written to a real S3-compatible server on loopback (moto) through pyarrow's S3 filesystem,
with the teacher and responders behind a real OpenAI-compatible server on 127.0.0.1 and IFD scored by
the embedded model. The outputs are read back with pyarrow alone, from the files the manifests list."""

from __future__ import annotations

import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from openai_server import OpenAIServer  # noqa: E402
from stage_io import finished_stage  # noqa: E402

from themis_ray import fs  # noqa: E402
from themis_ray.config import PipelineConfig  # noqa: E402

pytestmark = pytest.mark.integration

SCENARIOS = ["open_qa", "close_qa", "math_qa"]


def answer(messages) -> str:
    text = messages[-1]["content"]
    if "Grade the response" in text:
        return f"[[{2 + len(text) % 3}]] It answers the question; it could be more precise."
    return "Here is a short answer to the question."


def test_respond_label_ifd_curate_with_run_dir_in_a_bucket(s3_server, tmp_path, monkeypatch):
    import ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    run_dir = f"{s3_server}/runs/slice"
    instructions = pa.Table.from_pylist([
        {"id": f"i{k}", "instruction": f"Question {k}: what does the `{w}` statement do in Python?",
         "scenario": SCENARIOS[k % 3], "reference": None}
        for k, w in enumerate(["with", "for", "while", "yield", "pass", "del"])])
    finished_stage(run_dir, "classify", instructions)
    with OpenAIServer(answer=answer) as server:
        remote = {"kind": "openai", "model": "m", "base_url": server.base_url, "max_concurrency": 4}
        pool = {"num_cpus": 0, "batch_size": 4}
        cfg = OmegaConf.merge(OmegaConf.structured(PipelineConfig), {
            "run_dir": run_dir, "ray": {"num_cpus": 2},
            "respond": {"pool": pool, "responders": [{"name": "a", "engine": remote}, {"name": "b", "engine": remote}]},
            "label": {"engine": remote, "pool": pool, "sampling": {"logprobs": 0}},
            "ifd": {"pool": {"num_cpus": 1, "batch_size": 6}, "engine": {"num_threads": 1}},
            "curate": {"max_ifd_zscore": None, "drop_ifd_above_one": False, "rebalance": False,
                       "validation_fraction": 0.25},
        })
        from themis_ray.pipeline import run_stage

        try:
            manifests = {name: run_stage(cfg, name) for name in ("respond", "label", "ifd", "curate")}
        finally:
            ray.shutdown()

    # Nothing under the stages is local: every part is in the bucket, listed by its manifest.
    assert not Path("runs/slice").exists()
    filesystem, _ = fs.resolve(run_dir)
    for name, manifest in manifests.items():
        stage = fs.join(run_dir, name)
        assert fs.read_json(fs.join(stage, "_manifest.json")) == manifest
        rows = sum(pq.read_metadata(fs.resolve(fs.join(stage, f))[1], filesystem=filesystem).num_rows
                   for f in manifest["files"])
        assert rows == manifest["rows_out"], name
        assert manifest["rows_in"] == manifest["units_ok"] + manifest["rows_rejected"], name
    assert manifests["respond"]["rows_out"] == 12 and manifests["label"]["rows_out"] == 12
    assert manifests["ifd"]["rows_in"] == 12 and manifests["curate"]["rows_in"] == manifests["ifd"]["rows_out"]
    curated = pa.concat_tables([pq.read_table(fs.resolve(fs.join(run_dir, "curate", f))[1], filesystem=filesystem)
                                for f in manifests["curate"]["files"]])
    assert set(curated["split"].to_pylist()) == {"train", "validation"}
    assert all(x > 0 for x in curated["ifd"].to_pylist())
    assert fs.exists(fs.join(run_dir, "curate", "report.md"))


def test_the_jobs_runtime_env_carries_no_credentials_and_workers_still_reach_the_bucket(s3_server, monkeypatch):
    import ray

    from themis_ray.pipeline import init_ray

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert not ray.is_initialized()
    init_ray(OmegaConf.merge(OmegaConf.structured(PipelineConfig), {"ray": {"num_cpus": 1}}))
    try:
        # Ray's job table and dashboard show a runtime env to anyone who can list jobs.
        env_vars = (ray.get_runtime_context().runtime_env or {}).get("env_vars") or {}
        assert not [k for k in env_vars if k.startswith("AWS_")], env_vars
        target = f"{s3_server}/credentials-check/hello.txt"

        @ray.remote(num_cpus=0)
        def write() -> str:  # a local Ray's worker inherits the driver's environment, credentials too
            fs.write_text(target, "hello")
            return fs.read_text(target)

        assert ray.get(write.remote()) == "hello" and fs.read_text(target) == "hello"
    finally:
        ray.shutdown()
