"""Teacher labeling: each response judged through its scenario's five-part evaluation prompt.

A closed-ended scenario with a reference answer is graded against the reference; the rest are graded
on their own. An answer without a parsable overall score is asked again (sampled) up to
`max_attempts` times, then kept as a reject with the raw text.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import replace

import pyarrow as pa
import pyarrow.compute as pc

from themis_ray import judging, prompts
from themis_ray.engines import build_engine, engine_label
from themis_ray.engines.cache import cache_folder, with_cache
from themis_ray.executor import RowProcessor, StageContext, Step, StepEngine, map_groups, run_rows, write
from themis_ray.schema import REJECT, REJECT_CODE, output_schema, rejected, stable_id
from themis_ray.store import StageResult, StageStore


class Labeler(RowProcessor):
    stage = "label"
    resume_key = ("id", "response_id")
    one_row_per_input = True
    judge_column = "teacher"  # the column naming the engine that judged the row

    def __init__(self, output_schema, engine_cfg, sampling, score_by, calibrate, prefill, max_attempts,
                 retry_temperature, scenarios_dir, scale=(1, 5), criteria=None, rationale=True, rationale_tokens=None):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.teacher = engine_label(engine_cfg)
        # A rating scale and criteria of the caller's own replace the scenario's 1-5 and its criteria.
        self.scale = judging.RatingScale(int(scale[0]), int(scale[1]))
        self.criteria = ([judging.Criterion(name=str(c["name"]), description=str(c["description"])) for c in criteria]
                         if criteria else None)
        # Without a rationale the score is chosen by log-probability and is the whole answer.
        self.rationale, self.rationale_tokens = rationale, rationale_tokens
        self.sampling, self.score_by, self.prefill = sampling, score_by if rationale else "choice", prefill
        self.calibration = judging.Calibration(lambda prompt, mode: self._score_logprobs(prompt), self.scale,
                                               self.criteria, scenarios_dir) if calibrate else None
        self.max_attempts, self.retry_temperature = max_attempts, retry_temperature
        self.scenarios_dir = scenarios_dir
        self.usd_per_1k = (float(getattr(engine_cfg, "usd_per_1k_prompt_tokens", 0) or 0),
                           float(getattr(engine_cfg, "usd_per_1k_completion_tokens", 0) or 0))

    def process(self, rows: list[dict]) -> list[dict]:
        out: dict[int, dict] = {}
        pending: dict[int, dict] = {}
        for i, row in enumerate(rows):
            try:
                request = judging.request_from_row(row, self.scenarios_dir, mode=row.get("mode"), scale=self.scale,
                                                   criteria=self.criteria)
                mode, prompt, error = request.mode, judging.render_prompt(request, self.scenarios_dir), None
            except (ValueError, KeyError) as err:
                mode, prompt, error = row.get("mode") or "single", None, err
            base = {**row, "id": stable_id(row["id"], "label", mode), "response_id": row["id"], "mode": mode,
                    self.judge_column: self.teacher, "prompt": prompt}
            if error is not None:
                out[i] = {**base, **rejected("bad_record", f"bad record: {error}")}
                continue
            pending[i] = base
        if self.score_by == "choice":
            self._choose_scores(pending, out)
        if not self.rationale:
            for i in list(pending):
                row = pending.pop(i)
                dist = row.pop("_distribution")
                out[i] = {**row, "attempts": 1, "completion_tokens": 0, "evaluation": self._answer_start(row),
                          "score": float(row["_score"]),
                          "criterion_scores": [], "score_distribution": list(dist.values()),
                          "expected_score": judging.expected_score(dist), REJECT: None, REJECT_CODE: None}
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            sampling = self._sampling("single", attempt)
            order = list(pending)
            messages = [self._messages(pending[i]) for i in order]
            for i, done in zip(order, self.engine.generate(messages, sampling)):
                row = pending[i]
                row["attempts"] = attempt
                row["prompt_tokens"] = (row.get("prompt_tokens") or 0) + done.prompt_tokens
                row["completion_tokens"] = (row.get("completion_tokens") or 0) + done.completion_tokens
                row["cost_usd"] = self._cost(row["prompt_tokens"], row["completion_tokens"])
                text = self._answer_start(row) + done.text
                parsed = judging.parse_evaluation(text, "single", self.scale)
                if done.error or not parsed.ok:
                    row["evaluation"] = text  # kept as the raw answer if this was the last attempt
                    row.update(_failure(done, parsed))
                    continue
                dist = row.pop("_distribution", None) or judging.score_distribution(
                    done.tokens, done.top_logprobs, self.scale, prefill=self.prefill)
                out[i] = {**row, "evaluation": text, "score": parsed.score,
                          "criterion_scores": parsed.criterion_scores,
                          "score_distribution": list(dist.values()) if dist else None,
                          "expected_score": judging.expected_score(dist), REJECT: None, REJECT_CODE: None}
                del pending[i]
        for row in pending.values():  # what is still pending failed every attempt: keep its last reason
            row.pop("_distribution", None)
        out.update(pending)
        return [out[i] for i in range(len(rows))]

    def _sampling(self, mode: str, attempt: int):
        """The first attempt greedy as configured, retries sampled; stopped once the verdict is out and
        the rationale has `rationale_tokens` tokens."""
        sampling = self.sampling if attempt == 1 else replace_sampling(self.sampling, self.retry_temperature, attempt)
        return judging.stop_at_verdict(sampling, mode, self.rationale_tokens)

    def _cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """What the record's tokens (every attempt's) cost at the engine's prices."""
        return (prompt_tokens * self.usd_per_1k[0] + completion_tokens * self.usd_per_1k[1]) / 1000.0

    def _score_logprobs(self, prompt: str) -> list[float]:
        return self.engine.choice_logprobs(judging.build_messages(prompt, prefill=True),
                                           judging.score_options(self.scale))

    def _choose_scores(self, pending: dict[int, dict], out: dict[int, dict]) -> None:
        """score_by=choice: the overall score is the most probable "[[n]]" after the prompt. A row the
        engine cannot score (too long for the model) moves from `pending` to `out` as a reject."""
        for i, row in list(pending.items()):
            try:
                logprobs = self._score_logprobs(row["prompt"])
            except ValueError as err:
                out[i] = {**pending.pop(i), **rejected("engine_error", f"engine error: {err}")}
                continue
            if self.calibration is not None:  # the teacher's prior for a content-free record divided out
                logprobs = self.calibration(logprobs, row["scenario"], row["mode"])
            dist = judging.choice_distribution(logprobs, self.scale)
            row["_distribution"] = dist
            row["_score"] = max(dist, key=dist.get)

    def _answer_start(self, row: dict) -> str:
        """What the answer already says before the engine continues it."""
        if "_score" in row:
            return f"{judging.SCORE_PREFILL}{row['_score']}]]"
        return judging.SCORE_PREFILL if self.prefill else ""

    def _messages(self, row: dict) -> list[dict]:
        start = self._answer_start(row)
        messages = judging.build_messages(row["prompt"])
        return messages + [{"role": "assistant", "content": start}] if start else messages


