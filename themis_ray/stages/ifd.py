"""Instruction-following difficulty: IFD(Q, A) = mean CE(A | Q) / mean CE(A), answer tokens only.

Q is the rendered evaluation prompt in its chat template, A the teacher's evaluation. Both passes score
exactly the same answer tokens: the unconditioned pass starts from a single begin token so that A's
first token is scored in both. Nothing is truncated: a record whose prompt and answer do not fit the
engine's `max_model_len` is a reject with that reason, as is one whose losses are not finite.

Both ratios are kept: `ifd` (the loss ratio, what curation uses by default) and `ifd_ppl` (the
perplexity ratio, exp(CE(A | Q) - CE(A))).

Speed: the table is sorted by scenario, mode and length before it is cut into the actor pool's batches,
so a batch holds records of similar length that share their prompt's opening (the evaluation prompt's
task, criteria and tiers, a few hundred tokens). With the hf engine, `SharedPrefixScorer` runs such a
shared prefix once per group and scores every record's remainder from its cached keys and values; the
remainders are length-sorted, left-padded, and only the answer positions' logits are computed. The
output is put back in the input's order.
"""

from __future__ import annotations

import copy
import inspect
import math
from functools import partial
from typing import Optional

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import judging
from themis_ray.engines import TokenScores, build_engine
from themis_ray.schema import REJECT, output_schema
from themis_ray.stages import RowProcessor, engine_label, map_rows
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
    """`token_logprobs` for an hf engine that runs a prompt prefix shared by several records only once.

    Records are grouped by the token prefix their prompts share (at least `min_prefix` tokens); a group's
    prefix goes through the model once, and each micro-batch of remainders (rest of the prompt + answer,
    length-sorted, left-padded) continues from a copy of its cached keys and values. Records without a
    long enough shared prefix go through the engine's own batched scoring. Same tokens, same positions,
    same log-probabilities as scoring each record whole.
    """

    def __init__(self, engine, micro_batch_size: int = 8, min_prefix: int = 32):
        self.engine, self.micro_batch_size, self.min_prefix = engine, micro_batch_size, min_prefix

    def token_logprobs(self, prompts: list, completions: list[str]) -> list[TokenScores]:
        engine = self.engine
        results: list[Optional[TokenScores]] = [None] * len(prompts)
        items = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions)):
            p, c = engine.prompt_ids(prompt), engine.text_ids(completion)
            if c and len(p) + len(c) <= engine.max_model_len:
                items.append((i, p, c))
        for group in self._groups(items):
            shared = min(len(_common_prefix([p for _, p, _ in group])), min(len(p) for _, p, _ in group) - 1)
            if len(group) < 2 or shared < self.min_prefix:
                continue  # scored below, by the engine
            for i, p, scores in self._score_group(group, shared):
                results[i] = TokenScores(logprobs=scores, num_prompt_tokens=len(p))
        # The rest, and every error (empty answer, too long), as the engine scores them.
        left = [i for i in range(len(prompts)) if results[i] is None]
        for i, scores in zip(left, engine.token_logprobs([prompts[i] for i in left], [completions[i] for i in left],
                                                         batch_size=self.micro_batch_size)):
            results[i] = scores
        return results  # type: ignore[return-value]

    def _groups(self, items: list) -> list[list]:
        """Consecutive runs (in prompt-id order) whose common prefix stays at least min_prefix long."""
        groups: list[list] = []
        prefix: list[int] = []
        for item in sorted(items, key=lambda item: item[1]):
            if groups and len(_common_prefix([prefix, item[1]])) >= self.min_prefix:
                groups[-1].append(item)
                prefix = _common_prefix([prefix, item[1]])
            else:
                groups.append([item])
                prefix = item[1]
        return groups

    def _score_group(self, group: list, shared: int):
        import torch

        engine = self.engine
        model, device = engine.model, engine.device
        with torch.inference_mode():
            prefix = torch.tensor([group[0][1][:shared]], device=device)
            cache = model(input_ids=prefix, use_cache=True).cache
            chunks = sorted(group, key=lambda item: len(item[1]) + len(item[2]))
            for start in range(0, len(chunks), self.micro_batch_size):
                chunk = chunks[start : start + self.micro_batch_size]
                ids, mask = engine._left_padded([p[shared:] + c for _, p, c in chunk])
                positions = shared + (mask.cumsum(-1) - 1).clamp(min=0)
                full_mask = torch.cat([torch.ones(len(chunk), shared, dtype=mask.dtype, device=device), mask], -1)
                batch_cache = copy.deepcopy(cache)
                batch_cache.batch_repeat_interleave(len(chunk))
                longest = max(len(c) for _, _, c in chunk)
                # Left padding right-aligns every answer, so only the last `longest + 1` logits matter.
                logits = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, cache=batch_cache,
                               logits_to_keep=longest + 1).logits.float()
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

    def __init__(self, output_schema, engine_cfg, micro_batch_size: int = 8, share_prefix: bool = True):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        accepts = "batch_size" in inspect.signature(self.engine.token_logprobs).parameters
        self.score_kwargs = {"batch_size": micro_batch_size} if accepts else {}
        # Prefix sharing needs the model itself: the hf engine.
        shares = share_prefix and all(hasattr(self.engine, a) for a in ("model", "prompt_ids", "_left_padded"))
        self.conditioned = (SharedPrefixScorer(self.engine, micro_batch_size).token_logprobs if shares
                            else partial(self.engine.token_logprobs, **self.score_kwargs))

    def process(self, rows: list[dict]) -> list[dict]:
        answers = [r["evaluation"] for r in rows]
        prompts = [judging.build_messages(r["prompt"]) for r in rows]
        conditioned = self.conditioned(prompts, answers)
        # The unconditioned pass is only needed where the conditioned one worked: it is no longer.
        ok = [i for i, c in enumerate(conditioned) if c.error is None]
        alone = dict(zip(ok, self.engine.token_logprobs([None] * len(ok), [answers[i] for i in ok],
                                                       **self.score_kwargs)))
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


def batch_order(table: pa.Table) -> list[int]:
    """Row indices sorted by scenario, mode, then characters of prompt + evaluation: neighbours share
    their prompt's opening and have similar lengths."""
    lengths = pc.add(pc.utf8_length(pc.fill_null(table["prompt"], "")),
                     pc.utf8_length(pc.fill_null(table["evaluation"], ""))).to_pylist()
    n = table.num_rows
    scenario = table["scenario"].to_pylist() if "scenario" in table.column_names else [""] * n
    mode = table["mode"].to_pylist() if "mode" in table.column_names else [""] * n
    return sorted(range(n), key=lambda i: (scenario[i] or "", mode[i] or "", lengths[i]))


def run(cfg, inputs: dict, staging) -> StageResult:
    source: pa.Table = inputs["label"]
    order = batch_order(source)
    # A position column rides along so the output can be put back in the input's order.
    ordered = source.take(pa.array(order, pa.int64())).append_column(
        "_position", pa.array(order, pa.int64()))
    schema = output_schema("ifd", ordered.schema)
    table = map_rows(ordered, IFDScorer, cfg.ifd.pool, schema=schema, engine_cfg=cfg.ifd.engine,
                     micro_batch_size=cfg.ifd.micro_batch_size, share_prefix=cfg.ifd.share_prefix)
    table = table.take(pc.sort_indices(table["_position"])).drop_columns(["_position"])
    return StageResult(table, rows_in=source.num_rows, extra={"engine": engine_label(cfg.ifd.engine)})
