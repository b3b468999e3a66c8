"""What a stage's `run` receives: its config, its output store, its inputs' stores, and whether it resumes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from themis_ray.store import StageStore


@dataclass
class StageContext:
    cfg: Any  # the whole pipeline config (a stage reads its own section)
    store: StageStore  # where the stage writes
    inputs: dict[str, StageStore]  # finished input stages, by name
    resume: bool = False  # an interrupted run of the same fingerprint left parts to keep

    def input(self, name: str) -> StageStore:
        return self.inputs[name]