class PairLabeler(Labeler):
    """Pairwise: each pair judged in both orders (`judging.swap_pair`), combined by
    `judging.combine_pairwise`, so a verdict that flips with the order is a tie.

    An input row is one pair (`id`, `instruction`, `scenario`, `reference`, `response_a`,
    `response_b`); its output row is labelled when both orders gave a parsable verdict, else a reject
    with the reason and both raw answers. Verdicts are read from the text, which opens with "[[" when
    `prefill` is on (the verdict is then the first token generated), or chosen by log-probability
    without a rationale.
    """

    def process(self, rows: list[dict]) -> list[dict]:
        out: dict[int, dict] = {}
        pending: dict[tuple[int, int], str] = {}  # (row, order: 0 as given, 1 swapped) -> prompt
        for i, row in enumerate(rows):
            base = {**row, "id": stable_id(row["id"], "label", "pairwise"), "response_id": row["id"],
                    "mode": "pairwise", self.judge_column: self.teacher, "prompt_tokens": 0, "completion_tokens": 0}
            try:
                request = judging.request_from_row(row, self.scenarios_dir, mode="pairwise", scale=self.scale,
                                                   criteria=self.criteria)
                both = [judging.render_prompt(r, self.scenarios_dir) for r in (request, judging.swap_pair(request))]
            except (ValueError, KeyError) as err:
                out[i] = {**base, **rejected("bad_record", f"bad record: {err}")}
                continue
            out[i] = {**base, "prompt": both[0], REJECT: None}
            pending.update({(i, 0): both[0], (i, 1): both[1]})
        texts, verdicts, errors, attempts = {}, {}, {}, {}
        if not self.rationale:  # each order's verdict chosen by log-probability: the whole answer
            options = judging.choice_options("pairwise")
            for key, prompt in pending.items():
                attempts[key] = 1
                try:
                    lp = self.engine.choice_logprobs(judging.build_messages(prompt, prefill=True), options)
                except ValueError as err:  # too long for the model: this pair's failure
                    texts[key], errors[key] = "", rejected("engine_error", f"engine error: {err}")
                    continue
                texts[key], parsed, _ = judging.evaluation_from_choices(lp, "pairwise")
                verdicts[key] = parsed.verdict
            pending = {}
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            sampling = self._sampling("pairwise", attempt)
            keys = list(pending)
            asked = [judging.build_messages(pending[k], prefill=self.prefill) for k in keys]
            for key, done in zip(keys, self.engine.generate(asked, sampling)):
                row = out[key[0]]
                row["prompt_tokens"] += done.prompt_tokens
                row["completion_tokens"] += done.completion_tokens
                texts[key], attempts[key] = judging.full_text(done.text, self.prefill), attempt
                parsed = judging.parse_evaluation(texts[key], "pairwise")
                if done.error or not parsed.ok:
                    errors[key] = _failure(done, parsed)
                    continue
                errors.pop(key, None)
                verdicts[key] = parsed.verdict
                del pending[key]
        for i, row in out.items():
            if (i, 0) not in texts:  # a bad record: nothing was asked
                continue
            row["attempts"] = max(attempts[(i, 0)], attempts[(i, 1)])
            row["cost_usd"] = self._cost(row["prompt_tokens"], row["completion_tokens"])
            row["evaluation"], row["evaluation_swapped"] = texts[(i, 0)], texts[(i, 1)]
            failed = [(order, errors[(i, k)]) for k, order in ((0, "as given"), (1, "swapped")) if (i, k) in errors]
            if failed:
                codes = {failure[REJECT_CODE] for _, failure in failed}
                row.update(rejected("unparsable" if "unparsable" in codes else "engine_error",
                                    "; ".join(f"{order}: {failure[REJECT]}" for order, failure in failed)))
            else:
                row["verdict"], row["verdict_consistent"] = judging.combine_pairwise(verdicts[(i, 0)], verdicts[(i, 1)])
        return [out[i] for i in range(len(rows))]


