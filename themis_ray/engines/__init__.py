"""One interface over the models that generate and score text.

An engine knows nothing about judging: it turns conversations into completions and, where it can,
scores a completion's tokens given a prompt. Engines are built inside Ray actors from their config,
never pickled.

A conversation whose last message is from the assistant is a prefill: the engine continues that
message rather than starting a new one.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

Message = dict[str, str]
Conversation = list[Message]


@dataclass
class Completion:
    text: str = ""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    # Per generated token: its text, and the top-k alternatives {token text: log-probability};
    # None when log-probabilities were not asked for.
    tokens: Optional[list[str]] = None
    top_logprobs: Optional[list[dict[str, float]]] = None
    error: Optional[str] = None  # set when this one request failed; the others in a batch still count


@dataclass
class TokenScores:
    """Log-probabilities of each completion token given the prompt (None where it failed)."""

    logprobs: Optional[list[float]] = None
    error: Optional[str] = None
    num_prompt_tokens: int = 0


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0
    requests: int = 0
    retries: int = 0
    extra: dict = field(default_factory=dict)


class Engine(ABC):
    model_id: str

    @abstractmethod
    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        """One completion per conversation, in order; a failure is per item, never per batch."""

    def token_logprobs(
        self, prompts: list[Optional[Conversation]], completions: list[str]
    ) -> list[TokenScores]:
        """Score `completion` tokens after the chat-templated `prompt` (None: no prompt at all)."""
        raise NotImplementedError(
            f"the {type(self).__name__} cannot score given text; use engine kind 'hf' for this stage"
        )

    def choice_logprobs(self, prompt: Conversation, options: list[str]) -> list[float]:
        """Total log-probability of each option as the whole answer to `prompt`."""
        scored = self.token_logprobs([prompt] * len(options), options)
        return [sum(s.logprobs) if s.logprobs is not None else float("-inf") for s in scored]

    def close(self) -> None:
        pass


def build_engine(cfg) -> Engine:
    """Build the engine named by `cfg.kind`; call this inside the actor that will use it."""
    if cfg.kind == "hf":
        from themis_ray.engines.hf import HFEngine

        return HFEngine(cfg)
    if cfg.kind == "openai":
        from themis_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(cfg)
    if cfg.kind == "vllm":
        check_vllm_available()
        raise NotImplementedError("engine kind 'vllm' is not implemented yet; use 'hf' or 'openai'")
    raise ValueError(f"engine.kind must be one of hf, openai, vllm; got {cfg.kind!r}")


def check_vllm_available() -> None:
    """Fail at once, before any actor waits for a GPU that is not there."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            "engine kind 'vllm' needs the vllm extra: pip install 'themis-ray[vllm]' on a GPU machine"
        )
