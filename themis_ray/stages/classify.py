"""Scenario classification: each instruction's scenario, picked zero-shot by the model's
log-probabilities (`classify.method: zero_shot`) or by a classifier that `themis-ray train-classifier`
fine-tuned (`trained`)."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import fs, prompts
from themis_ray.classifier import ScenarioPredictor, predictor_engine
from themis_ray.engines import engine_label
from themis_ray.executor import RowProcessor, StageContext, Step, run_rows
from themis_ray.schema import REJECT, output_schema
from themis_ray.store import StageResult


class Classifier(RowProcessor):
    stage = "classify"
    resume_key = ("id", "id")

    def __init__(self, output_schema, engine_cfg, route_by, scenarios_dir, model_dir=None):
        super().__init__(output_schema)
        self.predictor = ScenarioPredictor(engine_cfg, scenarios_dir, model_dir)
        self.route_by = route_by

    def process(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            try:
                predicted, confidence = self.predictor.predict(row["instruction"])
            except ValueError as err:
                out.append({**row, REJECT: f"classifier failed: {err}"})
                continue
            routed = predicted if self.route_by == "classifier" else row["scenario"]
            out.append({**row, "synthesis_scenario": row["scenario"], "predicted_scenario": predicted,
                        "scenario_confidence": confidence, "scenario": routed, REJECT: None})
        return out


def agreement_stats(table: pa.Table, rejected: bool) -> dict:
    """Per part: how many accepted rows the classifier routed where synthesis meant them to go."""
    if rejected:
        return {}
    return {"agree": pc.sum(pc.equal(table["synthesis_scenario"], table["predicted_scenario"])).as_py() or 0}


def run(ctx: StageContext) -> StageResult:
    cfg = ctx.cfg
    model_dir = None
    if cfg.classify.method == "trained":
        folder = cfg.classify.model or fs.join(cfg.run_dir, "classifier")
        if not fs.exists(fs.join(folder, "config.json")):
            raise FileNotFoundError(f"classify.method=trained: no classifier in {folder}; "
                                    "run `themis-ray train-classifier` or set classify.model")
        model_dir = fs.local_dir(folder)
    source = ctx.input("synthesize")
    rows_in = source.num_rows()
    step = Step(name="classify", processor=Classifier, pool=cfg.classify.pool, stats=agreement_stats,
                args={"engine_cfg": cfg.classify.engine, "model_dir": model_dir, "route_by": cfg.classify.route_by,
                      "scenarios_dir": cfg.scenarios_dir},
                engine=predictor_engine(cfg.classify, "classify.engine"))
    run_rows(source.dataset(), step, ctx.store, output_schema("classify", source.schema()), resume=ctx.resume,
             total=rows_in)
    written = ctx.store.tally()
    return StageResult(rows_in=rows_in, extra={
        "engine": engine_label(cfg.classify.engine) if model_dir is None else f"trained:{model_dir}",
        "method": cfg.classify.method,
        "agreement_with_synthesis": round(written.stats.get("agree", 0) / written.rows_out, 4)
        if written.rows_out else None,
        "templates": {"classify": prompts.template_digest("classify")},
    })
