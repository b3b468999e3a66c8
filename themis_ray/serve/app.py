"""The Ray Serve application that hosts a judge.

Two deployments:

* `JudgeAPI`: the FastAPI ingress (num_cpus=0, so it never competes with the model for a small box's
  CPUs). It validates, renders prompts, parses answers and speaks OpenAI's chat-completions dialect.
* `JudgeModel`: builds the engine inside its replica and batches generate calls with `@serve.batch`;
  requests with the same sampling parameters share one `engine.generate` call. With a
  vllm engine it runs vLLM's AsyncLLM instead, which batches every request in flight by itself (continuous
  batching), on the GPUs the replica holds.

Start it from Python with `run_server(cfg, model)`, or with Serve's CLI through the application
builder: `serve run themis_ray.serve.app:app_builder model=/path/to/judge max_tokens=64`, or from a Serve
config file: `serve run configs/serve.yaml` (which also sets the model deployment's autoscaling).
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import math
import os
import random
import threading
import time
from typing import Any, Optional

from fastapi import FastAPI
from omegaconf import OmegaConf
from ray import serve
from ray.serve.handle import DeploymentHandle

from themis_ray.config import EngineConfig, SamplingConfig, ServeConfig
from themis_ray import fs
from themis_ray.engines import Completion, Conversation, gpus_per_engine, loads_local_weights, preflight
from themis_ray.serve.api import create_fastapi_app
from themis_ray.serve.service import (JudgeService, ServeSettings, engine_error, parse_keys, raise_scoring_error,
                                      score_choices)

_SAMPLING_KEYS = ("max_tokens", "temperature", "top_p", "seed", "logprobs", "stop_pattern", "stop_min_tokens")


@serve.deployment
class JudgeModel:
    """One engine per replica; generate calls are batched, classification runs one at a time."""

    def __init__(self, engine_cfg: EngineConfig, max_batch_size: int, batch_wait_timeout_s: float,
                 scenarios_dir: Optional[str] = None):
        from themis_ray.engines import build_serving_engine

        self.engine, self.continuous = build_serving_engine(engine_cfg)
        self.scenarios_dir = scenarios_dir
        self._lock = threading.Lock()  # one engine call at a time: the replica's CPUs are the engine's
        self._generate_batch.set_max_batch_size(max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def generate(self, conversation: Conversation, sampling: dict) -> Completion:
        if self.continuous:  # vLLM batches requests in flight itself
            values = {k: sampling.get(k) for k in _SAMPLING_KEYS}
            if values["seed"] is None:
                values["seed"] = random.randrange(2**31)
            (completion,) = await self.engine.agenerate([conversation], SamplingConfig(**values))
            return completion
        return await self._generate_batch((conversation, tuple(sampling.get(k) for k in _SAMPLING_KEYS)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.05)  # both reset from the config in __init__
    async def _generate_batch(self, items: list[tuple[Conversation, tuple]]) -> list[Completion]:
        results: list[Optional[Completion]] = [None] * len(items)
        groups: dict[tuple, list[int]] = {}
        for i, (_, key) in enumerate(items):
            groups.setdefault(key, []).append(i)
        for key, indices in groups.items():
            values = dict(zip(_SAMPLING_KEYS, key))
            if values["seed"] is None:
                values["seed"] = random.randrange(2**31)
            sampling = SamplingConfig(**values)
            try:
                completions = await asyncio.to_thread(
                    self._locked, self.engine.generate, [items[i][0] for i in indices], sampling
                )
            except Exception as exc:  # a failure is per group, never the replica's
                completions = [Completion(error=f"{type(exc).__name__}: {exc}") for _ in indices]
            for i, completion in zip(indices, completions):
                results[i] = completion
        return results  # type: ignore[return-value]

    async def classify(self, instruction: str) -> dict:
        """{"scenario", "confidence"}, or {"error"} when this instruction cannot be classified."""
        from themis_ray.classifier.zero_shot import classify

        if self.continuous:  # the classifier's scoring calls run on this loop, from the worker thread
            self.engine.bind_loop(asyncio.get_running_loop())
        try:
            ((name, confidence),) = await asyncio.to_thread(
                self._locked, classify, self.engine, [instruction], self.scenarios_dir
            )
        except ValueError as exc:  # e.g. too long for the model; the caller's problem, not the replica's
            return {"error": str(exc)}
        return {"scenario": name, "confidence": confidence}

    async def score_choices(self, conversation: Conversation, options: list[str]) -> dict:
        """Score-only judging: {"logprobs"} of each option after the conversation, or {"error"}."""
        if self.continuous:
            self.engine.bind_loop(asyncio.get_running_loop())
        return await asyncio.to_thread(self._locked, score_choices, self.engine, conversation, options)


class _HandleBackend:
    """The service's backend in Serve: calls on the `JudgeModel` deployment."""

    def __init__(self, handle: DeploymentHandle):
        self.handle = handle

    async def generate(self, conversation: Conversation, sampling: dict) -> Completion:
        return await self.handle.generate.remote(conversation, sampling)

    async def classify(self, instruction: str) -> tuple[str, float]:
        result = await self.handle.classify.remote(instruction)
        if result.get("error"):
            raise engine_error(result["error"])
        return result["scenario"], result["confidence"]

    async def score_choices(self, conversation: Conversation, options: list[str]) -> list[float]:
        return raise_scoring_error(await self.handle.score_choices.remote(conversation, options))


