"""Any OpenAI-compatible endpoint (OpenAI, a vLLM server, this project's own Serve app).

Requests run concurrently up to `max_concurrency` per engine, across every batch in flight: the
engine's event loop runs on a thread of its own and `generate` may be called from several threads at
once (an actor that takes its next batch while the last requests of the previous one are still out
keeps the endpoint's capacity busy instead of draining it at every batch boundary). A failed request
(429, 5xx, timeout, dropped connection, malformed body) is retried with exponential backoff and
jitter, honouring Retry-After. The backoff sleep happens outside the concurrency slot, so waiting
requests never hold the endpoint's capacity. The API key is read from the environment and never
logged or stored.
"""

from __future__ import annotations

import asyncio
import os
import random
import threading
import time
from typing import Optional

import openai

from themis_ray.engines import Capabilities, Completion, Conversation, Engine, Usage

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
        self.usage = Usage()
        self._slots = asyncio.Semaphore(self.max_concurrency)  # shared by every generate call
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="openai-engine-loop", daemon=True)
        self._thread.start()
        self.request_budget = RateLimit(cfg.requests_per_minute)
        self.token_budget = RateLimit(cfg.tokens_per_minute)

    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        return asyncio.run_coroutine_threadsafe(self._generate_all(conversations, sampling), self._loop).result()

    async def _generate_all(self, conversations, sampling) -> list[Completion]:
        return await asyncio.gather(*(self._generate_one(c, sampling, self._slots) for c in conversations))

    async def _generate_one(self, conversation: Conversation, sampling, slots) -> Completion:
        request = self._request(conversation, sampling)
        prefill = conversation[-1]["content"] if conversation[-1]["role"] == "assistant" else ""
        last_error, last_retry_after = "no attempt made", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                await asyncio.sleep(self._backoff(attempt, last_retry_after))  # outside the slot
                self.usage.retries += 1
            last_retry_after = None
            # Wait for the endpoint's budget before taking a slot, so waiting never holds one.
            await self.request_budget.acquire(1)
            await self.token_budget.acquire(_estimated_tokens(request))
            async with slots:
                try:
                    response = await self.client.chat.completions.create(**request)
                    self.usage.requests += 1
                    return self._completion(response, prefill)
                except _RETRYABLE as err:
                    last_error = _describe(err)
                    last_retry_after = _retry_after(err)
                except openai.APIStatusError as err:  # 4xx other than 429: asking again will not help
                    return Completion(error=_describe(err))
                except (AttributeError, IndexError, TypeError) as err:  # a 200 body without choices
                    last_error = f"malformed response: {type(err).__name__}"
        return Completion(error=f"gave up after {self.max_retries + 1} attempts: {last_error}")

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


class RateLimit:
    """A token bucket refilled continuously at `per_minute`; None means unlimited.

    The limit is per engine (per actor): give each actor its share of the account's limit.
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
