"""The transformers engine: batched generation and prompt scoring on CPU or GPU."""

from __future__ import annotations

from typing import Optional

import torch

from themis_ray.assets import resolve_model
from themis_ray.engines import Completion, Conversation, Engine, TokenScores, chat_prompt_ids, plan_prompts


class HFEngine(Engine):
    def __init__(self, cfg):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if cfg.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"engine.dtype must be float32, bfloat16 or float16; got {cfg.dtype!r}")
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
        dtype = getattr(torch, cfg.dtype)
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
            generated = self._generate_ids([ids for _, ids in encoded], sampling)
            for (idx, _), completion in zip(encoded, generated):
                results[idx] = completion
        return results  # type: ignore[return-value]

    def _generate_ids(self, rows: list[list[int]], sampling) -> list[Completion]:
        ids, mask = self._left_padded(rows)
        torch.manual_seed(sampling.seed)
        greedy = sampling.temperature <= 0
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
    def token_logprobs(
        self, prompts: list[Optional[Conversation]], completions: list[str], batch_size: int = 8
    ) -> list[TokenScores]:
        results: list[TokenScores] = [TokenScores() for _ in prompts]
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            p, c = self.prompt_ids(prompt), self.text_ids(completion)
            if not c:
                results[i] = TokenScores(error="the completion is empty", num_prompt_tokens=len(p))
            elif len(p) + len(c) > self.max_model_len:
                results[i] = TokenScores(
                    error=f"prompt+completion is {len(p) + len(c)} tokens > max_model_len={self.max_model_len}",
                    num_prompt_tokens=len(p),
                )
            else:
                items.append((i, p, c))
        # Length-sorted micro-batches waste little padding.
        items.sort(key=lambda item: len(item[1]) + len(item[2]))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            for (i, p, _), scores in zip(chunk, self._score_chunk([(p, c) for _, p, c in chunk])):
                results[i] = TokenScores(logprobs=scores, num_prompt_tokens=len(p))
        return results

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

    def _score_chunk(self, pairs: list[tuple[list[int], list[int]]]) -> list[list[float]]:
        ids, mask = self._left_padded([p + c for p, c in pairs])
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding: positions start at each row's 0
        longest = max(len(c) for _, c in pairs)
        # Left padding right-aligns every completion, so only the last `longest + 1` logits matter.
        logits = self.model(
            input_ids=ids, attention_mask=mask, position_ids=positions, logits_to_keep=longest + 1
        ).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)  # position t predicts token t+1
        out = []
        for row, (_, c) in enumerate(pairs):
            target = torch.tensor(c, device=self.device)
            picked = logp[row, longest - len(c) :].gather(-1, target[:, None])[:, 0]
            out.append(picked.tolist())
        return out
