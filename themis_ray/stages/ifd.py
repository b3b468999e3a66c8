"""Instruction-following difficulty: IFD(Q, A) = mean CE(A | Q) / mean CE(A), answer tokens only.

Q is the rendered evaluation prompt in its chat template, A the teacher's evaluation. Both passes score
exactly the same answer tokens: the unconditioned pass starts from a single begin token so that A's
first token is scored in both. Nothing is truncated: a record whose prompt and answer do not fit the
engine's `max_model_len` is a reject with that reason, as is one whose losses are not finite.

Both ratios are kept: `ifd` (the loss ratio, what curation uses by default) and `ifd_ppl` (the
perplexity ratio, exp(CE(A | Q) - CE(A))).

Speed: the records are sorted by scenario and mode (a Ray Data sort, `ifd.sort_batches`) before they are
cut into the actor pool's batches, so a batch holds records that share their prompt's opening (the evaluation prompt's
task, criteria and tiers, a few hundred tokens). With the hf engine, `SharedPrefixScorer` runs such a
shared prefix once per group and scores every record's remainder from its cached keys and values, in
length-sorted, left-padded micro-batches closed before padding exceeds a budget, computing logits
for the answer positions only. The model runs under `torch.inference_mode`.
"""

from __future__ import annotations

import copy
import math
from typing import Optional

from themis_ray import judging
from themis_ray.engines import TokenScores, build_engine, engine_label
from themis_ray.executor import RowProcessor, StageContext, run_rows
from themis_ray.schema import REJECT, output_schema
from themis_ray.store import StageResult


def ifd_from_logprobs(conditioned: list[float], unconditioned: list[float]) -> dict:
    """The IFD columns of one record from the answer's token log-probabilities in both passes."""
    if len(conditioned) != len(unconditioned):
        raise ValueError(f"passes scored {len(conditioned)} vs {len(unconditioned)} answer tokens")
    if not conditioned:
        raise ValueError("no answer tokens to score")
    ce_q = -sum(conditioned) / len(conditioned)
    ce_a = -sum(unconditioned) / len(unconditioned)
    return {"ce_conditioned": ce_q, "ce_answer": ce_a, "ifd": ce_q / ce_a if ce_a > 0 else math.inf,
            "ifd_ppl": math.exp(ce_q - ce_a), "answer_tokens": len(conditioned)}


class SharedPrefixScorer:
    """`token_logprobs` for an hf engine: shared prompt prefixes run once, micro-batches waste little padding.

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
        engine = self.engine
        results: list[Optional[TokenScores]] = [None] * len(prompts)
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            p, c = engine.prompt_ids(prompt), engine.text_ids(completion)
            if c and len(p) + len(c) <= engine.max_model_len:
                items.append((i, p, c))
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
        # What could not be scored (an empty answer, too long) gets the engine's own reason.
        failed = [i for i in range(len(prompts)) if results[i] is None]
        for i, scores in zip(failed, engine.token_logprobs([prompts[i] for i in failed], [completions[i] for i in failed])):
            results[i] = scores
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
        import torch

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


class IFDScorer(RowProcessor):
    stage = "ifd"
    resume_key = ("id", "id")

    def __init__(self, output_schema, engine_cfg, micro_batch_size: int = 1, max_padding: float = 0.1,
                 share_prefix: bool = True):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        if all(hasattr(self.engine, a) for a in ("model", "prompt_ids", "_left_padded")):  # the hf engine
            scorer = SharedPrefixScorer(self.engine, micro_batch_size, max_padding, share_prefix)
            self.conditioned = self.unconditioned = scorer.token_logprobs
        else:
            self.conditioned = self.unconditioned = self.engine.token_logprobs

    def process(self, rows: list[dict]) -> list[dict]:
        answers = [r["evaluation"] for r in rows]
        prompts = [judging.build_messages(r["prompt"]) for r in rows]
        conditioned = self.conditioned(prompts, answers)
        # The unconditioned pass is only needed where the conditioned one worked: it is no longer.
        ok = [i for i, c in enumerate(conditioned) if c.error is None]
        alone = dict(zip(ok, self.unconditioned([None] * len(ok), [answers[i] for i in ok])))
        out = []
        for i, (row, c) in enumerate(zip(rows, conditioned)):
            a = alone.get(i)
            error = c.error or (a.error if a is not None else None)
            if error:
                out.append({**row, REJECT: f"cannot score: {error}"})
                continue
            columns = ifd_from_logprobs(c.logprobs, a.logprobs)
            if not all(math.isfinite(columns[k]) for k in ("ce_conditioned", "ce_answer")):
                out.append({**row, REJECT: "cannot score: the model's losses are not finite"})
            elif columns["ce_answer"] <= 0:
                out.append({**row, REJECT: "cannot score: the answer alone has zero loss (IFD undefined)"})
            else:
                out.append({**row, **columns, REJECT: None})
        return out


def run(ctx: StageContext) -> StageResult:
    c = ctx.cfg.ifd
    source = ctx.input("label")
    records = source.dataset()
    if c.sort_batches:
        # Batches of one scenario and mode share their prompt's opening, which the hf scorer runs once.
        records = records.sort(["scenario", "mode"])
    run_rows(records, IFDScorer, c.pool, ctx.store, output_schema("ifd", source.schema()), resume=ctx.resume,
             engine_cfg=c.engine, micro_batch_size=c.micro_batch_size, max_padding=c.max_padding,
             share_prefix=c.share_prefix)
    return StageResult(rows_in=source.num_rows(), extra={"engine": engine_label(c.engine)})
