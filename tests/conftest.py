"""Shared fixtures: one embedded SmolLM2-135M engine for the tests that run a real model, and a local
two-CPU Ray for the tests that train on it."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def hf_engine():
    from themis_ray.config import EngineConfig
    from themis_ray.engines import build_engine

    engine = build_engine(EngineConfig())  # the embedded default model, from the local cache
    yield engine
    engine.close()


@pytest.fixture
def ray_local(monkeypatch):
    import ray

    if "RAY_AUTH_MODE" not in os.environ:  # a local test cluster needs no auth token
        monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=2)
    yield ray
    ray.shutdown()
