"""The transformers engine: batched generation and prompt scoring on CPU or GPU."""

from __future__ import annotations

import copy
import re
from typing import Optional

import torch

from themis_ray.assets import resolve_model
from themis_ray.engines import (Capabilities, Completion, Conversation, Engine, TokenScores, chat_prompt_ids,
                                plan_prompts, plan_scores)


class HFEngine(Engine):
    capabilities = Capabilities(scores_text=True, prefills=True, remote=False, gpus=False, batch_route=False)

    def __init__(self, cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.dtype not in ("float32", "bfloat16", "float16", "auto"):
            raise ValueError(f"engine.dtype must be float32, bfloat16, float16 or auto; got {cfg.dtype!r}")
        if cfg.num_threads and cfg.num_threads > 0:
            torch.set_num_threads(cfg.num_threads)
        path = resolve_model(cfg.model)
        self.model_id = cfg.model
        self.max_model_len = cfg.max_model_len
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # bfloat16 also pays on a CPU with AVX512-BF16 or AMX (about 1.7x float32 on this model).
        dtype = fast_dtype() if cfg.dtype == "auto" else getattr(torch, cfg.dtype)
        self.model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()

    # -- text -> ids -----------------------------------------------------------------------------
    def prompt_ids(self, conversation: Optional[Conversation]) -> list[int]:
        """Token ids of a chat-templated conversation, ready for the assistant to write next."""
        return chat_prompt_ids(self.tokenizer, conversation)

    def text_ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _left_padded(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows], device=self.device)
        mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows], device=self.device)
        return ids, mask

    # -- generation ------------------------------------------------------------------------------
    @torch.inference_mode()
    def generate(self, conversations: list[Conversation], sampling) -> list[Completion]:
        results, encoded = plan_prompts(self, conversations, sampling.max_tokens)
        if encoded:
            # Sort by length so each call pads little; results go back to their places.
            encoded.sort(key=lambda item: len(item[1]))
            answer_starts = [_prefill_text(conversations[idx]) for idx, _ in encoded]
            generated = self._generate_ids([ids for _, ids in encoded], sampling, answer_starts)
            for (idx, _), completion in zip(encoded, generated):
                results[idx] = completion
        return results  # type: ignore[return-value]

    def _generate_ids(self, rows: list[list[int]], sampling, answer_starts: Optional[list[str]] = None
                      ) -> list[Completion]:
        ids, mask = self._left_padded(rows)
        torch.manual_seed(sampling.seed)
        greedy = sampling.temperature <= 0
        stopping = None
        if sampling.stop_pattern:
            from transformers import StoppingCriteriaList

            stopping = StoppingCriteriaList([StopAfterMatch(
                self.tokenizer, sampling.stop_pattern, sampling.stop_min_tokens, ids.shape[1],
                answer_starts or [""] * len(rows))])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=sampling.max_tokens,
            do_sample=not greedy,
            temperature=None if greedy else sampling.temperature,
            top_p=None if greedy else sampling.top_p,
            top_k=None,
            pad_token_id=self.tokenizer.pad_token_id,
            return_dict_in_generate=True,
            output_logits=sampling.logprobs > 0,
            stopping_criteria=stopping,
        )
        new_tokens = out.sequences[:, ids.shape[1] :]
        eos = self.model.generation_config.eos_token_id
        stop_ids = {eos} if isinstance(eos, int) else set(eos or [])
        stop_ids |= {self.tokenizer.eos_token_id, self.tokenizer.pad_token_id}
        completions = []
        for row, prompt in zip(range(len(rows)), rows):
            tokens = new_tokens[row].tolist()
            length = next((j for j, t in enumerate(tokens) if t in stop_ids), len(tokens))
            top = texts = None
            if sampling.logprobs > 0:
                top, texts = [], [self.tokenizer.decode([t]) for t in tokens[:length]]
                for step in range(length):
                    logp = torch.log_softmax(out.logits[step][row].float(), dim=-1)
                    values, indices = logp.topk(sampling.logprobs)
                    top.append(
                        {self.tokenizer.decode([int(t)]): float(v) for v, t in zip(values, indices)}
                    )
            completions.append(
                Completion(
                    text=self.tokenizer.decode(tokens[:length], skip_special_tokens=True),
                    prompt_tokens=len(prompt),
                    completion_tokens=length,
                    tokens=texts,
                    top_logprobs=top,
                )
            )
        return completions

    # -- scoring ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def token_logprobs(self, prompts: list[Optional[Conversation]], completions: list[str], micro_batch_size: int = 8,
                       max_padding: float = 0.1, share_prefix: bool = True) -> list[TokenScores]:
        """Scores with the prompt prefix a batch's records share run once (see SharedPrefixScorer)."""
        return SharedPrefixScorer(self, micro_batch_size, max_padding, share_prefix).token_logprobs(prompts, completions)

    @torch.inference_mode()
    def choice_logprobs(self, prompt: Conversation, options: list[str]) -> list[float]:
        # The prompt is shared: run it once and score every option from its cached keys and values.
        p = self.prompt_ids(prompt)
        opts = [self.text_ids(o) for o in options]
        if len(p) + max(len(o) for o in opts) > self.max_model_len:
            raise ValueError(f"prompt has {len(p)} tokens; too long for max_model_len={self.max_model_len}")
        out = self.model(input_ids=torch.tensor([p], device=self.device), use_cache=True)
        first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
        width = max(len(o) for o in opts)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([o + [pad] * (width - len(o)) for o in opts], device=self.device)
        cache = out.cache
        cache.batch_repeat_interleave(len(opts))
        mask = torch.ones(len(opts), len(p) + width, dtype=torch.long, device=self.device)
        logits = self.model(input_ids=ids, attention_mask=mask, cache=cache).logits.float()
        logp = torch.log_softmax(logits, dim=-1)
        totals = []
        for k, o in enumerate(opts):
            # Token 0 comes from the prompt's last position; token j>0 from option position j-1.
            total = first[o[0]].item() + sum(logp[k, j - 1, o[j]].item() for j in range(1, len(o)))
            totals.append(total)
        return totals


