"""Responses: several responders (models, temperatures, system prompts) answer every instruction."""

from __future__ import annotations

from themis_ray.engines import engine_label
from themis_ray.engines.cache import cache_folder
from themis_ray.executor import StageContext
from themis_ray.responders import answer
from themis_ray.schema import output_schema
from themis_ray.store import StageResult


def run(ctx: StageContext) -> StageResult:
    c = ctx.cfg.respond
    source = ctx.input("classify")
    rows_in = answer(c.responders, source.dataset(), c.pool, ctx.store, output_schema("respond", source.schema()),
                     ctx.resume, source.num_rows(), cache=cache_folder(ctx.cfg.cache, ctx.cfg.run_dir))
    return StageResult(rows_in=rows_in,
                       extra={"responders": {r.name: engine_label(r.engine) for r in c.responders}})
