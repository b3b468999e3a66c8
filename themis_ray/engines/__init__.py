"""One interface over the models that generate and score text.

An engine knows nothing about judging: it turns conversations into completions and, where it can,
scores a completion's tokens given a prompt. Engines are built inside Ray actors from their config,
never pickled.

A conversation whose last message is from the assistant is a prefill: the engine continues that
message rather than starting a new one.

What an engine can do is data on its class (`Capabilities`): the executor, the stages and the server
ask `capabilities(cfg)`, never the engine's kind. A new engine is its module, its class with its
capabilities, and its line in `ENGINES`.

A message's content is text, never control: the engines that tokenize themselves break every special
token of the tokenizer that appears in it (`plain_conversation`), so a `<|im_start|>` inside a
message cannot open a turn of its own. Only the chat template writes control tokens.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import lru_cache
from typing import ClassVar, Optional

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


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do, declared by each engine class."""

    scores_text: bool  # token_logprobs / choice_logprobs: the log-probabilities of given text
    prefills: bool  # continues an assistant message (a score prefilled as "[[")
    remote: bool  # calls an endpoint: no model folder, and its batches wait on the network
    gpus: bool  # needs tensor_parallel_size GPUs (unless its device is cpu), checked on the driver
    batch_route: bool  # whole-stage generation runs through ray.data.llm, not an engine per actor


# kind -> "module:class"; imported only when asked for, so no engine's dependencies load with this module.
ENGINES = {"hf": "themis_ray.engines.hf:HFEngine", "openai": "themis_ray.engines.openai_engine:OpenAIEngine",
           "vllm": "themis_ray.engines.vllm_engine:VLLMEngine"}


def engine_class(kind: str) -> type[Engine]:
    if kind not in ENGINES:
        raise ValueError(f"engine.kind must be one of {', '.join(ENGINES)}; got {kind!r}")
    module, name = ENGINES[kind].split(":")
    return getattr(importlib.import_module(module), name)


def capabilities(cfg) -> Capabilities:
    return engine_class(cfg.kind).capabilities


def check_scores_text(cfg, key: str, who: str) -> None:
    """Fail on the driver when `who` must score given text with an engine that cannot."""
    if not capabilities(cfg).scores_text:
        able = [kind for kind in ENGINES if engine_class(kind).capabilities.scores_text]
        raise ValueError(f"{who} scores given text by log-probability, which a {cfg.kind!r} engine cannot do; "
                         f"set {key}.kind to {' or '.join(able)}")


class Engine(ABC):
    model_id: str
    capabilities: ClassVar[Capabilities]

    @classmethod
    def preflight(cls, cfg, where: str) -> None:
        """On the driver: fail at once if an engine of `cfg` cannot run (nothing to check by default)."""

    @abstractmethod
    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        """One completion per conversation, in order; a failure is per item, never per batch."""

    def token_logprobs(
        self, prompts: list[Optional[Conversation]], completions: list[str], **batching
    ) -> list[TokenScores]:
        """Score `completion` tokens after the chat-templated `prompt` (None: no prompt at all).

        `batching` (micro_batch_size, max_padding, share_prefix) tunes engines that batch the scoring
        themselves (hf); engines that schedule their own batches ignore it."""
        raise NotImplementedError(
            f"the {type(self).__name__} cannot score given text; use engine kind 'hf' for this stage"
        )

    def choice_logprobs(self, prompt: Conversation, options: list[str]) -> list[float]:
        """Total log-probability of each option as the whole answer to `prompt`."""
        scored = self.token_logprobs([prompt] * len(options), options)
        return [sum(s.logprobs) if s.logprobs is not None else float("-inf") for s in scored]

    def close(self) -> None:
        pass


BREAK = "\u200b"  # a zero-width space: a special token's text with it inside is plain text


@lru_cache(maxsize=8)
def _special_pattern(tokens: tuple[str, ...]) -> Optional[re.Pattern]:
    tokens = tuple(t for t in tokens if len(t) > 1)
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))) if tokens else None


