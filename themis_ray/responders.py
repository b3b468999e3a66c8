"""Responders: a model (engine, sampling, system prompt) answering instructions, one row per answer.

`answer` is the one loop that runs them: the respond stage runs its configured responders through it,
MT-Bench (evaluate) its own, named under `evaluate.mtbench` in errors.
"""

from __future__ import annotations

from typing import Optional

from omegaconf import OmegaConf

from themis_ray.engines.cache import with_cache
from themis_ray.executor import GenerationProcessor, Step, StepEngine, run_rows
from themis_ray.schema import REJECT, stable_id


class Responder(GenerationProcessor):
    stage = "respond"
    resume_key = ("id", "instruction_id")  # per responder: the run narrows the written rows to its own

    def __init__(self, output_schema, responder, section: str = "respond", with_engine: bool = True):
        super().__init__(output_schema, responder.engine, with_engine, engine_key(responder, section))
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


def engine_key(responder, section: str) -> str:
    """The config key of a responder's engine, as errors name it."""
    return f"{section}.responders[{responder.name}].engine"


def responder_step(responder, pool, section: str = "respond") -> Step:
    """One responder answering on `pool`, its answers a partition of their own."""
    return Step(name=f"{section}[{responder.name}]", processor=Responder,
                args={"responder": responder, "section": section}, pool=pool,
                engine=StepEngine(responder.engine, engine_key(responder, section)),
                partition={"responder": responder.name})


def answer(responders, source, pool, store, schema, resume: bool, total: int, section: str = "respond",
           cache: Optional[str] = None) -> int:
    """Every responder answers every row of `source` (a Dataset of `total` rows) into `store`, each
    into its own partition; returns the rows asked (rows x responders). An endpoint responder keeps its
    answers in the request cache `cache` (a folder), so a rerun pays for none of them again."""
    names = [r.name for r in responders]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"{section}.responders: need at least one, with unique names; got {names}")
    # One plan per responder, one after another, so their pools never compete for the same CPUs.
    for responder in responders:
        if cache:
            responder = OmegaConf.merge(responder, {"engine": with_cache(responder.engine, cache)})
        run_rows(source, responder_step(responder, pool, section), store, schema, resume=resume, total=total)
    return total * len(names)