def fast_dtype() -> torch.dtype:
    """bfloat16 where this device computes it fast, else float32. On a CPU with AMX a 630-token prefill
    of the embedded model took 0.29 s in bfloat16 against 1.08 s in float32 (benchmarks/judge_profile.py);
    without AMX or AVX512-BF16, bfloat16 matmuls are emulated and slower than float32."""
    if torch.cuda.is_available():
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux: no way to tell, so the safe choice
        return torch.float32
    return torch.bfloat16 if {"amx_bf16", "avx512_bf16"} & set(flags) else torch.float32


def _prefill_text(conversation: Conversation) -> str:
    """What the answer already says when the conversation ends with an assistant message to continue."""
    last = conversation[-1] if conversation else {}
    return last.get("content", "") if last.get("role") == "assistant" else ""


class StopAfterMatch:
    """Per sequence: done once the answer (its prefill + the tokens generated) matches `pattern` and at
    least `min_tokens` tokens were generated. A transformers stopping criterion: `generate` pads a
    finished sequence and stops when all are finished.

    A match never goes away as tokens are added, so each sequence is searched only until it first
    matches (a few hundred characters a step: about 50 µs beside a decode step's ~50 ms).
    """

    def __init__(self, tokenizer, pattern: str, min_tokens: int, prompt_width: int, answer_starts: list[str]):
        self.tokenizer, self.regex = tokenizer, re.compile(pattern)
        self.min_tokens, self.prompt_width, self.answer_starts = max(0, min_tokens), prompt_width, answer_starts
        self.matched = [False] * len(answer_starts)

    def __call__(self, input_ids, scores, **kwargs):
        generated = input_ids[:, self.prompt_width:]
        for row, start in enumerate(self.answer_starts):
            if not self.matched[row]:
                text = start + self.tokenizer.decode(generated[row], skip_special_tokens=True)
                self.matched[row] = self.regex.search(text) is not None
        enough = generated.shape[1] >= self.min_tokens
        return torch.tensor([m and enough for m in self.matched], dtype=torch.bool, device=input_ids.device)


