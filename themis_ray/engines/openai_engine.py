"""Any OpenAI-compatible endpoint (OpenAI, a vLLM server, this project's own Serve app).

Requests run concurrently up to `max_concurrency` per engine, across every batch in flight: the
engine's event loop runs on a thread of its own and `generate` may be called from several threads at
once (an actor that takes its next batch while the last requests of the previous one are still out
keeps the endpoint's capacity busy instead of draining it at every batch boundary). A failed request
(429, 5xx, timeout, dropped connection, malformed body) is retried with exponential backoff and
jitter, honouring Retry-After. The backoff sleep happens outside the concurrency slot, so waiting
requests never hold the endpoint's capacity. The API key is read from the environment and never
logged or stored.

Manners at scale:
- the requests in flight adapt to rate limits: a window of answers with a quarter of them 429s halves
  the engine's concurrency (once per burst), a window with fewer grows it back by one up to
  `max_concurrency` (`AdaptiveSlots`);
- `requests_per_minute` / `tokens_per_minute` hold across the Ray cluster: every engine of the same
  endpoint and model reserves its budget from one small named actor (`EndpointBudget`), which also
  spreads a 429's Retry-After to every engine, so N actors do not ask N times over. Outside Ray (or
  without limits) each engine keeps its own budget;
- with a request cache (`cfg.cache`), an answer already paid for is read back instead of asked
  (`themis_ray.engines.cache`), and each new answer is kept before it is returned.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from typing import Optional

import openai

from themis_ray.engines import Capabilities, Completion, Conversation, Engine, Usage
from themis_ray.engines.cache import RequestCache, request_key

log = logging.getLogger(__name__)

_RETRYABLE = (
    openai.RateLimitError,
    openai.APITimeoutError,
    openai.APIConnectionError,
    openai.InternalServerError,
    # A malformed 200 body: the client does not retry it, we do. ValueError covers both invalid JSON
    # (json.JSONDecodeError) and a body that is not UTF-8 (UnicodeDecodeError), which would otherwise
    # escape and fail the whole batch.
    ValueError,
)


class OpenAIEngine(Engine):
    # A chat endpoint answers a new message: it neither continues one nor scores given text.
    capabilities = Capabilities(scores_text=False, prefills=False, remote=True, gpus=False, batch_route=False)

    def __init__(self, cfg):
        base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL")
        api_key = os.environ.get(cfg.api_key_env) or "EMPTY"  # local servers often need none
        self.model_id = cfg.model
        self.max_concurrency = cfg.max_concurrency
        self.max_retries = cfg.max_retries
        self.client = openai.AsyncOpenAI(base_url=base_url, api_key=api_key, timeout=cfg.timeout_s, max_retries=0)
        self.usage = Usage(extra={"cache_hits": 0, "rate_limited": 0})
        self._slots = AdaptiveSlots(self.max_concurrency)  # shared by every generate call
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine-loop", daemon=True)
        self._thread.start()
        self.request_budget = RateLimit(cfg.requests_per_minute)
        self.token_budget = RateLimit(cfg.tokens_per_minute)
        # The cluster's shared budget for this endpoint and model, where there is a limit to share.
        self.shared_budget = None
        if cfg.requests_per_minute or cfg.tokens_per_minute:
            self.shared_budget = shared_budget(f"{base_url}|{cfg.model}", cfg.requests_per_minute,
                                               cfg.tokens_per_minute)
        cache = getattr(cfg, "cache", None)
        self.cache = RequestCache(cache) if cache else None
        # Cache reads and writes are blocking filesystem calls: they run beside the loop, as many at once
        # as requests may be in flight, so a slow object store never stalls the endpoint's slots.
        self._io = ThreadPoolExecutor(max(4, self.max_concurrency), thread_name_prefix="openai-cache") if cache else None

    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        return asyncio.run_coroutine_threadsafe(self._generate_all(conversations, sampling), self._loop).result()

    async def _generate_all(self, conversations, sampling) -> list[Completion]:
        return await asyncio.gather(*(self._generate_one(c, sampling, self._slots) for c in conversations))

    async def _generate_one(self, conversation: Conversation, sampling, slots: "AdaptiveSlots") -> Completion:
        request = self._request(conversation, sampling)
        prefill = conversation[-1]["content"] if conversation[-1]["role"] == "assistant" else ""
        key = request_key("openai", request) if self.cache is not None else None
        if key is not None:
            try:
                kept = await self._loop.run_in_executor(self._io, self.cache.get, key)
            except OSError as err:  # storage that failed to answer: ask the endpoint rather than fail the batch
                log.warning("could not read the request cache %s: %s", self.cache.uri, err)
                kept = None
            if kept is not None:
                self.usage.extra["cache_hits"] += 1
                return Completion(**kept)
        last_error, last_retry_after = "no attempt made", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last_retry_after))  # outside the slot
                self.usage.retries += 1
            last_retry_after = None
            # Wait for the endpoint's budget before taking a slot, so waiting never holds one.
            await self._wait_for_budget(request)
            epoch = await slots.acquire()
            limited = False
            try:
                response = await self.client.chat.completions.create(**request)
                self.usage.requests += 1
                done = self._completion(response, prefill)
                if key is not None:
                    # Kept before the slot is freed: answers paid for but not yet on storage never
                    # outnumber the requests in flight, so a crash re-asks no more than those.
                    await self._keep(key, done)
            except _RETRYABLE as err:
                last_error = _describe(err)
                last_retry_after = _retry_after(err)
                limited = isinstance(err, openai.RateLimitError)
                continue
            except openai.APIStatusError as err:  # 4xx other than 429: asking again will not help
                return Completion(error=_describe(err))
            except (AttributeError, IndexError, TypeError) as err:  # a 200 body without choices
                last_error = f"malformed response: {type(err).__name__}"
                continue
            finally:
                slots.release(epoch, rate_limited=limited)
                if limited:
                    self.usage.extra["rate_limited"] += 1
                    await self._spread_pause(last_retry_after)
            return done
        return Completion(error=f"gave up after {self.max_retries + 1} attempts: {last_error}")

    async def _wait_for_budget(self, request: dict) -> None:
        """The endpoint's budget for one request: the cluster's shared one where limits are set and Ray
        runs (reserved in one call, then waited for here), else this engine's own."""
        tokens = _estimated_tokens(request)
        if self.shared_budget is not None:
            try:
                wait = await self.shared_budget.reserve.remote(1, tokens)
            except Exception as err:  # the budget's actor is gone (its node died): keep going on our own
                log.warning("the shared endpoint budget is unreachable (%s); using this engine's own",
                            type(err).__name__)
                self.shared_budget = None
            else:
                if wait > 0:
                    await asyncio.sleep(wait)
                return
        await self.request_budget.acquire(1)
        await self.token_budget.acquire(tokens)

    async def _spread_pause(self, retry_after: Optional[float]) -> None:
        """A 429's Retry-After, told to every engine of the endpoint through the shared budget."""
        if self.shared_budget is not None and retry_after:
            try:
                await self.shared_budget.pause.remote(retry_after)
            except Exception:
                self.shared_budget = None

    async def _keep(self, key: str, done: Completion) -> None:
        """The answer on the run's storage before it is returned: a failed write costs a warning, never
        the answer."""
        try:
            await self._loop.run_in_executor(self._io, self.cache.put, key,
                                             {k: v for k, v in asdict(done).items() if k != "error"})
        except OSError as err:
            log.warning("could not keep an answer in the request cache %s: %s", self.cache.uri, err)

    def _request(self, conversation: Conversation, sampling) -> dict:
        request = {
            "model": self.model_id,
            "messages": conversation,
            "max_tokens": sampling.max_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "seed": sampling.seed,
        }
        if sampling.logprobs:
            request.update(logprobs=True, top_logprobs=min(sampling.logprobs, 20))
        if conversation[-1]["role"] == "assistant":
            # Continue the assistant's message (vLLM's and our server's extension to the API).
            request["extra_body"] = {"continue_final_message": True, "add_generation_prompt": False}
        return request

    def _completion(self, response, prefill: str) -> Completion:
        choice = response.choices[0]
        text = choice.message.content or ""
        if prefill and text.startswith(prefill):
            text = text[len(prefill):]  # some servers echo the prefill; callers expect only the new text
        tokens = top = None
        if choice.logprobs and choice.logprobs.content:
            tokens = [t.token for t in choice.logprobs.content]
            top = [{alt.token: alt.logprob for alt in t.top_logprobs} for t in choice.logprobs.content]
        usage = response.usage
        prompt_tokens = usage.prompt_tokens if usage else 0
        completion_tokens = usage.completion_tokens if usage else 0
        self.usage.prompt_tokens += prompt_tokens
        self.usage.completion_tokens += completion_tokens
        return Completion(text=text, prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                          tokens=tokens, top_logprobs=top)

    @staticmethod
    def _backoff(attempt: int, retry_after: Optional[float]) -> float:
        if retry_after is not None:
            return retry_after + random.uniform(0, 0.1)
        return min(30.0, 0.25 * 2 ** (attempt - 1)) * random.uniform(0.5, 1.5)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        asyncio.run_coroutine_threadsafe(self.client.close(), self._loop).result()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
        if self._io is not None:
            self._io.shutdown(wait=True)


