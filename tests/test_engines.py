"""Engines: the HF engine's generation, and the OpenAI engine against a real local HTTP server."""

from __future__ import annotations

import dataclasses
import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from themis_ray import judging
from themis_ray.config import EngineConfig, SamplingConfig
from themis_ray.engines import ENGINES, build_engine
from themis_ray.engines.openai_engine import OpenAIEngine

# ------------------------------------------------------------------------------------ build_engine


def test_build_engine_rejects_unknown_kind():
    with pytest.raises(ValueError, match="'tgi'"):
        build_engine(EngineConfig(kind="tgi"))


def test_build_engine_vllm_is_not_silently_hf():
    with pytest.raises((RuntimeError, NotImplementedError), match="vllm"):
        build_engine(EngineConfig(kind="vllm"))


def test_non_hf_engine_cannot_score(monkeypatch):
    monkeypatch.setenv("THEMIS_TEST_UNUSED_KEY", "x")
    engine = OpenAIEngine(EngineConfig(kind="openai", base_url="http://127.0.0.1:9/v1", api_key_env="THEMIS_TEST_UNUSED_KEY"))
    try:
        with pytest.raises(NotImplementedError, match="hf"):
            engine.token_logprobs([None], ["x"])
    finally:
        engine.close()


@pytest.mark.parametrize("kind", sorted(ENGINES))
def test_each_engine_declares_its_capabilities_and_scores_text_only_where_it_says_so(kind):
    from themis_ray.engines import Capabilities, Engine, capabilities, engine_class

    cls = engine_class(kind)
    assert isinstance(cls.capabilities, Capabilities) and "capabilities" not in vars(Engine)
    assert capabilities(EngineConfig(kind=kind)) is cls.capabilities
    # Declared scoring is real scoring: the class overrides the base's refusal exactly when it says it can.
    assert (cls.token_logprobs is not Engine.token_logprobs) == cls.capabilities.scores_text
    with pytest.raises(dataclasses.FrozenInstanceError):
        cls.capabilities.scores_text = not cls.capabilities.scores_text


def test_the_switches_read_the_capabilities():
    from themis_ray.engines import (batch_generation_route, batches_in_flight, continues_assistant_message,
                                    loads_local_weights)

    hf, openai, vllm = (EngineConfig(kind=k, max_concurrency=8) for k in ("hf", "openai", "vllm"))
    assert [continues_assistant_message(c) for c in (hf, openai, vllm)] == [True, False, True]
    assert [loads_local_weights(c) for c in (hf, openai, vllm)] == [True, False, True]
    assert [batches_in_flight(c) for c in (hf, openai, vllm)] == [1, 4, 1]
    assert [batch_generation_route(c) for c in (hf, openai, vllm)] == [False, False, True]


def test_hf_dtype_is_checked_before_anything_loads():
    with pytest.raises(ValueError, match="engine.dtype"):
        build_engine(EngineConfig(dtype="int8", model="/nonexistent"))


@pytest.mark.integration  # loads the real model
def test_hf_bfloat16_on_cpu_scores_close_to_float32(hf_engine):
    import torch

    low = build_engine(EngineConfig(dtype="bfloat16"))
    try:
        assert next(low.model.parameters()).dtype == torch.bfloat16
        answer = "Red\nGreen\nBlue"
        (full,), (half,) = hf_engine.token_logprobs([USER], [answer]), low.token_logprobs([USER], [answer])
        assert len(full.logprobs) == len(half.logprobs) > 3
        mean_full, mean_half = sum(full.logprobs) / len(full.logprobs), sum(half.logprobs) / len(half.logprobs)
        assert mean_half == pytest.approx(mean_full, rel=0.05, abs=0.05)  # a rounding of weights, not a new model
    finally:
        low.close()


# ------------------------------------------------------------------------------------ HF generate

USER = [{"role": "user", "content": "List three primary colours, one per line."}]


