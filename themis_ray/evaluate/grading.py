"""A judge grades a benchmark's records on a Ray Data actor pool, with the prompt each record carries.

Pointwise records get `predicted_score` (None when the answer had no parsable score in the scale),
the score distribution at the `[[n]]` position and its expected value where the engine returned
log-probabilities. Pairwise records are judged in both orders (`prompt`, then `prompt_ba` with the
responses swapped): `verdict` is the order-independent verdict of `judging.combine_pairwise` (a
verdict that flips with the order is a tie), None when either order gave no verdict; `consistent`
says whether both orders agreed. A judge that fails is measured, not dropped: its row stays, with
`judge_error` saying why and no prediction, and counts against the parse rate.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from themis_ray import judging
from themis_ray.engines import Completion, build_engine
from themis_ray.executor import RowProcessor, Step, StepEngine, run_rows
from themis_ray.scenarios import load_scenarios
from themis_ray.schema import REJECT

POINTWISE_COLUMNS = [
    ("judge", pa.string()),
    ("judge_output", pa.string()),  # the judge's whole answer (the order A, B for pairwise)
    ("predicted_score", pa.float64()),
    ("predicted_expected", pa.float64()),  # probability-weighted score, where log-probabilities exist
    ("predicted_distribution", pa.list_(pa.float64())),  # P(score = low..high)
    ("judge_error", pa.string()),  # engine error or why the answer did not parse
]
PAIRWISE_COLUMNS = [
    ("judge_output_ba", pa.string()),
    ("verdict_ab", pa.string()),  # A, B or C with the responses in the given order
    ("verdict_ba", pa.string()),  # ... with them swapped, as the judge wrote it (not unswapped)
    ("verdict", pa.string()),  # combined, in the given order
    ("consistent", pa.bool_()),
]


def graded_schema(input_schema: pa.Schema, pairwise: bool) -> pa.Schema:
    fields = [f for f in input_schema if f.name != REJECT]
    names = {f.name for f in fields}
    added = POINTWISE_COLUMNS + (PAIRWISE_COLUMNS if pairwise else [])
    fields += [pa.field(n, t) for n, t in added if n not in names]
    return pa.schema(fields + [pa.field(REJECT, pa.string())])


class JudgeGrader(RowProcessor):
    stage = "evaluate"
    resume_key = ("id", "id")  # within one benchmark and judge (run_rows narrows the written rows to them)

    def __init__(self, output_schema, judge: str, engine_cfg, sampling, prefill: bool, scale=(1, 5),
                 rationale: bool = True, rationale_tokens=None, calibrate: bool = False, scenarios_dir=None):
        super().__init__(output_schema)
        self.judge = judge
        self.engine = build_engine(engine_cfg)
        self.sampling, self.prefill = sampling, prefill
        self.rationale, self.rationale_tokens = rationale, rationale_tokens
        self.scale = judging.RatingScale(int(scale[0]), int(scale[1]))
        # Without a rationale, the choice may be calibrated: the judge's prior on a content-free record
        # of the row's scenario and mode divided out (rows without a known scenario are left as they are).
        self.calibration = judging.Calibration(self._choice_logprobs, self.scale, scenarios_dir=scenarios_dir) \
            if calibrate and not rationale else None
        self.scenarios = set(load_scenarios(scenarios_dir)) if self.calibration is not None else set()

    def process(self, rows: list[dict]) -> list[dict]:
        asks: dict[str, list] = {"single": [], "pairwise": []}  # mode -> [((row index, order), prompt)]
        for i, row in enumerate(rows):
            mode = "pairwise" if row.get("mode") == "pairwise" else "single"
            asks[mode].append(((i, "ab"), row["prompt"]))
            if mode == "pairwise":
                asks[mode].append(((i, "ba"), row["prompt_ba"]))
        answers: dict[tuple[int, str], object] = {}
        for mode, items in asks.items():
            if items:
                kinds = [(rows[i].get("scenario"), rows[i].get("mode") or "single") for (i, _), _ in items]
                answers.update(zip([key for key, _ in items], self._answer([p for _, p in items], mode, kinds)))
        out = []
        for i, row in enumerate(rows):
            # Every declared column is present: a failed answer has explicit nulls, not missing keys.
            graded = {**dict.fromkeys(self.schema.names), **row, "judge": self.judge, REJECT: None}
            if row.get("mode") == "pairwise":
                graded.update(self._pairwise(answers[(i, "ab")], answers[(i, "ba")]))
            else:
                graded.update(self._pointwise(answers[(i, "ab")]))
            out.append(graded)
        return out

    def _answer(self, prompts: list[str], mode: str, kinds: list) -> list[tuple[Completion, Optional[dict]]]:
        """The judge's answers with the score distribution at the score (pointwise): generated, stopped
        once the verdict is out and the rationale has its length; or, without a rationale, "[[x]]"
        chosen by log-probability in one forward pass (calibrated when asked). `kinds`: each prompt's
        (scenario, mode)."""
        if self.rationale:
            sampling = judging.stop_at_verdict(self.sampling, mode, self.rationale_tokens)
            done = self.engine.generate([judging.build_messages(p, self.prefill) for p in prompts], sampling)
            return [(d, None if mode == "pairwise" else judging.score_distribution(
                d.tokens, d.top_logprobs, self.scale, prefill=self.prefill)) for d in done]
        answers = []
        for prompt, (scenario, row_mode) in zip(prompts, kinds):
            try:
                lp = self._choice_logprobs(prompt, mode)
            except ValueError as err:  # too long for the model: this record's failure
                answers.append((Completion(error=str(err)), None))
                continue
            if self.calibration is not None and scenario in self.scenarios:
                lp = self.calibration(lp, scenario, row_mode)
            text, _, dist = judging.evaluation_from_choices(lp, mode, self.scale)
            answer = text[len(judging.SCORE_PREFILL):] if self.prefill else text  # _text adds the prefill back
            answers.append((Completion(text=answer), None if mode == "pairwise" else dist))
        return answers

    def _choice_logprobs(self, prompt: str, mode: str) -> list[float]:
        """Each option's log-probability after the prompt and the "[[" prefill (pairwise: A, B, C)."""
        return self.engine.choice_logprobs(judging.build_messages(prompt, prefill=True),
                                           judging.choice_options(mode, self.scale))

    def _text(self, done) -> str | None:
        return None if done.error else judging.full_text(done.text, self.prefill)

    def _pointwise(self, answer) -> dict:
        done, dist = answer
        text = self._text(done)
        if text is None:
            return {"judge_error": f"engine error: {done.error}"}
        parsed = judging.parse_evaluation(text, "single", self.scale)
        return {"judge_output": text, "predicted_score": parsed.score, "judge_error": parsed.error,
                "predicted_expected": judging.expected_score(dist),
                "predicted_distribution": list(dist.values()) if dist else None}

    def _pairwise(self, answer_ab, answer_ba) -> dict:
        (done_ab, _), (done_ba, _) = answer_ab, answer_ba
        texts = [self._text(done_ab), self._text(done_ba)]
        verdicts, errors = [], []
        for order, done, text in (("A,B", done_ab, texts[0]), ("B,A", done_ba, texts[1])):
            if text is None:
                verdicts.append(None)
                errors.append(f"order {order}: engine error: {done.error}")
                continue
            parsed = judging.parse_evaluation(text, "pairwise")
            verdicts.append(parsed.verdict)
            if parsed.error:
                errors.append(f"order {order}: {parsed.error}")
        verdict, consistent = judging.combine_pairwise(*verdicts)
        if None in verdicts:
            verdict = None  # unparsed: counts against the parse rate, not as a tie
        return {"judge_output": texts[0], "judge_output_ba": texts[1], "verdict_ab": verdicts[0],
                "verdict_ba": verdicts[1], "verdict": verdict, "consistent": consistent,
                "judge_error": "; ".join(errors) or None}


