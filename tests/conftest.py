"""Shared fixtures: one embedded SmolLM2-135M engine for the tests that run a real model, a local
two-CPU Ray for the tests that run plans or train on it, and a loopback S3 server for object storage."""

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


@pytest.fixture(scope="module")
def ray_module(request, s3_server):
    """A local two-CPU Ray for one test module, started after the loopback S3 server so its workers
    inherit the S3 settings; the module's own functions travel to the workers by value (a test module
    is not importable there)."""
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # a local test cluster needs no auth token
    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, include_dashboard=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        yield ray
    finally:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server():
    """A real S3-compatible HTTP server on loopback (moto's server mode, as Ray's own tests use), with a
    bucket; pyarrow's S3 filesystem (and every Ray worker started after this) reaches it through the
    standard AWS variables. Yields the bucket's URI."""
    from requires import require

    boto3 = require("boto3")
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    saved = {k: os.environ.get(k) for k in S3_ENV}
    os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
                       "AWS_ENDPOINT_URL": f"http://{host}:{port}"})
    boto3.client("s3").create_bucket(Bucket="themis-test")
    yield "s3://themis-test"
    server.stop()
    for key, value in saved.items():
        os.environ.pop(key, None) if value is None else os.environ.__setitem__(key, value)


S3_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_REGION", "AWS_DEFAULT_REGION", "AWS_ENDPOINT_URL")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random-initialised model of the embedded model's family (2 layers, hidden 64, its tokenizer and
    tied embeddings): the whole training mechanism at a fraction of the cost."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from themis_ray.assets import prepare_default_model

    base = str(prepare_default_model())
    config = AutoConfig.from_pretrained(base)
    if getattr(config, "quantization_config", None) is not None:
        del config.quantization_config
    config.hidden_size, config.intermediate_size, config.num_hidden_layers = 64, 128, 2
    config.num_attention_heads, config.num_key_value_heads, config.head_dim = 4, 2, 16
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("tiny-model")
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return str(out)
