"""Responses: several responders (models, temperatures, system prompts) answer every instruction."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa

from themis_ray.schema import REJECT, stable_id
from themis_ray.stages import GenerationProcessor, engine_label, map_rows
from themis_ray.store import PARTIAL, StageResult


class Responder(GenerationProcessor):
    stage = "respond"
    resume_key = ("id", "instruction_id")  # per responder: each has its own checkpoint

    def __init__(self, output_schema, responder, with_engine: bool = True):
        super().__init__(output_schema, responder.engine, with_engine)
        self.responder = responder
        self.sampling = responder.sampling

    def conversations(self, rows: list[dict]) -> list:
        system = [{"role": "system", "content": self.responder.system_prompt}] if self.responder.system_prompt else []
        return [system + [{"role": "user", "content": r["instruction"]}] for r in rows]

    def parse(self, rows: list[dict], completions: list) -> list[dict]:
        out = []
        for row, done in zip(rows, completions):
            base = {**row, "id": stable_id(row["id"], self.responder.name), "instruction_id": row["id"],
                    "responder": self.responder.name}
            if done.error or not done.text.strip():
                out.append({**base, REJECT: f"engine error: {done.error}" if done.error else "empty response"})
            else:
                out.append({**base, "response": done.text.strip(), REJECT: None})
        return out


def run(cfg, inputs: dict, staging) -> StageResult:
    names = [r.name for r in cfg.respond.responders]
    if len(set(names)) != len(names):
        raise ValueError(f"respond.responders: names must be unique, got {names}")
    source: pa.Table = inputs["classify"]
    # One pool per responder, one after another, so pools never compete for the same CPUs.
    parts = [map_rows(source, Responder, cfg.respond.pool, checkpoint=Path(staging) / PARTIAL / r.name, responder=r)
             for r in cfg.respond.responders]
    return StageResult(pa.concat_tables(parts), rows_in=source.num_rows * len(names),
                       extra={"responders": {r.name: engine_label(r.engine) for r in cfg.respond.responders}})
