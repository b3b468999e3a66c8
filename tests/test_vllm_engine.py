"""The vllm engine on the embedded SmolLM2-135M, checked against the hf engine on the same model.

Marked `gpu`: skipped unless vLLM is installed and a GPU is visible. THEMIS_VLLM_DEVICE=cpu runs them on
a CPU build of vLLM instead (`.ci/vllm_cpu.sh` builds one in a separate environment).

Tolerances: both engines run in float32, so they differ only by kernels and summation order. IFD (a
ratio of two mean cross-entropies) must agree within IFD_RTOL relative; single log-probabilities
within LOGPROB_ATOL.
"""

from __future__ import annotations

import os
import socket

import pyarrow as pa
import pytest

from themis_ray import judging
from themis_ray.config import EngineConfig, PoolConfig, ResponderConfig, SamplingConfig, ServeConfig
from themis_ray.engines import Engine, build_engine
from themis_ray.schema import REJECT
from themis_ray.stages.ifd import ifd_from_logprobs

pytest.importorskip("vllm")
DEVICE = os.environ.get("THEMIS_VLLM_DEVICE", "cuda")
if DEVICE == "cuda":
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no GPU visible (THEMIS_VLLM_DEVICE=cpu runs these on a CPU build of vLLM)",
                    allow_module_level=True)

pytestmark = pytest.mark.gpu

IFD_RTOL = 1e-2
CPUS = 2 if DEVICE == "cpu" else 8  # Ray's CPUs for the integration tests (a GPU machine has more cores)
LOGPROB_ATOL = 2e-2
USER = [{"role": "user", "content": "List three primary colours, one per line."}]
HI = [{"role": "user", "content": "Say hi."}]
REQUESTS = [
    judging.JudgeRequest(instruction="What is the capital of France?", response="Paris.", scenario="close_qa"),
    judging.JudgeRequest(instruction="Write a haiku about rain.", scenario="creative_writing",
                         response="Soft rain on the roof\nthe gutters hum a low song\nthe street shines again"),
    judging.JudgeRequest(instruction="What is 12 * 12?", response="12 * 12 = 124.", scenario="math_qa",
                         reference="144", mode="reference"),
]
ANSWERS = [
    "[[5]] The response is correct and concise. Strengths: accurate [[5]]. Shortcomings: none [[5]].",
    "[[4]] A vivid haiku with the 5-7-5 shape. Strengths: imagery [[4]]. Shortcomings: a plain ending [[3]].",
    "[[1]] The answer is wrong: 12 * 12 is 144. Strengths: none [[1]]. Shortcomings: incorrect result [[1]].",
]


def vllm_config(**kw) -> EngineConfig:
    base = dict(kind="vllm", device=DEVICE, dtype="float32", max_model_len=2048, gpu_memory_utilization=0.25,
                engine_kwargs={"enforce_eager": True})  # no graph capture: a faster start for a test
    return EngineConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def vllm_engine():
    engine = build_engine(vllm_config(), "test.engine")
    yield engine
    engine.close()


def test_generate_matches_hf_and_keeps_errors_per_item(vllm_engine, hf_engine):
    long = [{"role": "user", "content": "word " * 2100}]
    sampling = SamplingConfig(max_tokens=8, logprobs=5)
    out = vllm_engine.generate([USER, long, HI], sampling)
    assert len(out) == 3
    assert out[1].error and "max_model_len=2048" in out[1].error and out[1].text == ""
    reference = hf_engine.generate([USER, HI], sampling)
    for got, want, conv in zip((out[0], out[2]), reference, (USER, HI)):
        assert got.error is None and got.text.strip()
        assert 0 < got.completion_tokens <= 8 and got.prompt_tokens == len(hf_engine.prompt_ids(conv))
        assert len(got.tokens) == len(got.top_logprobs) == got.completion_tokens
        assert all(len(step) <= 5 for step in got.top_logprobs)
        # Same model, same prompt ids: the same greedy first token and its alternatives' log-probabilities.
        assert got.tokens[0] == want.tokens[0]
        shared = set(got.top_logprobs[0]) & set(want.top_logprobs[0])
        assert len(shared) >= 4
        for token in shared:
            assert got.top_logprobs[0][token] == pytest.approx(want.top_logprobs[0][token], abs=LOGPROB_ATOL)


def test_prefill_continues_the_assistant_message(vllm_engine):
    plain = vllm_engine.generate([USER], SamplingConfig(max_tokens=12, logprobs=1))[0]
    assert len(plain.tokens) >= 8
    prefix = "".join(plain.tokens[:4])
    cont = vllm_engine.generate([USER + [{"role": "assistant", "content": prefix}]], SamplingConfig(max_tokens=6))[0]
    assert cont.error is None and plain.text.startswith(prefix + cont.text)


def test_ifd_from_prompt_logprobs_equals_the_hf_engine(vllm_engine, hf_engine):
    prompts = [judging.build_messages(judging.render_prompt(r)) for r in REQUESTS]
    scores = {}
    for name, engine in (("vllm", vllm_engine), ("hf", hf_engine)):
        conditioned = engine.token_logprobs(prompts, ANSWERS)
        alone = engine.token_logprobs([None] * len(ANSWERS), ANSWERS)
        assert all(s.error is None for s in conditioned + alone)
        scores[name] = [ifd_from_logprobs(c.logprobs, a.logprobs) for c, a in zip(conditioned, alone)]
    for got, want in zip(scores["vllm"], scores["hf"]):
        assert got["answer_tokens"] == want["answer_tokens"]
        for key in ("ce_conditioned", "ce_answer", "ifd"):
            assert got[key] == pytest.approx(want[key], rel=IFD_RTOL), key
    # A reject is per record: an empty answer and one too long for the model.
    bad = vllm_engine.token_logprobs([prompts[0], prompts[0]], ["", "word " * 2100])
    assert bad[0].error == "the completion is empty" and "max_model_len=2048" in bad[1].error