def plain_text(tokenizer, text: str) -> str:
    """`text` with every special token of `tokenizer` broken by a zero-width space after its first
    character: it still reads the same, and tokenizes as text instead of as the control token."""
    special = set(tokenizer.all_special_tokens)
    special.update(t.content for t in getattr(tokenizer, "added_tokens_decoder", {}).values() if t.special)
    pattern = _special_pattern(tuple(sorted(special)))
    if pattern is None or not text:
        return text
    return pattern.sub(lambda m: m.group(0)[0] + BREAK + m.group(0)[1:], text)


def plain_conversation(tokenizer, conversation: Conversation) -> Conversation:
    """The conversation with `plain_text` content: only the chat template writes control tokens."""
    return [{**m, "content": plain_text(tokenizer, m["content"])} if isinstance(m.get("content"), str) else m
            for m in conversation]


def chat_prompt_ids(tokenizer, conversation: Optional[Conversation]) -> list[int]:
    """Token ids of a chat-templated conversation, ready for the assistant to write next.

    Shared by the engines that tokenize themselves (hf, vllm), so both score and continue the same ids.
    """
    if conversation is None:
        # No prompt: start from a single begin token so the first answer token is scored too.
        start = tokenizer.bos_token_id
        return [start if start is not None else tokenizer.eos_token_id]
    prefill = conversation[-1]["role"] == "assistant"
    text = tokenizer.apply_chat_template(
        plain_conversation(tokenizer, conversation),
        tokenize=False,
        add_generation_prompt=not prefill,
        continue_final_message=prefill,
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def plan_prompts(engine, conversations: list[Conversation], max_tokens: int):
    """Tokenize each conversation; one too long for `engine.max_model_len` with `max_tokens` to write
    becomes that item's error. Returns (results with those errors, [(index, ids)] still to run)."""
    results: list[Optional[Completion]] = [None] * len(conversations)
    todo = []
    for i, conv in enumerate(conversations):
        ids = engine.prompt_ids(conv)
        if len(ids) + max_tokens > engine.max_model_len:
            results[i] = Completion(
                prompt_tokens=len(ids),
                error=f"prompt has {len(ids)} tokens; with max_tokens={max_tokens} "
                f"that exceeds max_model_len={engine.max_model_len}",
            )
        else:
            todo.append((i, ids))
    return results, todo


def build_engine(cfg, where: str = "engine") -> Engine:
    """Build the engine named by `cfg.kind`; call this inside the actor that will use it."""
    if cfg.kind == "vllm":
        check_vllm_installed(where)  # a clear error naming the extra, not an ImportError from inside vLLM
    return engine_class(cfg.kind)(cfg)


# -- vllm preflight: checked on the driver before any actor is asked for, so nothing waits forever ---

VLLM_INSTALL = "pip install 'themis-ray[vllm]'"


def check_vllm_installed(where: str = "engine") -> None:
    """Fail at once when vLLM is not installed (found without importing it)."""
    if importlib.util.find_spec("vllm") is None:
        raise RuntimeError(
            f"{where}.kind is 'vllm' but vLLM is not installed; install the extra on a machine with "
            f"NVIDIA GPUs: {VLLM_INSTALL} (or use {where}.kind=hf)"
        )


def gpus_per_engine(cfg) -> int:
    """GPUs one engine of `cfg` needs: tensor_parallel_size for vllm on GPUs, else none."""
    if not capabilities(cfg).gpus or getattr(cfg, "device", "cuda") == "cpu":
        return 0
    return max(1, int(getattr(cfg, "tensor_parallel_size", 1) or 1))


def check_vllm_gpus(cfg, cluster_resources: dict, where: str = "engine") -> None:
    """Fail at once when the Ray cluster has fewer GPUs than one vllm engine needs.

    A vLLM actor asking for a GPU on a GPU-less cluster waits for one forever, without an error.
    """
    needed = gpus_per_engine(cfg)
    have = float(cluster_resources.get("GPU", 0) or 0)
    if needed and have < needed:
        raise RuntimeError(
            f"{where}.kind is 'vllm' with tensor_parallel_size={needed}: it needs {needed} "
            f"GPU(s) but the Ray cluster has {have:g} GPU(s). Connect to a cluster with GPUs (ray.address), or use "
            f"{where}.kind=hf on CPU ({where}.device=cpu only with a CPU build of vLLM)"
        )


def preflight(cfg, where: str = "engine") -> None:
    """On the driver, before a stage or server asks Ray for an engine: fail at once if it cannot run."""
    engine_class(cfg.kind).preflight(cfg, where)


def check_device(cfg, where: str) -> None:
    device = getattr(cfg, "device", "cuda")
    if device not in ("cuda", "cpu"):
        raise ValueError(f"{where}.device must be 'cuda' or 'cpu'; got {device!r}")


def check_cluster_gpus(cfg, where: str) -> None:
    """Enough GPUs in the connected cluster for one engine of `cfg`."""
    import ray

    # An autoscaling cluster whose GPU nodes start at zero shows no GPU yet: THEMIS_WAIT_FOR_GPUS=1 there.
    if ray.is_initialized() and os.environ.get("THEMIS_WAIT_FOR_GPUS") != "1":
        check_vllm_gpus(cfg, ray.cluster_resources(), where)


def plan_scores(engine, prompts: list[Optional[Conversation]], completions: list[str], reserve: int = 0,
                why: str = ""):
    """Tokenize each (prompt, completion); an empty completion, or one whose tokens with `reserve` more
    exceed `engine.max_model_len`, becomes that item's error. Returns (results with those errors,
    [(index, prompt ids, completion ids)] still to score). Shared by the engines that tokenize."""
    results: list[Optional[TokenScores]] = [None] * len(prompts)
    todo = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions)):
        p, c = engine.prompt_ids(prompt), engine.text_ids(completion)
        if not c:
            results[i] = TokenScores(error="the completion is empty", num_prompt_tokens=len(p))
        elif len(p) + len(c) + reserve > engine.max_model_len:
            results[i] = TokenScores(error=f"prompt+completion is {len(p) + len(c)} tokens{why}; that exceeds "
                                           f"max_model_len={engine.max_model_len}", num_prompt_tokens=len(p))
        else:
            todo.append((i, p, c))
    return results, todo


