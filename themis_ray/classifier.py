"""Zero-shot scenario classification: the model scores every scenario name as the answer.

A constrained choice by log-probability, not free text, so the answer is always a known scenario and
comes with a confidence. Shared by the classify stage and the judge server.
"""

from __future__ import annotations

import math
from typing import Optional

from themis_ray import prompts
from themis_ray.scenarios import load_scenarios


def classify(engine, instructions: list[str], scenarios_dir: Optional[str] = None) -> list[tuple[str, float]]:
    """(scenario name, probability) for each instruction."""
    scenarios = list(load_scenarios(scenarios_dir).values())
    names = [s.name for s in scenarios]
    results = []
    for instruction in instructions:
        text = prompts.render("classify", scenarios=scenarios, instruction=instruction)
        totals = engine.choice_logprobs([{"role": "user", "content": text}], names)
        peak = max(totals)
        weights = [math.exp(t - peak) for t in totals]
        best = max(range(len(names)), key=lambda k: totals[k])
        results.append((names[best], weights[best] / sum(weights)))
    return results
