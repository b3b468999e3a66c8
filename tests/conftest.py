"""Shared fixtures: one embedded SmolLM2-135M engine for the tests that run a real model."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def hf_engine():
    from themis_ray.config import EngineConfig
    from themis_ray.engines import build_engine

    engine = build_engine(EngineConfig())  # the embedded default model, from the local cache
    yield engine
    engine.close()
