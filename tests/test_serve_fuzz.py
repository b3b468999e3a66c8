"""Fuzz the judge's HTTP API from its own OpenAPI document with schemathesis: no input is a 5xx.

The app is the real one (`create_fastapi_app` over the real `JudgeService`), called in-process over
ASGI, with the embedded SmolLM2-135M behind it through `EngineBackend`. Generation is capped at a few
tokens so that a fuzzed `max_tokens` cannot make one example run for minutes; everything else a
request asks for (temperature, top_p, seed, logprobs, stop, criteria, scales) reaches the engine.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings  # noqa: E402  (installed with schemathesis)

from themis_ray.scenarios import load_scenarios  # noqa: E402
from themis_ray.serve.api import create_fastapi_app  # noqa: E402
from themis_ray.serve.service import EngineBackend, JudgeService, ServeSettings  # noqa: E402

pytestmark = pytest.mark.integration  # about a minute of the real model

MAX_NEW_TOKENS = 3  # per fuzzed request; the point is the request's path, not the answer's length
SCENARIOS = sorted(load_scenarios())
EXAMPLES = 20  # per operation (four operations): about a minute on two idle CPU cores


class CappedBackend(EngineBackend):
    async def generate(self, conversation, sampling):
        capped = {**sampling, "max_tokens": min(sampling["max_tokens"], MAX_NEW_TOKENS)}
        return await super().generate(conversation, capped)


def steer(case) -> None:
    """Point most fuzzed bodies past the checks a random string never passes (a known model name, a
    known scenario), so that the fuzzing reaches the service and the engine, not only the validators."""
    body = case.body
    if not isinstance(body, dict):
        return
    pick = sum(map(ord, repr(sorted(body, key=str)))) + len(repr(body))
    if not pick % 4:
        return  # left as generated: the validators' share
    if case.path == "/v1/chat/completions":
        if isinstance(body.get("model"), str):
            body["model"] = "smollm2-135m-instruct"
        body.pop("n", None)
    if case.path == "/v1/judge":
        body["scenario"] = SCENARIOS[pick % len(SCENARIOS)]  # the classifier's path costs 10 scorings
        for key in ("instruction", "response", "response_a", "response_b", "reference"):
            if isinstance(body.get(key), str) and not body[key].strip():
                body[key] = "ok"
        criteria = body.get("criteria")
        if isinstance(criteria, list) and not all(
            isinstance(c, dict) and all(isinstance(c.get(k), str) and c[k].strip() for k in ("name", "description"))
            for c in criteria
        ):
            body.pop("criteria")
        mode = body.get("mode", "single")
        if not isinstance(mode, str):
            return
        drop = {"pairwise": ("response", "reference"), "single": ("response_a", "response_b", "reference")}
        for key in drop.get(mode, ("response_a", "response_b")):
            body.pop(key, None)
        need = {"pairwise": ("response_a", "response_b"), "reference": ("response", "reference")}
        for key in need.get(mode, ("response",)):
            if not isinstance(body.get(key), str):
                body[key] = "ok"
        scale = body.get("scale")
        if isinstance(scale, dict):
            low, high = scale.get("low", 1), scale.get("high", 5)
            if not (type(low) is int and type(high) is int and 0 < high - low <= 10):
                body.pop("scale")


# The schema is read from the app at import time; the engine behind it arrives with the fixture below.
backend = CappedBackend(engine=None)
service = JudgeService(
    backend, ServeSettings(model_id="smollm2-135m-instruct", max_tokens=MAX_NEW_TOKENS, max_request_bytes=16384)
)
schema = schemathesis.openapi.from_asgi("/openapi.json", create_fastapi_app(lambda: service))


@pytest.fixture(autouse=True, scope="module")
def _real_engine(hf_engine):
    backend.engine = hf_engine
    service.settings.max_model_len = hf_engine.max_model_len
    yield
    backend.engine = None


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_input_is_a_server_error(case):
    steer(case)
    response = case.call(timeout=300)
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text)
    if response.status_code >= 400:
        assert response.json()["error"]["message"]
