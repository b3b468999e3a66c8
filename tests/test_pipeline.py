"""End to end: the whole pipeline on a tiny config, the exported judge, the server, and a re-run."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf

from themis_ray.config import load
from themis_ray.pipeline import STAGES, run_pipeline
from themis_ray.stages.registry import selected
from themis_ray.store import StageStore

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


def tiny_config(run_dir: Path):
    cfg = load(ROOT / "configs" / "quickstart.yaml", [
        f"run_dir={run_dir}",
        "corpus.max_docs=2",
        "synthesize.scenarios_per_doc=1",
        "synthesize.instructions_per_prompt=2",
        "synthesize.quizzes=2",
        "synthesize.sampling.max_tokens=80",
        "label.sampling.max_tokens=24",
        # Keep every labelled record: the point here is the plumbing, not the data's quality.
        "curate.rebalance=false",
        "curate.drop_ifd_above_one=false",
        "curate.max_ifd_zscore=null",
        "curate.validation_fraction=0.3",
        "train.global_batch_size=2",
        "evaluate.sampling.max_tokens=16",
    ])
    for responder in cfg.respond.responders:
        responder.sampling.max_tokens = 32
    return cfg


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    cfg = tiny_config(tmp_path_factory.mktemp("run"))
    manifests = run_pipeline(cfg)
    yield cfg, manifests
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def test_every_stage_ran_and_kept_every_row(finished_run):
    cfg, manifests = finished_run
    # Every stage in order; prefer, off in this config, only when prefer.enabled.
    assert list(manifests) == [s for s in STAGES if s != "prefer"] == selected(cfg)
    for name, manifest in manifests.items():
        stage_dir = Path(cfg.run_dir) / name
        written = sum(pq.read_metadata(p).num_rows for p in stage_dir.glob("*.parquet"))
        rejected = sum(pq.read_metadata(p).num_rows for p in (stage_dir / "_rejects").glob("*.parquet"))
        assert written == manifest["rows_out"], name
        assert rejected == manifest["rows_rejected"], name
        assert manifest["rows_in"] == manifest["units_ok"] + manifest["rows_rejected"], name
        assert manifest["rows_in"] > 0, name
    # Row counts chain: each stage consumed what the one before it produced.
    assert manifests["classify"]["rows_in"] == manifests["synthesize"]["rows_out"]
    n_responders = len(cfg.respond.responders)
    assert manifests["respond"]["rows_in"] == manifests["classify"]["rows_out"] * n_responders
    assert manifests["label"]["rows_in"] == manifests["respond"]["rows_out"]
    assert manifests["ifd"]["rows_in"] == manifests["label"]["rows_out"]


def test_labels_follow_the_evaluation_format(finished_run):
    cfg, _ = finished_run
    labels = StageStore(cfg.run_dir, "ifd").read().to_pylist()
    assert labels
    for row in labels:
        assert row["evaluation"].startswith(f"[[{int(row['score'])}]]")
        assert abs(sum(row["score_distribution"]) - 1) < 1e-6
        assert row["ifd"] > 0 and row["answer_tokens"] > 0
        assert "[Response start]" in row["prompt"] and row["response"] in row["prompt"]


def test_the_exported_judge_is_the_trained_model_not_a_copy_of_the_base(finished_run):
    import torch
    from transformers import AutoModelForCausalLM

    from themis_ray.assets import resolve_model

    cfg, manifests = finished_run
    assert manifests["train"]["train"]["steps"] >= 1
    trained = AutoModelForCausalLM.from_pretrained(Path(cfg.run_dir) / "train" / "judge").state_dict()
    base = AutoModelForCausalLM.from_pretrained(resolve_model(cfg.train.model)).state_dict()
    assert trained.keys() == base.keys()  # the same architecture, every weight exported
    # Compared in the exported dtype, so a cast alone does not count as a change.
    changed = [name for name, weight in trained.items() if not torch.equal(weight, base[name].to(weight.dtype))]
    assert changed, "the exported judge's weights equal the base model's: training's updates were not exported"


def test_metrics_compare_trained_and_base(finished_run):
    cfg, manifests = finished_run
    metrics = json.loads((Path(cfg.run_dir) / "evaluate" / "metrics.json").read_text())
    assert set(metrics) == {"trained", "base"}
    for judge in metrics.values():
        overall = judge["overall"]
        assert overall["n"] == manifests["curate"]["splits"]["validation"]
        assert 0 <= overall["parse_rate"] <= 1
        for key in ("mae", "agreement", "accuracy"):
            assert key in overall
        # The same records judged again with an injection appended: the shift is reported per judge.
        injection = judge["benchmarks"]["injection"]
        assert injection["kind"] == "injection" and injection["overall"]["n"] == overall["n"]
    assert set(manifests["evaluate"]["injection_shift"]) == {"trained", "base"}


_SERVED: dict[str, str] = {}


def served_judge(cfg) -> str:
    """The run's judge on Ray Serve at 127.0.0.1 (started once per module); its base URL."""
    from themis_ray.serve import run_server

    if "url" not in _SERVED:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        serve_cfg = OmegaConf.merge(cfg.serve, {"port": port, "max_tokens": 16, "replica_num_cpus": 0.5})
        _SERVED["url"] = run_server(serve_cfg, str(Path(cfg.run_dir) / "train" / "judge"), blocking=False)
    return _SERVED["url"]