def engine_label(cfg, full_path: bool = False) -> str:
    """"kind:model" (the model folder's name, or its whole path), the engine's name in manifests,
    metrics and tables."""
    model = str(cfg.model) if full_path else os.path.basename(str(cfg.model).rstrip("/"))
    return f"{cfg.kind}:{model}"


def continues_assistant_message(cfg) -> bool:
    """Whether the engine can continue an assistant message (a score prefilled as "[["): local
    engines can; remote chat APIs answer a new message instead."""
    return capabilities(cfg).prefills


def loads_local_weights(cfg) -> bool:
    """Whether the engine loads a model folder (which must then exist), rather than calling an endpoint."""
    return not capabilities(cfg).remote


def build_serving_engine(cfg, where: str = "serve.engine") -> tuple[Engine, bool]:
    """The engine a server replica holds, and whether it batches concurrent requests itself (vLLM's
    AsyncLLM, continuous batching) so the server must not batch them again."""
    if cfg.kind == "vllm":
        check_vllm_installed(where)
        from themis_ray.engines.vllm_engine import AsyncVLLMEngine

        return AsyncVLLMEngine(cfg), True
    return build_engine(cfg, where), False


def batches_in_flight(cfg) -> int:
    """How many batches one actor may run at once with this engine. A remote endpoint's requests wait
    on the network, and a batch is done only when its slowest request is (a hang, a retry after a 429):
    with several batches in flight, one waiting on a straggler leaves the engine's slots to the others
    (the engine still caps the requests in flight at max_concurrency). A local model runs one batch."""
    return max(2, int(cfg.max_concurrency) // 2) if capabilities(cfg).remote else 1


def batch_generation_route(cfg) -> bool:
    """True when whole-stage generation should run through Ray's own batch path (ray.data.llm's vLLM
    processor) instead of an engine built inside each actor."""
    return capabilities(cfg).batch_route
