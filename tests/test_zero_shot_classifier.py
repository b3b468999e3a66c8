"""Zero-shot scenario classification on the real embedded model."""

from __future__ import annotations

import pytest

from themis_ray.classifier.zero_shot import classify, scenario_prior, softmax, _scenario_logprobs
from themis_ray.scenarios import load_scenarios


def test_softmax_by_hand():
    assert softmax([0.0, 0.0]) == pytest.approx([0.5, 0.5])
    assert softmax([1000.0, 0.0])[0] == pytest.approx(1.0)  # no overflow


@pytest.mark.integration  # loads the real model
def test_every_answer_is_a_known_scenario_with_a_confidence(hf_engine):
    results = classify(hf_engine, ["Translate 'good night' into German.", "Write a haiku about rain."])
    names = set(load_scenarios())
    for name, confidence in results:
        assert name in names
        assert 0 < confidence <= 1


@pytest.mark.integration  # loads the real model
def test_calibration_subtracts_the_content_free_prior(hf_engine):
    instruction = "What is 12 times 12?"
    names, raw = _scenario_logprobs(hf_engine, instruction, None)
    prior = scenario_prior(hf_engine, None)
    probs = softmax([r - p for r, p in zip(raw, prior)])
    best = max(range(len(names)), key=probs.__getitem__)
    [(name, confidence)] = classify(hf_engine, [instruction], calibrate=True)
    assert (name, confidence) == (names[best], pytest.approx(probs[best]))
    [(raw_name, _)] = classify(hf_engine, [instruction], calibrate=False)
    assert raw_name == names[max(range(len(names)), key=raw.__getitem__)]