# doc_id: the instruction's source document, which curation's split keeps on one side.
PAIR_SCHEMA = pa.schema([("id", pa.string()), ("instruction_id", pa.string()), ("doc_id", pa.string()),
                         ("instruction", pa.string()), ("scenario", pa.string()), ("reference", pa.string()),
                         ("response_a", pa.string()), ("response_b", pa.string()), ("responder", pa.string()),
                         (REJECT, pa.string())])


def make_pairs(group: pa.Table, max_per_instruction: int) -> pa.Table:
    """The responses to one instruction -> pairs of consecutive ones (ordered by responder, then id)."""
    rows = sorted(group.to_pylist(), key=lambda r: (str(r.get("responder") or ""), r["id"]))
    pairs = [{"id": stable_id(a["id"], b["id"], "pair"), "instruction_id": a["instruction_id"],
              "doc_id": a.get("doc_id"), "instruction": a["instruction"], "scenario": a["scenario"],
              "reference": a.get("reference"), "response_a": a["response"], "response_b": b["response"],
              "responder": f"{a.get('responder')} vs {b.get('responder')}", REJECT: None}
             for a, b in list(zip(rows, rows[1:]))[:max(0, max_per_instruction)]]
    return pa.Table.from_pylist(pairs, schema=PAIR_SCHEMA)


def _failure(done, parsed) -> dict:
    """The reject columns of an answer that failed: the engine's error, or an evaluation that did not parse."""
    if done.error:
        return rejected("engine_error", f"engine error: {done.error}")
    return rejected("unparsable", f"unparsable evaluation: {parsed.error}")


def replace_sampling(sampling, temperature: float, attempt: int):
    """The retry's sampling: sampled rather than greedy, with a new seed per attempt."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_object(sampling) if OmegaConf.is_config(sampling) else sampling
    return replace(plain, temperature=temperature, seed=plain.seed + attempt)


def label_stats(table: pa.Table, rejected: bool) -> dict:
    """Per part: tokens and cost (rejects too: their attempts were paid for), and over accepted rows
    each responder's pointwise score histogram and how many pairwise verdicts held in both orders."""
    stats = {key: pc.sum(table[key]).as_py() or 0 for key in ("prompt_tokens", "completion_tokens", "cost_usd")}
    if rejected:
        return stats
    pairwise = pc.fill_null(pc.equal(table["mode"], "pairwise"), False)
    pointwise = table.filter(pc.and_(pc.invert(pairwise), pc.is_valid(table["score"])))
    responders = pointwise["responder"].to_pylist() if "responder" in table.column_names else [None] * pointwise.num_rows
    histogram: dict = {}
    for (responder, score), n in Counter(zip(responders, pointwise["score"].to_pylist())).items():
        histogram.setdefault(str(responder), {})[str(round(score))] = n
    pairs = table.filter(pairwise)
    return {**stats, "score_histogram_by_responder": histogram,
            "pairwise_consistent": pc.sum(pc.fill_null(pairs["verdict_consistent"], False)).as_py() or 0}