@pytest.mark.integration  # loads the real model
def test_hf_generate_too_long_prompt_is_a_per_item_error(hf_engine):
    long = [{"role": "user", "content": "word " * 2100}]
    sampling = SamplingConfig(max_tokens=6)
    out = hf_engine.generate([USER, long, [{"role": "user", "content": "Say hi."}]], sampling)
    assert len(out) == 3
    assert out[1].error and "max_model_len=2048" in out[1].error and out[1].text == ""
    assert out[1].prompt_tokens > 2048
    for k in (0, 2):
        assert out[k].error is None and out[k].text.strip()
        assert 0 < out[k].completion_tokens <= 6
        assert out[k].prompt_tokens == len(hf_engine.prompt_ids([USER, None, [{"role": "user", "content": "Say hi."}]][k]))


@pytest.mark.integration  # loads the real model
def test_hf_generate_batched_equals_one_at_a_time(hf_engine):
    convs = [
        [{"role": "user", "content": "Say hi."}],
        USER,
        [{"role": "user", "content": "Explain in one sentence why the sky looks blue during the day, "
                                     "mentioning scattering of sunlight by the air."}],
    ]
    sampling = SamplingConfig(max_tokens=8)
    batched = hf_engine.generate(convs, sampling)
    for conv, got in zip(convs, batched):
        alone = hf_engine.generate([conv], sampling)[0]
        assert got.text == alone.text and got.completion_tokens == alone.completion_tokens


@pytest.mark.integration  # loads the real model
def test_hf_generate_logprobs_match_a_plain_forward(hf_engine):
    convs = [USER, [{"role": "user", "content": "Hi"}]]  # different lengths: the second is left-padded
    out = hf_engine.generate(convs, SamplingConfig(max_tokens=3, logprobs=5))
    for conv, done in zip(convs, out):
        assert len(done.tokens) == len(done.top_logprobs) == done.completion_tokens
        assert all(len(step) <= 5 for step in done.top_logprobs)
        assert all(sum(math.exp(v) for v in step.values()) <= 1.0 + 1e-6 for step in done.top_logprobs)
        # greedy: the generated token is the most likely one at each step
        for token, step in zip(done.tokens, done.top_logprobs):
            assert max(step, key=step.get) == token
        with torch.no_grad():
            logits = hf_engine.model(input_ids=torch.tensor([hf_engine.prompt_ids(conv)])).logits[0, -1]
        logp = torch.log_softmax(logits.float(), dim=-1)
        values, indices = logp.topk(5)
        want = {hf_engine.tokenizer.decode([int(i)]): float(v) for v, i in zip(values, indices)}
        assert set(done.top_logprobs[0]) == set(want)
        for token, value in want.items():
            assert done.top_logprobs[0][token] == pytest.approx(value, abs=1e-4)


@pytest.mark.integration  # loads the real model
def test_hf_generate_prefill_continues_the_message(hf_engine):
    sampling = SamplingConfig(max_tokens=12, logprobs=1)
    plain = hf_engine.generate([USER], sampling)[0]
    assert plain.error is None and len(plain.tokens) >= 8
    prefix = "".join(plain.tokens[:4])
    conv = USER + [{"role": "assistant", "content": prefix}]
    ids = hf_engine.prompt_ids(conv)
    # the prompt ends with the prefill itself: no end-of-turn, no new assistant header
    assert hf_engine.tokenizer.decode(ids).endswith(prefix)
    cont = hf_engine.generate([conv], SamplingConfig(max_tokens=6))[0]
    assert cont.error is None and cont.text
    assert not cont.text.startswith(prefix)  # only the new text comes back
    # greedy: continuing the first 4 tokens gives what the plain answer said next
    assert plain.text.startswith(prefix + cont.text)


# ------------------------------------------------------------------------------------ OpenAI server

KEY_ENV = "THEMIS_TEST_JUDGE_KEY"
SECRET = "sk-test-SECRET-8d1f2a"


class _State:
    def __init__(self):
        self.lock = threading.Lock()
        self.script: list = []  # actions for the next requests, in arrival order
        self.requests: list[dict] = []  # {"auth": ..., "body": ...}


