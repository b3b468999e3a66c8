"""The vLLM engine: generation and prompt scoring at GPU speed, imported only when it is used.

`VLLMEngine` runs vLLM's offline `LLM` inside a Ray actor (the row-wise stages); `AsyncVLLMEngine`
runs its `AsyncLLM` (continuous batching of concurrent requests) inside the judge server's replica.
Both tokenize with the model's chat template exactly as the hf engine does (`chat_prompt_ids`) and hand
vLLM token ids, so all engines continue and score the same tokens.

Scoring given text (IFD, choices) uses vLLM's prompt log-probabilities: prompt and completion go in as
one prompt, one token is generated, and the log-probability vLLM reports at each completion position
is that token's log-probability given everything before it: the hf engine's forward pass, in vLLM.

Nothing here imports vllm at module level, so the CPU install can import this module.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any, Optional

from themis_ray.assets import resolve_model
from themis_ray.engines import (Capabilities, Completion, Conversation, Engine, TokenScores, chat_prompt_ids,
                                check_cluster_gpus, check_device, check_vllm_installed, plan_prompts, plan_scores)


def sampling_params(sampling) -> dict:
    """A SamplingConfig as keyword arguments of vLLM's SamplingParams (also ray.data.llm's row field)."""
    greedy = sampling.temperature <= 0
    params = {
        "max_tokens": int(sampling.max_tokens),
        "temperature": 0.0 if greedy else float(sampling.temperature),
        "top_p": 1.0 if greedy else float(sampling.top_p),
        "seed": int(sampling.seed),
    }
    if sampling.logprobs and sampling.logprobs > 0:
        params["logprobs"] = int(sampling.logprobs)
    return params


# Scoring given text: one throwaway generated token; log-probabilities of the prompt's own tokens.
SCORE_PARAMS = {"max_tokens": 1, "temperature": 0.0, "prompt_logprobs": 0, "detokenize": False}


def engine_args(cfg) -> dict:
    """vLLM engine arguments from an EngineConfig: the model folder, limits, parallelism, extras."""
    path = resolve_model(cfg.model)
    args: dict[str, Any] = {
        "model": path,
        "tokenizer": path,
        "dtype": cfg.dtype,
        "max_model_len": int(cfg.max_model_len),
        "tensor_parallel_size": int(cfg.tensor_parallel_size),
        "seed": 0,
    }
    if cfg.device != "cpu":
        args["gpu_memory_utilization"] = float(cfg.gpu_memory_utilization)
    args.update(plain(cfg.engine_kwargs))
    return args


def plain(value) -> dict:
    """An OmegaConf mapping (or None) as a plain dict."""
    if value is None:
        return {}
    try:
        from omegaconf import OmegaConf

        if OmegaConf.is_config(value):
            return OmegaConf.to_container(value, resolve=True)  # type: ignore[return-value]
    except ImportError:  # pragma: no cover - omegaconf is a core dependency
        pass
    return dict(value)


class _VLLMBase(Engine):
    """What the offline and the async engine share: tokenizing, checking lengths, reading outputs."""

    capabilities = Capabilities(scores_text=True, prefills=True, remote=False, gpus=True, batch_route=True)

    @classmethod
    def preflight(cls, cfg, where: str) -> None:
        check_device(cfg, where)
        check_vllm_installed(where)
        check_cluster_gpus(cfg, where)

    def _setup(self, cfg) -> None:
        from transformers import AutoTokenizer

        self.model_id = cfg.model
        self.max_model_len = int(cfg.max_model_len)
        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model(cfg.model))
        self._special = set(self.tokenizer.all_special_ids)

    # -- text -> ids -----------------------------------------------------------------------------
    def prompt_ids(self, conversation: Optional[Conversation]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, conversation)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    # -- generation: plan, run (offline or async), read ------------------------------------------
    def _plan_generate(self, conversations: list[Conversation], sampling):
        """Per-item errors for prompts too long, and the (index, ids) pairs vLLM is to run."""
        return plan_prompts(self, conversations, sampling.max_tokens)

    def _read_generation(self, results, todo, outputs, top_k: int) -> list[Completion]:
        for (i, ids), output in zip(todo, outputs):
            if isinstance(output, BaseException):
                results[i] = Completion(prompt_tokens=len(ids), error=f"{type(output).__name__}: {output}")
            else:
                results[i] = self._completion(len(ids), output, top_k)
        return results

    def _completion(self, prompt_tokens: int, output, top_k: int) -> Completion:
        out = output.outputs[0]
        ids = list(out.token_ids)
        # The end-of-sequence token vLLM stopped on is not part of the answer (as in the hf engine).
        if ids and out.finish_reason == "stop" and out.stop_reason is None and ids[-1] in self._special:
            ids = ids[:-1]
        tokens = tops = None
        if top_k > 0 and out.logprobs is not None:
            tokens = [self.tokenizer.decode([t]) for t in ids]
            tops = [self._top(step, top_k) for step in list(out.logprobs)[: len(ids)]]
        return Completion(text=out.text, prompt_tokens=prompt_tokens, completion_tokens=len(ids),
                          tokens=tokens, top_logprobs=tops)

    def _top(self, step: dict, k: int) -> dict[str, float]:
        """The k most likely tokens at a step, {text: log-probability}; vLLM adds the sampled token
        to its top k when it ranks lower, the hf engine does not, so it is left out here too."""
        ranked = sorted(step.items(), key=lambda item: item[1].rank if item[1].rank is not None else 1 << 30)
        top: dict[str, float] = {}
        for token_id, logprob in ranked[:k]:
            top.setdefault(self.tokenizer.decode([int(token_id)]), float(logprob.logprob))
        return top

    # -- scoring given text ------------------------------------------------------------------------
    def _plan_scores(self, prompts: list[Optional[Conversation]], completions: list[str]):
        # vLLM generates one token after the prompt it scores: that token needs room too.
        return plan_scores(self, prompts, completions, reserve=1, why=" with the one token vLLM generates")

    @staticmethod
    def _read_scores(results, todo, outputs) -> list[TokenScores]:
        for (i, p, c), output in zip(todo, outputs):
            if isinstance(output, BaseException):
                results[i] = TokenScores(error=f"{type(output).__name__}: {output}", num_prompt_tokens=len(p))
                continue
            ids = p + c
            # prompt_logprobs[j]: {token id: Logprob} at prompt position j (None at j=0); it always holds
            # the prompt's own token there.
            positions = output.prompt_logprobs
            results[i] = TokenScores(
                logprobs=[float(positions[j][ids[j]].logprob) for j in range(len(p), len(ids))],
                num_prompt_tokens=len(p),
            )
        return results

    def _choice_totals(self, scored: list[TokenScores]) -> list[float]:
        for s in scored:
            if s.error:  # as the hf engine: the caller (classifier, label) rejects the record
                raise ValueError(s.error)
        return [sum(s.logprobs) for s in scored]  # type: ignore[arg-type]


class VLLMEngine(_VLLMBase):
    """vLLM's offline engine: one batched call per `generate` or `token_logprobs`."""

    def __init__(self, cfg):
        from vllm import LLM

        self._setup(cfg)
        self.llm = LLM(**engine_args(cfg))

    def _run(self, prompts: list[list[int]], params: dict) -> list:
        """RequestOutputs in order; an item that fails is its exception, never the whole batch's."""
        from vllm import SamplingParams

        if not prompts:
            return []
        sampling = SamplingParams(**params)
        try:
            return list(self.llm.generate([{"prompt_token_ids": p} for p in prompts], sampling, use_tqdm=False))
        except Exception:  # one bad request fails the call: run them one at a time to keep the rest
            outputs: list = []
            for p in prompts:
                try:
                    outputs.append(self.llm.generate([{"prompt_token_ids": p}], sampling, use_tqdm=False)[0])
                except Exception as exc:
                    outputs.append(exc)
            return outputs

    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        results, todo = self._plan_generate(conversations, sampling)
        outputs = self._run([ids for _, ids in todo], sampling_params(sampling))
        return self._read_generation(results, todo, outputs, sampling.logprobs)

    def token_logprobs(self, prompts: list[Optional[Conversation]], completions: list[str],
                       **batching) -> list[TokenScores]:
        results, todo = self._plan_scores(prompts, completions)
        outputs = self._run([p + c for _, p, c in todo], SCORE_PARAMS)
        return self._read_scores(results, todo, outputs)

    def choice_logprobs(self, prompt: Conversation, options: list[str]) -> list[float]:
        # One call for all options: vLLM's prefix cache runs the shared prompt once.
        return self._choice_totals(self.token_logprobs([prompt] * len(options), options))

    def close(self) -> None:
        self.llm = None