class AdaptiveSlots:
    """At most `limit` requests in flight, `limit` between 1 and `maximum` (additive increase,
    multiplicative decrease). Responses are counted in windows of `limit`: a window in which 429s
    reach `max(2, limit / 4)` halves the limit, once for the requests sent under it (the rest of that
    burst was sent under the old limit); a window that ends below that grows it by one. An endpoint over its
    limit answers most of a window with 429s and is backed off at once, while a 429 now and then (a
    shared quota's noise) only costs its own Retry-After: halving on every one would hold the requests
    in flight near sqrt(2 / share) whatever the endpoint could take (about 4 at a 10% share).
    Waiters are served first come, first served, one woken per free slot."""

    def __init__(self, maximum: int):
        self.maximum = self.limit = max(1, int(maximum))
        self.in_flight = self.epoch = 0
        self._window = self._limited = 0  # responses and 429s in the current window
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    async def acquire(self) -> int:
        """Wait for a slot; returns the epoch the request was sent under."""
        if self.in_flight < self.limit and not self._waiting:
            self.in_flight += 1
            return self.epoch
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            await turn  # the slot is handed over by `_wake`, already counted
        except asyncio.CancelledError:
            if turn.done() and not turn.cancelled():
                self._release_slot()
            raise
        return self.epoch

    def release(self, epoch: int, rate_limited: bool = False) -> None:
        if epoch == self.epoch:  # responses to requests sent under an older limit are that limit's news
            self._window += 1
            self._limited += rate_limited
            if self._limited >= max(2, self.limit / 4):
                self.limit, self.epoch = max(1, self.limit // 2), self.epoch + 1
                self._window = self._limited = 0
            elif self._window >= self.limit:
                self.limit = min(self.maximum, self.limit + 1)
                self._window = self._limited = 0
        self._release_slot()

    def _release_slot(self) -> None:
        self.in_flight -= 1
        while self._waiting and self.in_flight < self.limit:
            turn = self._waiting.popleft()
            if not turn.done():
                self.in_flight += 1
                turn.set_result(None)


class Budget:
    """Requests and tokens per minute as reservations: each caller takes what it needs now (the level
    may go below zero) and is told how long to wait before sending, so callers queue in order without
    polling. A full bucket lets a burst of one minute's budget through; a pause (a 429's Retry-After)
    holds every caller until it ends."""

    def __init__(self, requests_per_minute: Optional[float], tokens_per_minute: Optional[float],
                 clock=time.monotonic):
        self.clock = clock
        self.buckets = [(float(limit), float(limit) / 60.0) if limit else None
                        for limit in (requests_per_minute, tokens_per_minute)]
        self.levels = [b[0] if b else 0.0 for b in self.buckets]
        self.updated = clock()
        self.paused_until = 0.0

    def reserve(self, requests: float, tokens: float) -> float:
        now = self.clock()
        elapsed, self.updated = now - self.updated, now
        wait = max(0.0, self.paused_until - now)
        for i, (bucket, amount) in enumerate(zip(self.buckets, (requests, tokens))):
            if bucket is None:
                continue
            capacity, rate = bucket
            self.levels[i] = min(capacity, self.levels[i] + elapsed * rate) - min(amount, capacity)
            if self.levels[i] < 0:
                wait = max(wait, -self.levels[i] / rate)
        return wait

    def pause(self, seconds: float) -> None:
        self.paused_until = max(self.paused_until, self.clock() + float(seconds))


def shared_budget(endpoint: str, requests_per_minute, tokens_per_minute):
    """The cluster's one `EndpointBudget` actor for `endpoint` (base URL and model), made by the first
    engine that asks; None outside Ray. It outlives the engine that made it (detached) and restarts if
    its node dies (with a full budget)."""
    import ray

    if not ray.is_initialized():
        return None
    name = "themis-budget-" + hashlib.sha256(f"{endpoint}|{requests_per_minute}|{tokens_per_minute}".encode()).hexdigest()[:16]
    actor = ray.remote(num_cpus=0, max_restarts=-1, max_concurrency=1)(EndpointBudget)
    return actor.options(name=name, namespace="themis-ray", lifetime="detached", get_if_exists=True).remote(
        requests_per_minute, tokens_per_minute)


class EndpointBudget:
    """A `Budget` as a Ray actor: every engine of one endpoint reserves from it."""

    def __init__(self, requests_per_minute, tokens_per_minute):
        self.budget = Budget(requests_per_minute, tokens_per_minute)

    def reserve(self, requests: float, tokens: float) -> float:
        return self.budget.reserve(requests, tokens)

    def pause(self, seconds: float) -> None:
        self.budget.pause(seconds)


class RateLimit:
    """A token bucket refilled continuously at `per_minute`; None means unlimited.

    This engine's own budget, used where no cluster-wide one is (outside Ray).
    """

    def __init__(self, per_minute: Optional[float], clock=time.monotonic, sleep=asyncio.sleep):
        self.rate = per_minute / 60.0 if per_minute else None
        self.capacity = float(per_minute or 0)
        self.level = self.capacity
        self.clock, self.sleep = clock, sleep
        self.updated = clock()

    async def acquire(self, amount: float) -> None:
        if self.rate is None:
            return
        amount = min(amount, self.capacity)  # one oversized request may still pass, alone
        while True:
            now = self.clock()
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate)
            self.updated = now
            if self.level >= amount:
                self.level -= amount
                return
            await self.sleep((amount - self.level) / self.rate)


def _estimated_tokens(request: dict) -> int:
    """Prompt characters / 4 plus the completion budget: what TPM limits count before a reply."""
    chars = sum(len(m.get("content") or "") for m in request["messages"])
    return chars // 4 + int(request.get("max_tokens") or 0)


def _retry_after(err: Exception) -> Optional[float]:
    response = getattr(err, "response", None)
    value = response.headers.get("retry-after") if response is not None else None
    try:
        return min(60.0, float(value)) if value else None
    except ValueError:
        return None


def _describe(err: Exception) -> str:
    """A short error description; never the request (which could carry the key in headers)."""
    status = getattr(err, "status_code", None)
    return f"{type(err).__name__}" + (f" (HTTP {status})" if status else "")
