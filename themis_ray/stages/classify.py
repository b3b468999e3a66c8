"""Scenario classification: each instruction's scenario, picked zero-shot by the model's
log-probabilities (`classify.method: zero_shot`) or by a classifier that `themis-ray train-classifier`
fine-tuned (`trained`)."""

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

    def __init__(self, output_schema, engine_cfg, route_by, scenarios_dir, model_dir=None):
        super().__init__(output_schema)
        if model_dir:
            from themis_ray.scenario_model import ScenarioModel

            self.trained, self.engine = ScenarioModel(model_dir, scenarios_dir, num_threads=engine_cfg.num_threads), None
        else:
            self.trained, self.engine = None, build_engine(engine_cfg)
        self.route_by = route_by
        self.scenarios_dir = scenarios_dir

    def _predict(self, instruction: str) -> tuple[str, float]:
        if self.trained is not None:
            return self.trained.predict([instruction])[0]
        return classify(self.engine, [instruction], self.scenarios_dir)[0]

    def process(self, rows: list[dict]) -> list[dict]:
        out = []
        for row in rows:
            try:
                predicted, confidence = self._predict(row["instruction"])
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
    if cfg.classify.method not in ("zero_shot", "trained"):
        raise ValueError(f"classify.method must be 'zero_shot' or 'trained', got {cfg.classify.method!r}")
    model_dir = None
    if cfg.classify.method == "trained":
        model_dir = str(Path(cfg.classify.model or Path(cfg.run_dir) / "classifier").expanduser().resolve())
        if not (Path(model_dir) / "config.json").is_file():
            raise FileNotFoundError(f"classify.method=trained: no classifier in {model_dir}; "
                                    "run `themis-ray train-classifier` or set classify.model")
    source: pa.Table = inputs["synthesize"]
    table = map_rows(source, Classifier, cfg.classify.pool, checkpoint=Path(staging) / PARTIAL,
                     engine_cfg=cfg.classify.engine, model_dir=model_dir,
                     route_by=cfg.classify.route_by, scenarios_dir=cfg.scenarios_dir)
    ok = table.filter(pc.is_null(table[REJECT]))
    agree = pc.sum(pc.equal(ok["synthesis_scenario"], ok["predicted_scenario"])).as_py() or 0
    return StageResult(table, rows_in=source.num_rows, extra={
        "engine": engine_label(cfg.classify.engine) if model_dir is None else f"trained:{model_dir}",
        "method": cfg.classify.method,
        "agreement_with_synthesis": round(agree / ok.num_rows, 4) if ok.num_rows else None,
        "templates": {"classify": prompts.template_digest("classify")},
    })