class SharedPrefixScorer:
    """The hf engine's `token_logprobs`: shared prompt prefixes run once, micro-batches waste little padding.

    Records are grouped by the token prefix their prompts share (at least `min_prefix` tokens, as the
    evaluation prompts of one scenario and mode do); a group's prefix goes through the model once, and
    each micro-batch of remainders (rest of the prompt + answer) continues from a copy of its cached keys
    and values. Micro-batches are length-sorted, left-padded, at most `micro_batch_size` records, and
    closed before padding would exceed `max_padding` of their tokens; only the answer positions' logits
    are computed. Same tokens at the same positions as scoring each record whole, so the same
    log-probabilities up to float rounding.
    """

    def __init__(self, engine, micro_batch_size: int = 1, max_padding: float = 0.1, share_prefix: bool = True,
                 min_prefix: int = 32):
        self.engine, self.micro_batch_size, self.max_padding = engine, max(1, micro_batch_size), max_padding
        self.share_prefix, self.min_prefix = share_prefix, min_prefix

    def token_logprobs(self, prompts: list, completions: list[str]) -> list[TokenScores]:
        results, items = plan_scores(self.engine, prompts, completions)
        plain = []  # records without a long enough prefix to share: scored together, from scratch
        for group in self._groups(items) if self.share_prefix else [items]:
            shared = min(len(_common_prefix([p for _, p, _ in group])), min(len(p) for _, p, _ in group) - 1)
            if self.share_prefix and len(group) > 1 and shared >= self.min_prefix:
                for i, p, scores in self._score(group, shared):
                    results[i] = TokenScores(logprobs=scores, num_prompt_tokens=len(p))
            else:
                plain += group
        for i, p, scores in self._score(plain, 0) if plain else ():
            results[i] = TokenScores(logprobs=scores, num_prompt_tokens=len(p))
        return results  # type: ignore[return-value]

    def _groups(self, items: list) -> list[list]:
        """Items in prompt-id order, cut into groups that each share one prefix, to save the most tokens.

        A group of n sharing s tokens saves (n - 1) * s (when s >= min_prefix). A run is split where its
        neighbours share the least, when its two halves save more apart than together: so records of
        one scenario keep their long common prefix rather than the few tokens all prompts share.
        """
        items = sorted(items, key=lambda item: item[1])
        neighbours = [len(_common_prefix([a[1], b[1]])) for a, b in zip(items, items[1:])]

        def shared(lo: int, hi: int) -> int:
            return min(min(neighbours[lo:hi - 1]), min(len(item[1]) for item in items[lo:hi]) - 1)

        def saving(lo: int, hi: int) -> int:
            s = shared(lo, hi) if hi - lo > 1 else 0
            return (hi - lo - 1) * s if s >= self.min_prefix else 0

        def split(lo: int, hi: int) -> list[tuple[int, int]]:
            if hi - lo < 2:
                return [(lo, hi)]
            cut = lo + 1 + min(range(hi - lo - 1), key=lambda k: neighbours[lo + k])
            parts = split(lo, cut) + split(cut, hi)
            return [(lo, hi)] if saving(lo, hi) >= sum(saving(a, b) for a, b in parts) else parts

        return [items[lo:hi] for lo, hi in split(0, len(items))] if items else []

    def micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """Indices into `lengths`, shortest first, cut so no batch exceeds its size or padding budget."""
        batches: list[list[int]] = []
        for k in sorted(range(len(lengths)), key=lambda k: lengths[k]):
            if batches and len(batches[-1]) < self.micro_batch_size:
                members = batches[-1] + [k]
                width = lengths[k]  # the longest so far: sorted ascending
                padding = sum(width - lengths[j] for j in members) / (width * len(members))
                if padding <= self.max_padding:
                    batches[-1].append(k)
                    continue
            batches.append([k])
        return batches

    def _score(self, group: list, shared: int):
        """(index, prompt ids, answer log-probabilities) for each item of the group."""
        engine = self.engine
        model, device = engine.model, engine.device
        with torch.inference_mode():
            cache = None
            if shared:
                cache = model(input_ids=torch.tensor([group[0][1][:shared]], device=device), use_cache=True).cache
            rests = [p[shared:] + c for _, p, c in group]
            for batch in self.micro_batches([len(r) for r in rests]):
                chunk = [group[k] for k in batch]
                ids, mask = engine._left_padded([rests[k] for k in batch])
                positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: each row from 0
                kwargs = {}
                if cache is not None:
                    kwargs["cache"] = copy.deepcopy(cache)
                    kwargs["cache"].batch_repeat_interleave(len(chunk))
                    mask = torch.cat([torch.ones(len(chunk), shared, dtype=mask.dtype, device=device), mask], -1)
                longest = max(len(c) for _, _, c in chunk)
                # Left padding right-aligns every answer, so only the last `longest + 1` logits matter.
                logits = model(input_ids=ids, attention_mask=mask, position_ids=positions,
                               logits_to_keep=longest + 1, **kwargs).logits.float()
                logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
                for row, (i, p, c) in enumerate(chunk):
                    target = torch.tensor(c, device=device)
                    yield i, p, logp[row, longest - len(c):].gather(-1, target[:, None])[:, 0].tolist()


def _common_prefix(seqs: list[list[int]]) -> list[int]:
    first = seqs[0]
    n = len(first)
    for s in seqs[1:]:
        n = min(n, len(s))
        for k in range(n):
            if s[k] != first[k]:
                n = k
                break
    return first[:n]
