"""Scenario classification: the model picks each instruction's scenario by log-probability."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import prompts
from themis_ray.classifier import classify
from themis_ray.engines import build_engine
from themis_ray.schema import REJECT
from themis_ray.stages import RowProcessor, engine_label, map_rows
from themis_ray.store import PARTIAL, StageResult


class Classifier(RowProcessor):
    stage = "classify"
    resume_key = ("id", "id")

    def __init__(self, output_schema, engine_cfg, route_by, scenarios_dir):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.route_by = route_by
        self.scenarios_dir = scenarios_dir

    def process(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            try:
                [(predicted, confidence)] = classify(self.engine, [row["instruction"]], self.scenarios_dir)
            except ValueError as err:
                out.append({**row, REJECT: f"classifier failed: {err}"})
                continue
            routed = predicted if self.route_by == "classifier" else row["scenario"]
            out.append({**row, "synthesis_scenario": row["scenario"], "predicted_scenario": predicted,
                        "scenario_confidence": confidence, "scenario": routed, REJECT: None})
        return out


def run(cfg, inputs: dict, staging) -> StageResult:
    if cfg.classify.route_by not in ("synthesis", "classifier"):
        raise ValueError(f"classify.route_by must be 'synthesis' or 'classifier', got {cfg.classify.route_by!r}")
    source: pa.Table = inputs["synthesize"]
    table = map_rows(source, Classifier, cfg.classify.pool, checkpoint=Path(staging) / PARTIAL,
                     engine_cfg=cfg.classify.engine,
                     route_by=cfg.classify.route_by, scenarios_dir=cfg.scenarios_dir)
    ok = table.filter(pc.is_null(table[REJECT]))
    agree = pc.sum(pc.equal(ok["synthesis_scenario"], ok["predicted_scenario"])).as_py() or 0
    return StageResult(table, rows_in=source.num_rows, extra={
        "engine": engine_label(cfg.classify.engine),
        "agreement_with_synthesis": round(agree / ok.num_rows, 4) if ok.num_rows else None,
        "templates": {"classify": prompts.template_digest("classify")},
    })
