"""Meta-evaluation of judges on the validation split, against the teacher's scores.

Each judge (this run's trained judge, its base model, or any model folder) grades every validation
record with the same prompt the teacher saw; MAE, Agr(2,2), accuracy and parse rate per judge and
per scenario go to `metrics.json`, with a confusion matrix and score histograms per judge.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
from omegaconf import OmegaConf

from themis_ray import judging
from themis_ray.engines import build_engine
from themis_ray.evaluate.metrics import pointwise_metrics
from themis_ray.evaluate.report import format_table, write_plots
from themis_ray.schema import REJECT
from themis_ray.stages import RowProcessor, map_rows
from themis_ray.store import StageResult

HEADLINE = ["judge", "n", "parse_rate", "mae", "agreement", "accuracy", "pearson"]  # agreement is Agr(2,2)


class JudgeGrader(RowProcessor):
    stage = "evaluate"

    def __init__(self, output_schema, judge, engine_cfg, sampling, prefill):
        super().__init__(output_schema)
        self.judge = judge
        self.engine = build_engine(engine_cfg)
        self.sampling, self.prefill = sampling, prefill

    def process(self, rows: list[dict]) -> list[dict]:
        messages = [judging.build_messages(r["prompt"], self.prefill) for r in rows]
        out = []
        for row, done in zip(rows, self.engine.generate(messages, self.sampling)):
            text = judging.full_text(done.text, self.prefill)
            parsed = judging.parse_evaluation(text)
            dist = judging.score_distribution(done.tokens, done.top_logprobs, prefill=self.prefill)
            out.append({**row, "judge": self.judge, "judge_output": text, "predicted_score": parsed.score,
                        "predicted_expected": judging.expected_score(dist), REJECT: None})
        return out


def _json_safe(value):
    """NaN (an undefined metric, e.g. a correlation of constant scores) -> None: JSON has no NaN."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def judge_models(cfg, run_dir: Path) -> dict[str, str]:
    names = {"trained": str(run_dir / "train" / "judge"), "base": cfg.train.model}
    return {j: names.get(j, j) for j in cfg.evaluate.judges}


def run(cfg, inputs: dict, staging) -> StageResult:
    curated: pa.Table = inputs["curate"]
    validation = curated.filter(pc.equal(curated["split"], "validation"))
    staging = Path(staging)
    parts, metrics = [], {}
    for judge, model in judge_models(cfg, Path(cfg.run_dir).expanduser().resolve()).items():
        engine_cfg = OmegaConf.merge(cfg.evaluate.engine, {"model": model})
        table = map_rows(validation, JudgeGrader, cfg.evaluate.pool, judge=judge, engine_cfg=engine_cfg,
                         sampling=cfg.evaluate.sampling, prefill=cfg.evaluate.prefill_score)
        pred, gold = table["predicted_score"].to_pylist(), table["score"].to_pylist()
        metrics[judge] = {"overall": _json_safe(pointwise_metrics(pred, gold)), "by_scenario": {}}
        for scenario in sorted(set(table["scenario"].to_pylist())):
            mask = [s == scenario for s in table["scenario"].to_pylist()]
            metrics[judge]["by_scenario"][scenario] = _json_safe(pointwise_metrics(
                [p for p, m in zip(pred, mask) if m], [g for g, m in zip(gold, mask) if m]))
        if pred:
            write_plots(staging, pred, gold, name=judge)
        parts.append(table)
    (staging / "metrics.json").write_text(json.dumps(metrics, indent=2))
    rows = [{"judge": j, **m["overall"]} for j, m in metrics.items()]
    print(format_table(rows, [c for c in HEADLINE if c == "judge" or c in rows[0]]) if rows else "no judges")
    table = pa.concat_tables(parts) if parts else None
    return StageResult(table, rows_in=validation.num_rows * len(parts),
                       extra={"metrics": {j: m["overall"] for j, m in metrics.items()}})
