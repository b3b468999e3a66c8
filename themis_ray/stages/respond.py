"""Responses: several responders (models, temperatures, system prompts) answer every instruction."""

from __future__ import annotations

import re

from themis_ray.engines import engine_label
from themis_ray.executor import GenerationProcessor, StageContext, run_rows
from themis_ray.schema import REJECT, output_schema, stable_id
from themis_ray.store import StageResult


class Responder(GenerationProcessor):
    stage = "respond"
    resume_key = ("id", "instruction_id")  # per responder: the run narrows the written rows to its own

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


def run(ctx: StageContext) -> StageResult:
    c = ctx.cfg.respond
    names = [r.name for r in c.responders]
    if len(set(names)) != len(names):
        raise ValueError(f"respond.responders: names must be unique, got {names}")
    source = ctx.input("classify")
    schema = output_schema("respond", source.schema())
    # One plan per responder, one after another, so their pools never compete for the same CPUs.
    for responder in c.responders:
        tag = re.sub(r"[^A-Za-z0-9_.-]", "_", responder.name) + "-"
        run_rows(source.dataset(), Responder, c.pool, ctx.store, schema, resume=ctx.resume, tag=tag,
                 where={"responder": responder.name}, responder=responder)
    return StageResult(rows_in=source.num_rows() * len(names),
                       extra={"responders": {r.name: engine_label(r.engine) for r in c.responders}})