class _Handler(BaseHTTPRequestHandler):
    state: _State

    def log_message(self, *args):  # keep the test output quiet
        pass

    def _send(self, status, body: bytes, headers=None, content_type="application/json"):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(body)
        except (BrokenPipeError, ConnectionResetError):  # the client timed out and left
            pass

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.loads(raw)
        state = self.state
        with state.lock:
            state.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            action = state.script.pop(0) if state.script else "ok"
        user = next(m["content"] for m in body["messages"] if m["role"] == "user")
        if self.path != "/v1/chat/completions":
            return self._send(404, b'{"error": {"message": "not found"}}')
        if "BAD REQUEST" in user:
            return self._send(400, json.dumps({"error": {"message": "bad request", "type": "invalid_request_error"}}).encode())
        if action == "429":
            return self._send(429, b'{"error": {"message": "slow down"}}', {"Retry-After": "0"})
        if action == "500":
            return self._send(500, b'{"error": {"message": "boom"}}')
        if action == "malformed":
            return self._send(200, b'{"id": "x", "choices": [{"message": ')
        if action == "not_utf8":
            return self._send(200, b'{"id": "\xff\xfe"}')
        if action == "no_choices":
            return self._send(200, json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                               "model": "judge", "choices": []}).encode())
        if action == "slow":
            import time

            time.sleep(2.0)
        last = body["messages"][-1]
        text = f"{last['content']}4]] fine" if last["role"] == "assistant" else f"answer to: {user}"
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
        if body.get("logprobs"):
            k = body.get("top_logprobs", 1)
            alts = [("4", -0.25), ("5", -1.75), ("3", -3.0), ("x", -5.0)][:k]
            choice["logprobs"] = {"content": [
                {"token": "4", "logprob": -0.25, "bytes": None,
                 "top_logprobs": [{"token": t, "logprob": lp, "bytes": None} for t, lp in alts]},
                {"token": "]]", "logprob": -0.01, "bytes": None,
                 "top_logprobs": [{"token": "]]", "logprob": -0.01, "bytes": None}]},
            ]}
        answer = {"id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                  "choices": [choice], "usage": {"prompt_tokens": 11, "completion_tokens": 2, "total_tokens": 13}}
        self._send(200, json.dumps(answer).encode())


@pytest.fixture
def server():
    state = _State()
    handler = type("Handler", (_Handler,), {"state": state})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd.server_address[1], state
    httpd.shutdown()
    httpd.server_close()
    thread.join(timeout=5)


@pytest.fixture
def make_engine(server, monkeypatch):
    port, _ = server
    monkeypatch.setenv(KEY_ENV, SECRET)
    engines = []

    def make(**kw):
        cfg = EngineConfig(kind="openai", base_url=f"http://127.0.0.1:{port}/v1", model="judge",
                           max_retries=5, timeout_s=5, api_key_env=KEY_ENV)
        for k, v in kw.items():
            setattr(cfg, k, v)
        engine = build_engine(cfg)
        assert isinstance(engine, OpenAIEngine)
        waits = []
        real = engine._backoff

        def quick_backoff(attempt, retry_after):  # record the wait, sleep at most 50 ms
            waits.append((attempt, retry_after, real(attempt, retry_after)))
            return min(0.05, waits[-1][2])

        engine._backoff = quick_backoff
        engine.waits = waits
        engines.append(engine)
        return engine

    yield make
    for e in engines:
        e.close()


def _conv(text):
    return [{"role": "user", "content": text}]


def test_openai_retries_429_500_and_malformed_then_answers(make_engine, server):
    _, state = server
    state.script = ["429", "500", "malformed"]
    engine = make_engine()
    out = engine.generate([_conv("one")], SamplingConfig(max_tokens=7, temperature=0.0, seed=3))
    assert out[0].error is None
    assert out[0].text == "answer to: one"
    assert (out[0].prompt_tokens, out[0].completion_tokens) == (11, 2)
    assert engine.usage.retries == 3
    assert len(state.requests) == 4
    # Retry-After: 0 was honoured after the 429; the 500 and the malformed body backed off exponentially
    assert [(a, r) for a, r, _ in engine.waits] == [(1, 0.0), (2, None), (3, None)]
    assert engine.waits[0][2] <= 0.1
    assert 0.25 <= engine.waits[1][2] <= 0.75 and 0.5 <= engine.waits[2][2] <= 1.5
    body = state.requests[-1]["body"]
    assert body["model"] == "judge" and body["max_tokens"] == 7 and body["seed"] == 3
    assert "continue_final_message" not in body and "logprobs" not in body


def test_openai_concurrent_items_all_get_their_own_answer(make_engine, server):
    _, state = server
    state.script = ["429", "429", "500", "malformed", "no_choices", "not_utf8"]
    engine = make_engine(max_concurrency=3)
    texts = [f"question {i}" for i in range(5)]
    out = engine.generate([_conv(t) for t in texts], SamplingConfig())
    assert [c.error for c in out] == [None] * 5
    assert [c.text for c in out] == [f"answer to: {t}" for t in texts]
    assert engine.usage.retries == 6
    assert len(state.requests) == 11
    assert engine.usage.prompt_tokens == 5 * 11 and engine.usage.completion_tokens == 5 * 2


def test_openai_400_is_not_retried_and_is_a_per_item_error(make_engine, server):
    _, state = server
    engine = make_engine()
    out = engine.generate([_conv("fine"), _conv("BAD REQUEST please"), _conv("also fine")], SamplingConfig())
    assert out[0].text == "answer to: fine" and out[2].text == "answer to: also fine"
    assert out[1].text == "" and out[1].error and "400" in out[1].error
    assert engine.usage.retries == 0
    assert sum("BAD REQUEST" in r["body"]["messages"][0]["content"] for r in state.requests) == 1


def test_openai_gives_up_after_max_retries(make_engine, server):
    _, state = server
    state.script = ["500"] * 3
    engine = make_engine(max_retries=2)
    out = engine.generate([_conv("doomed")], SamplingConfig())
    assert out[0].error == "gave up after 3 attempts: InternalServerError (HTTP 500)"
    assert len(state.requests) == 3 and engine.usage.retries == 2


def test_openai_timeout_is_retried(make_engine, server):
    _, state = server
    state.script = ["slow"]
    engine = make_engine(timeout_s=0.75)
    out = engine.generate([_conv("patience")], SamplingConfig())
    assert out[0].error is None and out[0].text == "answer to: patience"
    assert engine.usage.retries >= 1 and engine.waits[0][1] is None


def test_openai_key_is_sent_as_bearer_and_never_in_errors(make_engine, server):
    _, state = server
    state.script = ["500"] * 2
    engine = make_engine(max_retries=1)
    out = engine.generate([_conv("x")], SamplingConfig())  # 500, 500: gives up
    out += engine.generate([_conv("BAD REQUEST"), _conv("y")], SamplingConfig())
    assert state.requests and all(r["auth"] == f"Bearer {SECRET}" for r in state.requests)
    errors = [c.error for c in out if c.error]
    assert len(errors) == 2 and out[2].text == "answer to: y"
    for text in errors + [repr(engine.usage), repr(out)]:
        assert SECRET not in text and "SECRET" not in text
    assert not any(SECRET in json.dumps(r["body"]) for r in state.requests)


def test_openai_prefill_sends_continue_final_message_and_strips_the_echo(make_engine, server):
    _, state = server
    engine = make_engine()
    conv = [{"role": "user", "content": "Grade this."}, {"role": "assistant", "content": "[["}]
    out = engine.generate([conv], SamplingConfig(logprobs=3))
    assert out[0].error is None
    assert out[0].text == "4]] fine"  # the server echoed "[[": callers get only the new text
    body = state.requests[-1]["body"]
    assert body["continue_final_message"] is True and body["add_generation_prompt"] is False
    assert body["messages"][-1] == {"role": "assistant", "content": "[["}
    assert body["logprobs"] is True and body["top_logprobs"] == 3
    assert out[0].tokens == ["4", "]]"]
    assert out[0].top_logprobs == [{"4": -0.25, "5": -1.75, "3": -3.0}, {"]]": -0.01}]


def test_openai_top_logprobs_capped_at_20(make_engine, server):
    _, state = server
    engine = make_engine()
    engine.generate([_conv("q")], SamplingConfig(logprobs=50))
    assert state.requests[-1]["body"]["top_logprobs"] == 20


def test_backoff_bounds():
    for attempt in range(1, 12):
        wait = OpenAIEngine._backoff(attempt, None)
        assert 0 < wait <= 45.0
        base = min(30.0, 0.25 * 2 ** (attempt - 1))
        assert 0.5 * base <= wait <= 1.5 * base
    assert 2.0 <= OpenAIEngine._backoff(1, 2.0) <= 2.1


def test_rate_limit_spends_and_refills_its_budget():
    import asyncio

    from themis_ray.engines.openai_engine import RateLimit

    now = [0.0]
    slept = []

    async def sleep(seconds):  # a clock that moves only when the limiter sleeps
        slept.append(seconds)
        now[0] += seconds

    async def scenario():
        limit = RateLimit(per_minute=600, clock=lambda: now[0], sleep=sleep)  # 10/s, bucket of 600
        for _ in range(6):
            await limit.acquire(100)  # the full bucket, spent without waiting
        assert slept == []
        await limit.acquire(5)  # empty: needs 5 / (10 per second) = 0.5 s of refill
        await limit.acquire(10**6)  # larger than the bucket: waits for a full bucket, then passes

    asyncio.run(scenario())
    assert slept[0] == pytest.approx(0.5)
    assert sum(slept[1:]) == pytest.approx(60.0)  # 600 tokens at 10 per second


def test_no_rate_limit_never_waits():
    import asyncio

    from themis_ray.engines.openai_engine import RateLimit

    limit = RateLimit(None)
    asyncio.run(limit.acquire(10**9))
    assert limit.rate is None


@pytest.mark.integration  # loads the real model
def test_hf_generate_stops_after_the_verdict_and_never_cuts_it(hf_engine):
    """The engine stops a sequence once its answer matches the verdict pattern and has the minimum
    length; the stopped text is the unstopped one cut there, and it still parses to the same verdict."""
    copy = [{"role": "user", "content": "Copy this line exactly: The first answer is weaker, so [[B]] wins. "
                                        "It is clearer."}]
    plain = SamplingConfig(max_tokens=24)
    (full,) = hf_engine.generate([copy], plain)
    assert "[[B]]" in full.text  # the model copies the line: the premise of what follows
    lengths = {}
    for min_tokens in (0, 12, 40):
        (stopped,) = hf_engine.generate([copy], judging.stop_at_verdict(plain, "pairwise", min_tokens))
        assert full.text.startswith(stopped.text)
        assert judging.parse_evaluation(stopped.text, "pairwise").verdict == "B"
        lengths[min_tokens] = stopped.completion_tokens
    after_verdict = full.text[full.text.index("[[B]]") + 5:]
    assert lengths[0] < full.completion_tokens and len(after_verdict) > 0
    assert lengths[0] < lengths[12] == min(12, full.completion_tokens) and lengths[40] == full.completion_tokens
    # A verdict already in the answer's prefill counts: only the minimum length is left to write.
    prefilled = [{"role": "user", "content": "Grade it."}, {"role": "assistant", "content": "[[4]]"}]
    unrelated = [{"role": "user", "content": "Count from 1 to 50."}]
    both = hf_engine.generate([prefilled, unrelated], judging.stop_at_verdict(SamplingConfig(max_tokens=16), "single", 3))
    assert both[0].completion_tokens <= 3 and both[1].completion_tokens == 16  # each row stops on its own