def test_server_answers_judge_and_openai_client(finished_run):
    from openai import OpenAI

    cfg, _ = finished_run
    url = served_judge(cfg)
    answer = httpx.post(f"{url}/v1/judge", json={
        "instruction": "What is 2+2?", "response": "4", "scenario": "math_qa"}, timeout=120)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["scenario"] == "math_qa"
    assert (body["score"] is None) == (body.get("error") is not None)
    client = OpenAI(base_url=f"{url}/v1", api_key="unused")
    model_id = client.models.list().data[0].id
    chat = client.chat.completions.create(model=model_id, messages=[{"role": "user", "content": "Say hi."}],
                                          max_tokens=8, temperature=0)
    assert isinstance(chat.choices[0].message.content, str)


def test_label_stage_through_our_server_as_an_openai_teacher(finished_run):
    """The teacher can be any OpenAI-compatible endpoint: here, this project's own Serve app."""
    import ray

    from themis_ray.executor import Step, StepEngine, map_processor
    from themis_ray.schema import output_schema
    from themis_ray.stages.label import Labeler

    cfg, _ = finished_run
    url = served_judge(cfg)
    responses = StageStore(cfg.run_dir, "respond").read().slice(0, 3)
    engine = OmegaConf.merge(cfg.label.engine, {"kind": "openai", "base_url": f"{url}/v1", "model": "judge",
                                                 "max_concurrency": 4, "timeout_s": 120})
    pool = OmegaConf.merge(cfg.label.pool, {"num_cpus": 0})  # I/O-bound: it must not hold a CPU
    step = Step(name="label", processor=Labeler, pool=pool, engine=StepEngine(engine, "label.engine"),
                args={"engine_cfg": engine, "sampling": cfg.label.sampling, "score_by": "text", "calibrate": False,
                      "prefill": True, "max_attempts": 2, "retry_temperature": 0.7, "scenarios_dir": None})
    rows = map_processor(ray.data.from_arrow(responses), step, output_schema("label", responses.schema)).take_all()
    assert len(rows) == 3
    for row in rows:
        assert row["teacher"] == "openai:judge"
        assert row["evaluation"].startswith("[[")  # the prefill was continued by the server
        if row["reject_reason"] is None:
            assert row["score"] is not None and row["prompt_tokens"] > 0
        else:
            assert row["reject_reason"].startswith(("unparsable evaluation", "engine error"))


def test_rerun_skips_finished_stages(finished_run, capsys):
    cfg, manifests = finished_run
    again = run_pipeline(cfg)
    # Nothing was re-run or rewritten: the same manifests, finished at the same times.
    assert {n: (m["digest"], m["finished_at"]) for n, m in again.items()} == {
        n: (m["digest"], m["finished_at"]) for n, m in manifests.items()}
    assert capsys.readouterr().out.count("skipped: up to date") == len(manifests)


def test_retraining_the_classifier_reruns_classify(tmp_path):
    import sys

    import pyarrow as pa

    sys.path.insert(0, str(Path(__file__).parent))
    from stage_io import finished_stage

    from themis_ray.pipeline import fingerprint

    finished_stage(tmp_path, "synthesize", pa.table({"id": ["a"], "instruction": ["Say hi."], "scenario": ["open_qa"]}))
    classifier = tmp_path / "classifier"
    classifier.mkdir()
    (classifier / "config.json").write_text('{"labels": 10}')
    (classifier / "model.safetensors").write_bytes(b"weights v1")
    trained = load(ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}", "classify.method=trained"])
    before = fingerprint(trained, STAGES["classify"])
    assert before == fingerprint(trained, STAGES["classify"])  # stable while nothing changes
    (classifier / "model.safetensors").write_bytes(b"weights v2")  # train-classifier ran again
    assert fingerprint(trained, STAGES["classify"]) != before
    # Routing zero-shot, the folder is not read, so it does not count.
    zero_shot = load(ROOT / "configs" / "quickstart.yaml", [f"run_dir={tmp_path}"])
    first = fingerprint(zero_shot, STAGES["classify"])
    (classifier / "model.safetensors").write_bytes(b"weights v3")
    assert fingerprint(zero_shot, STAGES["classify"]) == first
