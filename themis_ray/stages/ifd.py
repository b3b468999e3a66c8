"""Instruction-following difficulty: IFD(Q, A) = mean CE(A | Q) / mean CE(A), answer tokens only.

Q is the rendered evaluation prompt in its chat template, A the teacher's evaluation. Both passes score
exactly the same answer tokens: the unconditioned pass starts from a single begin token so that A's
first token is scored in both. Nothing is truncated: a record whose prompt and answer do not fit the
engine's `max_model_len` is a reject with that reason, as is one whose losses are not finite.

Both ratios are kept: `ifd` (the loss ratio, what curation uses by default) and `ifd_ppl` (the
perplexity ratio, exp(CE(A | Q) - CE(A))).

Speed: the records are sorted by scenario and mode within windows of `ifd.sort_window_rows` rows (a
streaming map, no all-to-all shuffle: a global sort on a key of a few dozen values would plan as many
partitions as input blocks and still leave them skewed) before they are cut into the actor pool's
batches, so a batch holds records that share their prompt's opening (the evaluation prompt's task,
criteria and tiers, a few hundred tokens). The hf engine's `token_logprobs` runs such a shared
prefix once per group and scores every record's remainder from its cached keys and values, in
length-sorted, left-padded micro-batches closed before padding exceeds a budget (`ifd.micro_batch_size`,
`ifd.max_padding`, `ifd.share_prefix`), computing logits for the answer positions only.
"""

from __future__ import annotations

import math

import pyarrow as pa

from themis_ray import judging
from themis_ray.engines import build_engine, engine_label
from themis_ray.executor import LIGHT_CPUS, RowProcessor, StageContext, Step, StepEngine, run_rows
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


class IFDScorer(RowProcessor):
    stage = "ifd"
    resume_key = ("id", "id")

    def __init__(self, output_schema, engine_cfg, micro_batch_size: int = 1, max_padding: float = 0.1,
                 share_prefix: bool = True):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        # How the engine batches its scoring (engines that schedule their own batches ignore these).
        self.options = {"micro_batch_size": micro_batch_size, "max_padding": max_padding, "share_prefix": share_prefix}

    def process(self, rows: list[dict]) -> list[dict]:
        answers = [r["evaluation"] for r in rows]
        prompts = [judging.build_messages(r["prompt"]) for r in rows]
        conditioned = self.engine.token_logprobs(prompts, answers, **self.options)
        # The unconditioned pass is only needed where the conditioned one worked: it is no longer.
        ok = [i for i, c in enumerate(conditioned) if c.error is None]
        alone = dict(zip(ok, self.engine.token_logprobs([None] * len(ok), [answers[i] for i in ok], **self.options)))
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


def _sorted_window(window: pa.Table) -> pa.Table:
    return window.sort_by([("scenario", "ascending"), ("mode", "ascending")])


def sort_windows(records, window_rows: int):
    """Records sorted by scenario and mode within consecutive windows of `window_rows` rows."""
    return records.map_batches(_sorted_window, batch_format="pyarrow", batch_size=window_rows, num_cpus=LIGHT_CPUS)


def run(ctx: StageContext) -> StageResult:
    c = ctx.cfg.ifd
    source = ctx.input("label")
    rows_in = source.num_rows()
    records = source.dataset()
    if c.sort_batches and c.sort_window_rows > 1:
        # Batches of one scenario and mode share their prompt's opening, which the hf scorer runs once.
        records = sort_windows(records, c.sort_window_rows)
    step = Step(name="ifd", processor=IFDScorer, pool=c.pool, engine=StepEngine(c.engine, "ifd.engine", scores=True),
                args={"engine_cfg": c.engine, "micro_batch_size": c.micro_batch_size, "max_padding": c.max_padding,
                      "share_prefix": c.share_prefix})
    run_rows(records, step, ctx.store, output_schema("ifd", source.schema()), resume=ctx.resume, total=rows_in)
    return StageResult(rows_in=rows_in, extra={"engine": engine_label(c.engine)})