def run(ctx: StageContext) -> StageResult:
    cfg, c = ctx.cfg, ctx.cfg.label
    source = ctx.input("respond")
    schema = output_schema("label", source.schema())
    # Every request goes through the run's request cache: a block run again pays for nothing twice.
    engine = with_cache(c.engine, cache_folder(cfg.cache, cfg.run_dir))
    common = dict(engine_cfg=engine, sampling=c.sampling, calibrate=c.calibrate,
                  max_attempts=c.max_attempts, retry_temperature=c.retry_temperature, scenarios_dir=cfg.scenarios_dir,
                  rationale=c.rationale, rationale_tokens=c.rationale_tokens)
    rows_in, extra = source.num_rows(), {}  # counted once from the footers: it sizes the plan too
    # Without a rationale (and pointwise with score_by=choice) the score is chosen by log-probability.
    pointwise = Step(name="label", processor=Labeler, pool=c.pool, stats=label_stats,
                     engine=StepEngine(c.engine, "label.engine", scores=not c.rationale or c.score_by == "choice"),
                     args={**common, "score_by": c.score_by, "prefill": c.prefill_score})
    run_rows(source.dataset(), pointwise, ctx.store, schema, resume=ctx.resume, total=rows_in,
             retry_rejects=c.retry_rejects)
    if c.pairwise:
        # Row accounting: each pair is one unit of work beside the responses, so rows in = responses +
        # pairs, and each pair ends as one row, labelled or rejected.
        pairs = _pairs(ctx, source, c.max_pairs_per_instruction, rows_in)
        n_pairs = pairs.num_rows()
        if n_pairs:
            pairwise = Step(name="label.pairwise", processor=PairLabeler, pool=c.pool,
                            engine=StepEngine(c.engine, "label.engine", scores=not c.rationale),
                            stats=label_stats, args={**common, "score_by": "text", "prefill": c.prefill_score})
            run_rows(pairs.dataset(), pairwise, ctx.store, schema, resume=ctx.resume, total=n_pairs,
                     retry_rejects=c.retry_rejects)
        rows_in += n_pairs
        extra = {"pairwise_pairs": n_pairs}
    written = ctx.store.tally().stats
    if c.pairwise:
        extra["pairwise_consistent"] = written.get("pairwise_consistent", 0)
    histogram = written.get("score_histogram_by_responder", {})
    return StageResult(rows_in=rows_in, extra={
        **extra,
        "engine": engine_label(c.engine),
        # The spread the responders were chosen for: each responder's pointwise score histogram.
        "score_histogram_by_responder": {r: dict(sorted(h.items(), key=lambda kv: int(kv[0])))
                                         for r, h in sorted(histogram.items())},
        "templates": {"evaluation": prompts.template_digest("evaluation")},
        "prompt_tokens": written.get("prompt_tokens", 0),
        "completion_tokens": written.get("completion_tokens", 0),
        "cost_usd": round(written.get("cost_usd", 0.0), 6),
    })


def _pairs(ctx: StageContext, source: StageStore, max_per_instruction: int, responses: int) -> StageStore:
    """The pairs to judge, grouped from the responses by instruction and written under `_work/` once
    (a resumed run reuses them), as a finished store whose rows the pairwise plan reads."""
    # One write of every pair: an interrupted one is started afresh (resumable=False).
    with ctx.store.checkpoint("pairs", {"pairs": max_per_instruction}, ctx.resume, resumable=False) as pairs:
        if not pairs.done:
            columns = ["id", "instruction_id", "instruction", "scenario", "reference", "response", "responder"]
            columns += ["doc_id"] if "doc_id" in source.schema().names else []
            grouped = map_groups(source.dataset(columns=columns), "instruction_id", make_pairs, rows=responses,
                                 max_per_instruction=max_per_instruction)
            write(grouped, pairs.store, PAIR_SCHEMA)
    return pairs.store
