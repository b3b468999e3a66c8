"""Zero-shot scenario classification: the model scores every scenario name as the answer.

A constrained choice by log-probability, not free text, so the answer is always a known scenario and
comes with a confidence. A small model prefers some names whatever the instruction; with
`calibrate`, each name's log-probability for a content-free instruction is subtracted first
(contextual calibration, Zhao et al. 2021). Shared by the classify stage and the judge server.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional

from themis_ray import prompts
from themis_ray.scenarios import load_scenarios

CONTENT_FREE = "N/A"


def _scenario_logprobs(engine, instruction: str, scenarios_dir: Optional[str]) -> tuple[list[str], list[float]]:
    scenarios = list(load_scenarios(scenarios_dir).values())
    names = [s.name for s in scenarios]
    text = prompts.render("classify", scenarios=scenarios, instruction=instruction)
    return names, engine.choice_logprobs([{"role": "user", "content": text}], names)


@lru_cache(maxsize=8)
def scenario_prior(engine, scenarios_dir: Optional[str] = None) -> tuple[float, ...]:
    """Each scenario name's log-probability for a content-free instruction; once per engine."""
    return tuple(_scenario_logprobs(engine, CONTENT_FREE, scenarios_dir)[1])


def softmax(logprobs: list[float]) -> list[float]:
    peak = max(logprobs)
    weights = [math.exp(lp - peak) for lp in logprobs]
    return [w / sum(weights) for w in weights]


def classify(
    engine, instructions: list[str], scenarios_dir: Optional[str] = None, calibrate: bool = True
) -> list[tuple[str, float]]:
    """(scenario name, probability) for each instruction."""
    prior = scenario_prior(engine, scenarios_dir) if calibrate else None
    results = []
    for instruction in instructions:
        names, totals = _scenario_logprobs(engine, instruction, scenarios_dir)
        if prior is not None:
            totals = [t - p for t, p in zip(totals, prior)]
        probs = softmax(totals)
        best = max(range(len(names)), key=probs.__getitem__)
        results.append((names[best], probs[best]))
    return results