def _replica_service() -> JudgeService:
    return serve.get_replica_context().servable_object.service


fastapi_app: FastAPI = create_fastapi_app(_replica_service)


@serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
@serve.ingress(fastapi_app)
class JudgeAPI:
    def __init__(self, model: DeploymentHandle, settings: ServeSettings, api_keys_env: str):
        # Keys arrive as digests from whoever built the app; keys set in this replica's own
        # environment (e.g. through a runtime_env) count too.
        digests = settings.api_key_digests | parse_keys(os.environ.get(api_keys_env), api_keys_env)
        self.service = JudgeService(_HandleBackend(model), dataclasses.replace(settings, api_key_digests=digests))


def _serve_config(cfg: Any) -> ServeConfig:
    """A ServeConfig dataclass from a dataclass, an OmegaConf config or a plain dict."""
    if isinstance(cfg, ServeConfig):
        return copy.deepcopy(cfg)
    merged = OmegaConf.merge(OmegaConf.structured(ServeConfig), cfg if cfg is not None else {})
    return OmegaConf.to_object(merged)


def build_app(cfg: Any, model: Optional[str] = None, scenarios_dir: Optional[str] = None) -> serve.Application:
    """The judge application for `serve.run`; `model` (a judge folder) overrides cfg.engine.model.

    API keys are read here, from the variable named by cfg.api_keys_env, and only their SHA-256
    digests are passed on to the replicas; with cfg.require_api_keys, no key is an error.
    """
    cfg = _serve_config(cfg)
    engine = copy.deepcopy(cfg.engine)
    engine.model = model or cfg.model or engine.model
    if loads_local_weights(engine) and not _is_embedded(engine.model) and not fs.exists(engine.model):
        raise FileNotFoundError(f"judge model folder not found: {engine.model}")
    if cfg.max_tokens < 1 or cfg.max_tokens >= engine.max_model_len:
        raise ValueError(f"serve.max_tokens must be in 1..{engine.max_model_len - 1}; got {cfg.max_tokens}")
    if cfg.rationale_tokens is not None and cfg.rationale_tokens < 0:  # above max_tokens: max_tokens caps it
        raise ValueError(f"serve.rationale_tokens must be at least 0, or null; got {cfg.rationale_tokens}")
    if cfg.max_request_bytes < 1:
        raise ValueError(f"serve.max_request_bytes must be positive; got {cfg.max_request_bytes}")
    preflight(engine, "serve.engine")  # vllm: installed, and GPUs in the cluster when Ray is up
    settings = ServeSettings(
        model_id=engine.model,
        prefill_score=cfg.prefill_score,
        max_tokens=cfg.max_tokens,
        rationale_tokens=cfg.rationale_tokens,
        max_model_len=engine.max_model_len,
        max_request_bytes=cfg.max_request_bytes,
        api_key_digests=parse_keys(os.environ.get(cfg.api_keys_env), cfg.api_keys_env),
        scenarios_dir=scenarios_dir,
    )
    if cfg.require_api_keys and not settings.api_key_digests:
        raise ValueError(f"serve.require_api_keys is set but ${cfg.api_keys_env} holds no API key: "
                         f"refusing to serve without auth (is its Secret missing?)")
    model_deployment = JudgeModel.options(
        **model_deployment_options(cfg)
    ).bind(engine, cfg.max_batch_size, cfg.batch_wait_timeout_s, scenarios_dir)
    return JudgeAPI.bind(model_deployment, settings, cfg.api_keys_env)