def test_score_distribution_from_logprobs_sums_to_one_and_matches_hf(vllm_engine, hf_engine):
    messages = judging.build_messages(judging.render_prompt(REQUESTS[0]), prefill=True)
    sampling = SamplingConfig(max_tokens=4, logprobs=10)
    dists = []
    for engine in (vllm_engine, hf_engine):
        (done,) = engine.generate([messages], sampling)
        dists.append(judging.score_distribution(done.tokens, done.top_logprobs, prefill=True))
    got, want = dists
    assert got is not None and set(got) == {1, 2, 3, 4, 5}
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-9) and 1 <= judging.expected_score(got) <= 5
    if want is not None:
        for score in got:
            assert got[score] == pytest.approx(want[score], abs=LOGPROB_ATOL)


def test_choice_logprobs_match_hf(vllm_engine, hf_engine):
    prompt = judging.build_messages(judging.render_prompt(REQUESTS[2]), prefill=True)
    options = judging.score_options()
    # The reference is the plain definition (each option's token log-probabilities, summed), which the hf
    # engine's cached-prefix version equals; it also runs on the older transformers a CPU build of vLLM pins.
    want = Engine.choice_logprobs(hf_engine, prompt, options)
    got = vllm_engine.choice_logprobs(prompt, options)
    assert got == pytest.approx(want, abs=LOGPROB_ATOL * 2)  # a sum over each option's tokens
    with pytest.raises(ValueError, match="max_model_len"):
        vllm_engine.choice_logprobs([{"role": "user", "content": "word " * 2100}], options)


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_respond_through_ray_data_llm_keeps_every_row(tmp_path, monkeypatch):
    import ray

    from themis_ray.executor import map_processor
    from themis_ray.responders import responder_step
    from themis_ray.schema import output_schema

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=CPUS, include_dashboard=False)
    try:
        schema = pa.schema([("id", pa.string()), ("instruction", pa.string()), ("scenario", pa.string())])
        rows = [{"id": "a", "instruction": "Name a primary colour.", "scenario": "open_qa"},
                {"id": "b", "instruction": "word " * 600, "scenario": "open_qa"},  # > max_model_len below
                {"id": "c", "instruction": "Say hi.", "scenario": "open_qa"}]
        responder = ResponderConfig(name="v", engine=vllm_config(max_model_len=512),
                                    sampling=SamplingConfig(max_tokens=16))
        # Half a CPU for the engine actor: on 2 CPUs the repartition and templating steps need the rest.
        out = map_processor(ray.data.from_arrow(pa.Table.from_pylist(rows, schema=schema)),
                            responder_step(responder, PoolConfig(batch_size=2, num_cpus=0.5)),
                            output_schema("respond", schema)).take_all()
        by_id = {r["instruction_id"]: r for r in out}
        assert sorted(by_id) == ["a", "b", "c"] and len(out) == 3  # rows in = rows out, rejects included
        for i in ("a", "c"):
            assert by_id[i][REJECT] is None and by_id[i]["response"] and by_id[i]["responder"] == "v"
        assert by_id["b"][REJECT].startswith("engine error:") and by_id["b"].get("response") is None
    finally:
        ray.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_serve_judge_on_async_vllm(monkeypatch):
    import httpx
    import openai
    import ray
    from ray import serve

    from themis_ray.serve import run_server

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("THEMIS_API_KEYS", raising=False)
    cfg = ServeConfig(port=_free_port(), engine=vllm_config(), max_tokens=24)
    ray.init(num_cpus=CPUS, include_dashboard=False)
    try:
        url = run_server(cfg, blocking=False)
        with httpx.Client(base_url=url, timeout=300) as client:
            body = {"instruction": "What is the capital of France?", "response": "Paris.", "scenario": "close_qa"}
            out = client.post("/v1/judge", json=body).json()
            assert out["raw"].startswith(judging.SCORE_PREFILL)
            if out["error"] is None:
                assert 1 <= out["score"] <= 5
            if out["score_distribution"] is not None:
                assert sum(out["score_distribution"].values()) == pytest.approx(1.0, abs=1e-6)
            # No scenario: the classifier scores every scenario name through the same async engine.
            picked = client.post("/v1/judge", json={k: v for k, v in body.items() if k != "scenario"}).json()
            assert picked["scenario_source"] == "classifier" and 0 < picked["scenario_confidence"] <= 1
            pair = client.post("/v1/judge", json={"mode": "pairwise", "instruction": "What is 2 + 2?",
                                                  "response_a": "4", "response_b": "5", "scenario": "math_qa"}).json()
            assert pair["verdict"] in ("A", "B", "C")
        chat = openai.OpenAI(base_url=f"{url}/v1", api_key="unused").chat.completions.create(
            model="smollm2-135m-instruct", messages=HI, max_tokens=8, temperature=0, logprobs=True, top_logprobs=3)
        assert chat.choices[0].message.content and chat.choices[0].logprobs.content
    finally:
        serve.shutdown()
        ray.shutdown()
