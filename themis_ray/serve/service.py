"""What the judge server does with a validated request, independent of Ray Serve and HTTP.

`JudgeService` turns a `JudgeBody` into an evaluation and a `ChatCompletionBody` into an OpenAI-style
completion, through a `Backend` (in Serve: a handle to the `JudgeModel` deployment; in unit tests: a
fake). Prompt building and parsing are `themis_ray.judging`'s; nothing here restates them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import random
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Optional, Protocol, Union

from themis_ray import judging
from themis_ray.config import SamplingConfig
from themis_ray.engines import Completion, Conversation
from themis_ray.scenarios import get_scenario
from themis_ray.serve.schemas import ChatCompletionBody, JudgeBody

log = logging.getLogger(__name__)

JUDGE_TOP_LOGPROBS = 10  # alternatives kept at each judge token: enough for a 1..5 score distribution
GREEDY_BELOW = 1e-5  # a sampling temperature below this is greedy decoding (as vLLM treats it)
UNKNOWN_LOGPROB = -9999.0  # OpenAI's value for a chosen token outside the returned alternatives


class APIError(Exception):
    """An error with an HTTP status, returned as {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code


def engine_error(message: str) -> APIError:
    """An engine's per-request failure -> a status: a prompt too long for the model is the caller's."""
    if "max_model_len" in message:  # the hf engine's and the classifier's too-long message
        return APIError(400, message, code="context_length_exceeded")
    return APIError(502, f"the model failed: {message}", "server_error")


def error_body(status: int, message: str, type: str = "invalid_request_error", code: Optional[str] = None) -> dict:
    return {"error": {"message": message, "type": type, "code": code or status}}


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def parse_keys(raw: Optional[str], env_name: str) -> frozenset[str]:
    """Comma-separated keys -> their SHA-256 digests; only digests leave the process that read them.

    An unset variable means no auth. A variable that is set but holds no key is a misconfiguration
    that would otherwise silently open the server, so it raises.
    """
    if raw is None:
        return frozenset()
    keys = [k.strip() for k in raw.split(",") if k.strip()]
    if not keys:
        raise ValueError(f"${env_name} is set but holds no API key; unset it to serve without auth")
    return frozenset(hash_key(k) for k in keys)


def key_matches(presented: str, digests: frozenset[str]) -> bool:
    digest = hash_key(presented)
    # Compare against every digest so the time taken does not say which key came close.
    return any([hmac.compare_digest(digest, d) for d in digests])


@dataclass
class ServeSettings:
    """What the HTTP side needs to know; no secrets (keys travel as digests)."""

    model_id: str
    prefill_score: bool = True
    max_tokens: int = 128  # the cap on every answer, judge and chat alike
    rationale_tokens: Optional[int] = 48  # a judge answer stops once its verdict is out and it is this long
    max_model_len: int = 2048
    max_request_bytes: int = 65536
    api_key_digests: frozenset[str] = field(default_factory=frozenset)
    scenarios_dir: Optional[str] = None

    @property
    def model_aliases(self) -> set[str]:
        base = self.model_id.rstrip("/").rsplit("/", 1)[-1]
        return {self.model_id, base}


class Backend(Protocol):
    async def generate(self, conversation: Conversation, sampling: dict) -> Completion:
        """A failure of this request is `Completion.error`; an exception means the backend failed."""

    async def classify(self, instruction: str) -> tuple[str, float]:
        """(scenario, confidence); raises APIError (see `engine_error`) when this request fails."""

    async def score_choices(self, conversation: Conversation, options: list[str]) -> list[float]:
        """Each option's log-probability as the continuation; raises APIError when this request fails."""


class EngineBackend:
    """A backend over an engine in this process (no Ray): one engine call at a time, in a thread.

    The Serve app batches through the `JudgeModel` deployment instead; this one serves tests, tools
    and benchmarks that want the real model behind the real HTTP layer without a cluster.
    """

    def __init__(self, engine, scenarios_dir: Optional[str] = None):
        self.engine = engine
        self.scenarios_dir = scenarios_dir
        self._lock = threading.Lock()

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def generate(self, conversation: Conversation, sampling: dict) -> Completion:
        from themis_ray.config import SamplingConfig

        values = dict(sampling)
        if values.get("seed") is None:
            values["seed"] = random.randrange(2**31)
        try:
            (completion,) = await asyncio.to_thread(
                self._locked, self.engine.generate, [conversation], SamplingConfig(**values)
            )
        except Exception as exc:  # a failure is this request's, as in the Serve deployment
            completion = Completion(error=f"{type(exc).__name__}: {exc}")
        return completion

    async def classify(self, instruction: str) -> tuple[str, float]:
        from themis_ray.classifier.zero_shot import classify

        try:
            ((name, confidence),) = await asyncio.to_thread(
                self._locked, classify, self.engine, [instruction], self.scenarios_dir
            )
        except ValueError as exc:
            raise engine_error(str(exc))
        return name, confidence

    async def score_choices(self, conversation: Conversation, options: list[str]) -> list[float]:
        return raise_scoring_error(await asyncio.to_thread(
            self._locked, score_choices, self.engine, conversation, options))


def score_choices(engine, conversation: Conversation, options: list[str]) -> dict:
    """{"logprobs"} of each option after `conversation`, or {"error", "unsupported"} for this request."""
    try:
        return {"logprobs": engine.choice_logprobs(conversation, options)}
    except NotImplementedError as exc:  # an engine that cannot score given text (openai)
        return {"error": str(exc), "unsupported": True}
    except ValueError as exc:  # e.g. too long for the model: the caller's problem
        return {"error": str(exc)}


def raise_scoring_error(result: dict) -> list[float]:
    if result.get("unsupported"):
        raise APIError(400, f'"rationale": false needs a judge engine that scores text (hf, vllm): {result["error"]}',
                       code="unsupported")
    if result.get("error"):
        raise engine_error(result["error"])
    return result["logprobs"]


@contextmanager
def _backend_failures(what: str):
    """A backend that raises (a dead replica, a timeout) is the server's problem: 503, never a 500.
    An APIError it raises is already the caller's answer."""
    try:
        yield
    except APIError:
        raise
    except Exception as exc:
        log.exception("the %s failed", what)
        raise APIError(503, f"the {what} is unavailable ({type(exc).__name__})", "server_error")


class JudgeService:
    def __init__(self, backend: Backend, settings: ServeSettings):
        self.backend = backend
        self.settings = settings

    # -- backend calls, with failures mapped to statuses --------------------------------------------
    async def _generate_all(self, conversations: list[Conversation], sampling: dict) -> list[Completion]:
        with _backend_failures("judge model"):
            # Sent together so the model deployment can put them in one batch.
            completions = await asyncio.gather(*(self.backend.generate(c, sampling) for c in conversations))
        for completion in completions:
            if completion.error:
                raise engine_error(completion.error)
        return list(completions)

    async def _score_all(self, conversations: list[Conversation], options: list[str]) -> list[list[float]]:
        with _backend_failures("judge model"):
            return list(await asyncio.gather(*(self.backend.score_choices(c, options) for c in conversations)))

    async def _classify(self, instruction: str) -> tuple[str, float]:
        with _backend_failures("scenario classifier"):
            return await self.backend.classify(instruction)

    # -- /v1/judge ----------------------------------------------------------------------------------
    async def judge(self, body: JudgeBody) -> dict:
        s = self.settings
        confidence = None
        if body.scenario is None:
            scenario, confidence = await self._classify(body.instruction)
            source = "classifier"
        else:
            scenario, source = body.scenario, "request"
            try:
                get_scenario(scenario, s.scenarios_dir)
            except KeyError as exc:
                raise APIError(422, str(exc.args[0]), code="unknown_scenario")
        request = body.to_request(scenario)
        orders = [request, judging.swap_pair(request)] if request.mode == "pairwise" else [request]
        try:
            prompts = [judging.render_prompt(r, s.scenarios_dir) for r in orders]
        except (ValueError, KeyError) as exc:
            raise APIError(422, str(exc))
        if body.rationale:
            texts, distribution, usage = await self._judge_in_text(prompts, request)
            evaluations = [judging.parse_evaluation(t, request.mode, request.scale) for t in texts]
        else:
            texts, evaluations, distribution = await self._judge_by_choice(prompts, request)
            usage = None
        first = evaluations[0]
        out: dict = {
            "model": s.model_id,
            "mode": request.mode,
            "scenario": scenario,
            "scenario_source": source,
            "scenario_confidence": confidence,
            "score": None,
            "verdict": None,
            "criterion_scores": first.criterion_scores,
            "explanation": first.explanation,
            "score_distribution": None,
            "expected_score": None,
            "raw": texts[0],
            "error": first.error,
            "usage": usage,
        }
        if request.mode == "pairwise":
            second = evaluations[1]
            verdict, consistent = judging.combine_pairwise(first.verdict, second.verdict)
            errors = [f"{name}: {e.error}" for name, e in (("A-B order", first), ("B-A order", second)) if e.error]
            out.update(
                verdict=verdict,
                consistent=consistent,
                # Each order's verdict as the model gave it (the swapped one names the swapped slots).
                verdicts={"original_order": first.verdict, "swapped_order": second.verdict},
                raw_swapped=texts[1],
                error="; ".join(errors) + " (counted as a tie)" if errors else None,
            )
        else:
            out.update(
                score=first.score,
                score_distribution={str(k): v for k, v in distribution.items()} if distribution else None,
                expected_score=judging.expected_score(distribution),
            )
        return out

    async def _judge_in_text(self, prompts: list[str], request: judging.JudgeRequest):
        """Generated evaluations, stopped once the verdict is out and the rationale has its length ->
        (texts, the score distribution at the `[[n]]` position, usage)."""
        s = self.settings
        sampling = judging.stop_at_verdict(
            SamplingConfig(max_tokens=s.max_tokens, temperature=0.0, top_p=1.0, seed=0, logprobs=JUDGE_TOP_LOGPROBS),
            request.mode, s.rationale_tokens)
        completions = await self._generate_all(
            [judging.build_messages(p, prefill=s.prefill_score) for p in prompts], asdict(sampling)
        )
        distribution = judging.score_distribution(
            completions[0].tokens, completions[0].top_logprobs, request.scale, s.prefill_score
        ) if request.mode != "pairwise" else None
        return [judging.full_text(c.text, s.prefill_score) for c in completions], distribution, _usage(completions)

    async def _judge_by_choice(self, prompts: list[str], request: judging.JudgeRequest):
        """`"rationale": false`: each order's score or verdict read from one forward pass, no text."""
        options = judging.choice_options(request.mode, request.scale)
        scored = await self._score_all([judging.build_messages(p, prefill=True) for p in prompts], options)
        texts, evaluations, distributions = zip(*(judging.evaluation_from_choices(lp, request.mode, request.scale)
                                                  for lp in scored))
        return list(texts), list(evaluations), distributions[0] if request.mode != "pairwise" else None

    # -- /v1/models ---------------------------------------------------------------------------------
    def models(self) -> dict:
        return {
            "object": "list",
            "data": [{"id": self.settings.model_id, "object": "model", "created": 0, "owned_by": "themis-ray"}],
        }

    # -- /v1/chat/completions -----------------------------------------------------------------------
    async def chat(self, body: ChatCompletionBody) -> Union[dict, AsyncIterator[str]]:
        s = self.settings
        if body.model not in s.model_aliases:
            raise APIError(404, f"model {body.model!r} is not served here; this server serves {s.model_id!r}",
                           "invalid_request_error", "model_not_found")
        # The server's cap holds whatever the client asks (as a vLLM server's --max-model-len does).
        max_tokens = min(body.max_completion_tokens or body.max_tokens or s.max_tokens, s.max_tokens)
        top_k = body.top_logprobs or 0
        temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's defaults
        if temperature < GREEDY_BELOW:
            temperature = 0.0  # dividing logits by ~0 overflows them into NaN probabilities
        sampling = {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": 1.0 if body.top_p is None else body.top_p,
            "seed": body.seed,  # None: the model deployment draws one per batch
            "logprobs": max(top_k, 1) if body.logprobs else 0,
        }
        conversation = [m.as_engine_message() for m in body.messages]
        (completion,) = await self._generate_all([conversation], sampling)
        text, tokens, tops, stopped = _apply_stop(completion, body.stop_list())
        finish = "stop" if stopped or completion.completion_tokens < max_tokens else "length"
        logprobs = {"content": _openai_logprobs(tokens, tops, top_k)} if body.logprobs and tokens is not None else None
        usage = _usage([completion])
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": s.model_id}
        if not body.stream:
            return {
                **meta,
                "object": "chat.completion",
                "choices": [
                    {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
                     "finish_reason": finish}
                ],
                "usage": usage,
            }
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return _sse_stream(meta, text, logprobs, finish, usage if include_usage else None)


def _usage(completions: list[Completion]) -> dict:
    prompt = sum(c.prompt_tokens for c in completions)
    generated = sum(c.completion_tokens for c in completions)
    return {"prompt_tokens": prompt, "completion_tokens": generated, "total_tokens": prompt + generated}


def _apply_stop(completion: Completion, stops: list[str]):
    """Cut the text at the first stop string (OpenAI leaves the stop string out)."""
    text, tokens, tops = completion.text, completion.tokens, completion.top_logprobs
    cuts = [i for i in (text.find(stop) for stop in stops) if i >= 0]
    if not cuts:
        return text, tokens, tops, False
    cut = min(cuts)
    if tokens is not None:
        kept, length = 0, 0
        while kept < len(tokens) and length < cut:
            length += len(tokens[kept])
            kept += 1
        tokens, tops = tokens[:kept], (tops or [])[:kept]
    return text[:cut], tokens, tops, True


def _token_entry(token: str, logprob: float) -> dict:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _openai_logprobs(tokens: list[str], tops: Optional[list[dict[str, float]]], k: int) -> list[dict]:
    content = []
    for token, top in zip(tokens, tops or []):
        alternatives = sorted(top.items(), key=lambda item: -item[1])[:k]
        entry = _token_entry(token, top.get(token, UNKNOWN_LOGPROB))
        entry["top_logprobs"] = [_token_entry(t, lp) for t, lp in alternatives]
        content.append(entry)
    return content


async def _sse_stream(meta: dict, text: str, logprobs: Optional[dict], finish: str, usage: Optional[dict]):
    """The completion as OpenAI chunks. The engine is not incremental, so the text comes in one piece."""

    def chunk(delta: dict, finish_reason=None, chunk_logprobs=None, **extra) -> str:
        payload = {
            **meta,
            "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "logprobs": chunk_logprobs, "finish_reason": finish_reason}],
            **extra,
        }
        return f"data: {json.dumps(payload)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    if text:
        yield chunk({"content": text}, chunk_logprobs=logprobs)
    yield chunk({}, finish_reason=finish)
    if usage is not None:
        yield f"data: {json.dumps({**meta, 'object': 'chat.completion.chunk', 'choices': [], 'usage': usage})}\n\n"
    yield "data: [DONE]\n\n"