class AsyncVLLMEngine(_VLLMBase):
    """vLLM's AsyncLLM: each request joins the running batch as it arrives (the judge server).

    The async methods are the interface; the plain Engine methods run them on the event loop given to
    `bind_loop`, for code that runs in a worker thread beside that loop (the scenario classifier).
    """

    def __init__(self, cfg):
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self._setup(cfg)
        self.engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**engine_args(cfg)))
        self._loop: Optional[asyncio.AbstractEventLoop] = None

    async def _one(self, ids: list[int], params) -> Any:
        final = None
        async for output in self.engine.generate({"prompt_token_ids": ids}, params, uuid.uuid4().hex):
            final = output  # cumulative: the last output holds the whole answer
        return final

    async def _arun(self, prompts: list[list[int]], params: dict) -> list:
        from vllm import SamplingParams

        sampling = SamplingParams(**params)
        return list(await asyncio.gather(*(self._one(p, sampling) for p in prompts), return_exceptions=True))

    async def agenerate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        results, todo = self._plan_generate(conversations, sampling)
        outputs = await self._arun([ids for _, ids in todo], sampling_params(sampling))
        return self._read_generation(results, todo, outputs, sampling.logprobs)

    async def atoken_logprobs(self, prompts: list[Optional[Conversation]], completions: list[str]) -> list[TokenScores]:
        results, todo = self._plan_scores(prompts, completions)
        outputs = await self._arun([p + c for _, p, c in todo], SCORE_PARAMS)
        return self._read_scores(results, todo, outputs)

    # -- the plain Engine interface, from a thread -----------------------------------------------------
    def bind_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def _wait(self, coroutine):
        if self._loop is None or not self._loop.is_running():
            coroutine.close()
            raise RuntimeError("AsyncVLLMEngine: call bind_loop() with the running event loop first")
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        return self._wait(self.agenerate(conversations, sampling))

    def token_logprobs(self, prompts: list[Optional[Conversation]], completions: list[str],
                       **batching) -> list[TokenScores]:
        return self._wait(self.atoken_logprobs(prompts, completions))

    def choice_logprobs(self, prompt: Conversation, options: list[str]) -> list[float]:
        return self._choice_totals(self.token_logprobs([prompt] * len(options), options))

    def close(self) -> None:
        self.engine.shutdown()
