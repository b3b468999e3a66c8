"""Responders: a model (engine, sampling, system prompt) answering instructions, one row per answer.

The respond stage runs one per configured responder; MT-Bench (evaluate) runs its own, named under
`evaluate.mtbench` in errors.
"""

from __future__ import annotations

from themis_ray.executor import GenerationProcessor, Step, StepEngine
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
