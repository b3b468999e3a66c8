"""Fuzz the live judge server from its own OpenAPI document with schemathesis: no input is a 5xx.

The server is the real Ray Serve application (`run_server`: the FastAPI ingress, the `JudgeModel`
deployment with `@serve.batch`, the embedded SmolLM2-135M) on 127.0.0.1, started once for this module,
and every example goes to it over TCP. The examples are generated from the ingress app's OpenAPI
document, read at import (schemathesis' lazy fixture loader does not work with pytest 9); the fixture
checks that the live server's `/openapi.json` is that same document (less an empty `example` that Ray
Serve's ingress adds to each request body). `EXAMPLES` generated examples per operation that takes
input (`POST /v1/judge`, `POST /v1/chat/completions`; the two GETs take none, so one example each);
schemathesis' schema-coverage phase is left out to keep the run to a few minutes on two cores. Every
answer must be below 500, and every 4xx must say what was wrong.

Generation stays short through the server's own configuration: `serve.max_tokens` (`MAX_NEW_TOKENS`)
caps every answer on every route, whatever `max_tokens` a chat request names, and
`serve.max_request_bytes` (`MAX_REQUEST_BYTES`) refuses larger bodies, so no prompt runs to thousands
of tokens and no example generates for minutes; invalid values (zero, negative, not an integer) are
left as generated, so the validators still see them.
"""

from __future__ import annotations

import json
import time
from collections import Counter

import pytest

from requires import require

schemathesis = require("schemathesis")
from hypothesis import HealthCheck, Phase, settings  # noqa: E402  (installed with schemathesis)

from themis_ray.scenarios import load_scenarios  # noqa: E402
from themis_ray.serve.app import fastapi_app  # noqa: E402  (the ingress app the Serve deployment runs)
from local_ray import free_ports, judge_server  # noqa: E402

pytestmark = pytest.mark.integration  # a Ray Serve application on the real model

MAX_NEW_TOKENS = 3  # serve.max_tokens of the fuzzed server; the point is the request's path, not the answer
MAX_REQUEST_BYTES = 4096  # serve.max_request_bytes: a larger body is a 413 before any parsing
SCENARIOS = sorted(load_scenarios())
EXAMPLES = 100  # per operation (four operations)
CALLS: Counter = Counter()  # (method, path, status) -> examples, printed at the end
DOCUMENT = json.loads(json.dumps(fastapi_app.openapi()))


@pytest.fixture(scope="module")
def live_url():
    import httpx

    from themis_ray.config import EngineConfig, ServeConfig

    cfg = ServeConfig(
        port=free_ports(1)[0],
        engine=EngineConfig(num_threads=1),  # the embedded model
        api_keys_env="THEMIS_FUZZ_NO_KEYS",  # unset: no auth, so every example reaches the API
        max_tokens=MAX_NEW_TOKENS,
        max_request_bytes=MAX_REQUEST_BYTES,
        max_batch_size=4,
        batch_wait_timeout_s=0.01,
    )
    started = time.time()
    with judge_server(cfg) as url:
        try:
            # Fuzzing the server's own API: its document is the one the examples come from.
            assert _without_empty_examples(httpx.get(f"{url}/openapi.json", timeout=60).json()) == DOCUMENT
            yield url
        finally:
            print(f"\nfuzzed the live server for {time.time() - started:.0f} s; examples by operation and status: "
                  f"{dict(sorted(CALLS.items()))}")


def _without_empty_examples(document):
    """The document less the `"example": {}` that Ray Serve's ingress adds to each request body."""
    if isinstance(document, dict):
        return {k: _without_empty_examples(v) for k, v in document.items() if not (k == "example" and v == {})}
    if isinstance(document, list):
        return [_without_empty_examples(v) for v in document]
    return document


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


schema = schemathesis.openapi.from_dict(DOCUMENT)


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    phases=[Phase.generate, Phase.shrink],  # generated examples only (no schema-coverage phase): EXAMPLES each
    derandomize=True,  # the same examples on every run: a failure here is reproducible
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_no_input_is_a_server_error(case, live_url):
    steer(case)
    response = case.call(base_url=live_url, timeout=300)
    CALLS[(case.method, case.path, response.status_code)] += 1
    assert response.status_code < 500, (case.method, case.path, case.body, response.status_code, response.text)
    if response.status_code >= 400:
        message = response.json()["error"]["message"]
        assert isinstance(message, str) and message.strip(), (case.method, case.path, case.body, response.text)