def model_deployment_options(cfg: ServeConfig) -> dict:
    """`JudgeModel.options(...)` for a ServeConfig: fixed replicas, or autoscaling on ongoing requests."""
    # Enough requests in the replica at once to fill a batch, twice over.
    max_ongoing = max(2 * cfg.max_batch_size, 8)
    options: dict = {"ray_actor_options": {"num_cpus": cfg.replica_num_cpus}}
    if gpus_per_engine(cfg.engine):
        options["ray_actor_options"]["num_gpus"] = gpus_per_engine(cfg.engine)  # vllm runs on them
    scaling = cfg.autoscaling
    if scaling is None:
        return {**options, "num_replicas": cfg.num_replicas, "max_ongoing_requests": max_ongoing}
    if not 0 <= scaling.min_replicas <= scaling.max_replicas or scaling.max_replicas < 1:
        raise ValueError(
            f"serve.autoscaling needs 0 <= min_replicas <= max_replicas and max_replicas >= 1; "
            f"got {scaling.min_replicas}..{scaling.max_replicas}"
        )
    if scaling.target_ongoing_requests <= 0:
        raise ValueError(
            f"serve.autoscaling.target_ongoing_requests must be positive; got {scaling.target_ongoing_requests}"
        )
    return {
        **options,
        "autoscaling_config": {
            "min_replicas": scaling.min_replicas,
            "max_replicas": scaling.max_replicas,
            "target_ongoing_requests": scaling.target_ongoing_requests,
        },
        # A replica must admit more than the target, or the autoscaler never sees the load it aims for.
        "max_ongoing_requests": max(max_ongoing, int(math.ceil(2 * scaling.target_ongoing_requests))),
    }


def _is_embedded(name: str) -> bool:
    from themis_ray.assets import DEFAULT_MODEL

    return name == DEFAULT_MODEL


def app_builder(args: dict) -> serve.Application:
    """Serve's application-builder entry: `serve run themis_ray.serve.app:app_builder model=DIR ...`.

    Arguments: `model` (the judge folder), `config` (a pipeline YAML whose `serve` section is used),
    `scenarios_dir`, and any ServeConfig key as an override (`max_tokens=64`, `engine.num_threads=1`).
    Values may be strings (from the CLI) or typed (from a Serve config file's `args:`).
    """
    args = dict(args or {})
    model = args.pop("model", None)
    scenarios_dir = args.pop("scenarios_dir", None)
    config_path = args.pop("config", None)
    cfg = OmegaConf.structured(ServeConfig)
    if config_path:
        from themis_ray.config import load

        pipeline = load(config_path)
        cfg = OmegaConf.merge(cfg, pipeline.serve)
        scenarios_dir = scenarios_dir or pipeline.scenarios_dir
    scalars = [f"{k}={v}" for k, v in args.items() if not isinstance(v, dict)]
    nested = {k: v for k, v in args.items() if isinstance(v, dict)}
    if scalars:
        cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(scalars))
    if nested:
        cfg = OmegaConf.merge(cfg, OmegaConf.create(nested))
    return build_app(cfg, model, scenarios_dir)


def run_server(cfg: Any, model: Optional[str] = None, blocking: bool = True,
               scenarios_dir: Optional[str] = None) -> str:
    """Start Serve on cfg.host:cfg.port, deploy the judge at "/", print the URL; block until Ctrl-C.

    Connects to the Ray cluster already initialised in this process, else starts or joins one as
    `serve.start` does. Returns the base URL (when not blocking).
    """
    serve_cfg = _serve_config(cfg)
    app = build_app(serve_cfg, model, scenarios_dir)
    serve.start(http_options={"host": serve_cfg.host, "port": serve_cfg.port})
    preflight(serve_cfg.engine, "serve.engine")  # Ray is up now: a vllm replica would wait forever for a GPU
    serve.run(app, route_prefix="/")
    url = f"http://{serve_cfg.host}:{serve_cfg.port}"
    auth = f"bearer keys from ${serve_cfg.api_keys_env}" if os.environ.get(serve_cfg.api_keys_env) else "no auth"
    print(f"judge served at {url}  (POST /v1/judge, OpenAI base_url {url}/v1, docs {url}/docs; {auth})", flush=True)
    if blocking:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("shutting the judge down", flush=True)
            serve.shutdown()
    return url
