"""Responses: several responders (models, temperatures, system prompts) answer every instruction."""

from __future__ import annotations

from themis_ray.engines import engine_label
from themis_ray.executor import StageContext, run_rows
from themis_ray.responders import responder_step
from themis_ray.schema import output_schema
from themis_ray.store import StageResult


def run(ctx: StageContext) -> StageResult:
    c = ctx.cfg.respond
    names = [r.name for r in c.responders]
    if len(set(names)) != len(names):
        raise ValueError(f"respond.responders: names must be unique, got {names}")
    source = ctx.input("classify")
    schema = output_schema("respond", source.schema())
    instructions = source.num_rows()
    # One plan per responder, one after another, so their pools never compete for the same CPUs.
    for responder in c.responders:
        run_rows(source.dataset(), responder_step(responder, c.pool), ctx.store, schema, resume=ctx.resume,
                 total=instructions)
    return StageResult(rows_in=instructions * len(names),
                       extra={"responders": {r.name: engine_label(r.engine) for r in c.responders}})
