"""Instruction-following difficulty: IFD(Q, A) = mean CE(A | Q) / mean CE(A), answer tokens only.

Q is the rendered evaluation prompt in its chat template, A the teacher's evaluation. Both passes score
exactly the same answer tokens: the unconditioned pass starts from a single begin token so that A's
first token is scored in both.
"""

from __future__ import annotations

import math

import pyarrow as pa

from themis_ray import judging
from themis_ray.engines import build_engine
from themis_ray.schema import REJECT
from themis_ray.stages import RowProcessor, engine_label, map_rows
from themis_ray.store import StageResult


def ifd_from_logprobs(conditioned: list[float], unconditioned: list[float]) -> dict:
    """The IFD columns of one record from the answer's token log-probabilities in both passes."""
    if len(conditioned) != len(unconditioned):
        raise ValueError(f"passes scored {len(conditioned)} vs {len(unconditioned)} answer tokens")
    ce_q = -sum(conditioned) / len(conditioned)
    ce_a = -sum(unconditioned) / len(unconditioned)
    return {"ce_conditioned": ce_q, "ce_answer": ce_a, "ifd": ce_q / ce_a if ce_a > 0 else math.inf,
            "ifd_ppl": math.exp(ce_q - ce_a), "answer_tokens": len(conditioned)}


class IFDScorer(RowProcessor):
    stage = "ifd"

    def __init__(self, output_schema, engine_cfg):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)

    def process(self, rows: list[dict]) -> list[dict]:
        answers = [r["evaluation"] for r in rows]
        conditioned = self.engine.token_logprobs([judging.build_messages(r["prompt"]) for r in rows], answers)
        alone = self.engine.token_logprobs([None] * len(rows), answers)
        out = []
        for row, c, a in zip(rows, conditioned, alone):
            if c.error or a.error:
                out.append({**row, REJECT: f"cannot score: {c.error or a.error}"})
            else:
                out.append({**row, **ifd_from_logprobs(c.logprobs, a.logprobs), REJECT: None})
        return out


def run(cfg, inputs: dict, staging) -> StageResult:
    source: pa.Table = inputs["label"]
    table = map_rows(source, IFDScorer, cfg.ifd.pool, engine_cfg=cfg.ifd.engine)
    return StageResult(table, rows_in=source.num_rows, extra={"engine": engine_label(cfg.ifd.engine)})