def graded_stats(table: pa.Table, rejected: bool) -> dict:
    """Per part: graded rows per benchmark and judge, or rejected rows per benchmark."""
    if rejected:
        counts: dict = {}
        for bench in table["benchmark"].to_pylist():
            counts[str(bench)] = counts.get(str(bench), 0) + 1
        return {"rejected": counts}
    graded: dict = {}
    for bench, judge in zip(table["benchmark"].to_pylist(), table["judge"].to_pylist()):
        graded.setdefault(str(bench), {})
        graded[str(bench)][judge] = graded[str(bench)].get(judge, 0) + 1
    return {"graded": graded}


def graded_partition(benchmark, judge) -> dict:
    """The partition of one benchmark's records graded by one judge."""
    return {"benchmark": benchmark.name, "judge": judge.name}


def grade(benchmark, judge, evaluate_cfg, store, resume: bool = False, scenarios_dir=None) -> None:
    """`judge` (a judges.Judge) grades every record of `benchmark` on `evaluate.pool`; the workers write
    the graded rows into `store` as parts of their own partition (`graded_partition`)."""
    schema = graded_schema(benchmark.schema, benchmark.pairwise)
    step = Step(name=f"evaluate[{benchmark.name}, {judge.name}]", processor=JudgeGrader, pool=evaluate_cfg.pool,
                args={"judge": judge.name, "engine_cfg": judge.engine, "sampling": evaluate_cfg.sampling,
                      "prefill": judge.prefill, "scale": tuple(benchmark.scale),
                      "rationale": evaluate_cfg.rationale, "rationale_tokens": evaluate_cfg.rationale_tokens,
                      "calibrate": evaluate_cfg.calibrate, "scenarios_dir": scenarios_dir},
                engine=StepEngine(judge.engine, "evaluate.engine", scores=not evaluate_cfg.rationale),
                partition=graded_partition(benchmark, judge), stats=graded_stats)
    run_rows(benchmark.records, step, store, schema, resume=resume, total=benchmark.num_records)
