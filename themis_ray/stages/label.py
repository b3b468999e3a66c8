"""Teacher labeling: each response judged through its scenario's five-part evaluation prompt.

A closed-ended scenario with a reference answer is graded against the reference; the rest are graded
on their own. An answer without a parsable overall score is asked again (sampled) up to
`max_attempts` times, then kept as a reject with the raw text.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pyarrow as pa

from themis_ray import judging, prompts
from themis_ray.engines import build_engine
from themis_ray.scenarios import get_scenario
from themis_ray.schema import REJECT, stable_id
from themis_ray.stages import RowProcessor, engine_label, map_rows
from themis_ray.store import PARTIAL, StageResult


def judge_mode(row: dict, scenarios_dir=None) -> str:
    helps = get_scenario(row["scenario"], scenarios_dir).reference_helps
    return "reference" if row.get("reference") and helps else "single"


class Labeler(RowProcessor):
    stage = "label"
    resume_key = ("id", "response_id")

    def __init__(self, output_schema, engine_cfg, sampling, score_by, calibrate, prefill, max_attempts,
                 retry_temperature, scenarios_dir):
        super().__init__(output_schema)
        self.engine = build_engine(engine_cfg)
        self.teacher = engine_label(engine_cfg)
        self.sampling, self.score_by, self.prefill = sampling, score_by, prefill
        self.calibrate, self._priors = calibrate, {}
        self.max_attempts, self.retry_temperature = max_attempts, retry_temperature
        self.scenarios_dir = scenarios_dir

    def process(self, rows: list[dict]) -> list[dict]:
        out: dict[int, dict] = {}
        pending: dict[int, dict] = {}
        for i, row in enumerate(rows):
            mode = judge_mode(row, self.scenarios_dir)
            request = judging.JudgeRequest(instruction=row["instruction"], response=row["response"],
                                           reference=row.get("reference"), scenario=row["scenario"], mode=mode)
            base = {**row, "id": stable_id(row["id"], "label", mode), "response_id": row["id"], "mode": mode,
                    "teacher": self.teacher}
            try:
                base["prompt"] = judging.render_prompt(request, self.scenarios_dir)
            except (ValueError, KeyError) as err:
                out[i] = {**base, REJECT: f"bad record: {err}"}
                continue
            pending[i] = base
        if self.score_by == "choice":
            self._choose_scores(pending)
        for attempt in range(1, self.max_attempts + 1):
            if not pending:
                break
            sampling = self.sampling if attempt == 1 else replace_sampling(self.sampling, self.retry_temperature, attempt)
            order = list(pending)
            messages = [self._messages(pending[i]) for i in order]
            for i, done in zip(order, self.engine.generate(messages, sampling)):
                row = pending[i]
                row["attempts"] = attempt
                row["prompt_tokens"] = (row.get("prompt_tokens") or 0) + done.prompt_tokens
                row["completion_tokens"] = (row.get("completion_tokens") or 0) + done.completion_tokens
                text = self._answer_start(row) + done.text
                parsed = judging.parse_evaluation(text, row["mode"] if row["mode"] == "pairwise" else "single")
                if done.error or not parsed.ok:
                    row["evaluation"] = text  # kept as the raw answer if this was the last attempt
                    row[REJECT] = f"engine error: {done.error}" if done.error else f"unparsable evaluation: {parsed.error}"
                    continue
                dist = row.pop("_distribution", None) or judging.score_distribution(
                    done.tokens, done.top_logprobs, prefill=self.prefill)
                out[i] = {**row, "evaluation": text, "score": parsed.score,
                          "criterion_scores": parsed.criterion_scores,
                          "score_distribution": list(dist.values()) if dist else None,
                          "expected_score": judging.expected_score(dist), REJECT: None}
                del pending[i]
        for row in pending.values():  # what is still pending failed every attempt: keep its last reason
            row.pop("_distribution", None)
        out.update(pending)
        return [out[i] for i in range(len(rows))]

    def _score_logprobs(self, prompt: str) -> list[float]:
        return self.engine.choice_logprobs(judging.build_messages(prompt, prefill=True), judging.score_options())

    def _prior(self, row: dict) -> list[float]:
        """The teacher's score log-probabilities for a content-free record like `row` (cached)."""
        key = (row["scenario"], row["mode"])
        if key not in self._priors:
            blank = judging.JudgeRequest(instruction="N/A", response="N/A", scenario=row["scenario"], mode=row["mode"],
                                         reference="N/A" if row["mode"] == "reference" else None)
            self._priors[key] = self._score_logprobs(judging.render_prompt(blank, self.scenarios_dir))
        return self._priors[key]

    def _choose_scores(self, pending: dict[int, dict]) -> None:
        """score_by=choice: the overall score is the most probable "[[n]]" after the prompt."""
        for row in pending.values():
            logprobs = self._score_logprobs(row["prompt"])
            if self.calibrate:
                logprobs = [lp - prior for lp, prior in zip(logprobs, self._prior(row))]
            dist = judging.choice_distribution(logprobs)
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


def replace_sampling(sampling, temperature: float, attempt: int):
    """The retry's sampling: sampled rather than greedy, with a new seed per attempt."""
    from omegaconf import OmegaConf

    plain = OmegaConf.to_object(sampling) if OmegaConf.is_config(sampling) else sampling
    return replace(plain, temperature=temperature, seed=plain.seed + attempt)


def run(cfg, inputs: dict, staging) -> StageResult:
    source: pa.Table = inputs["respond"]
    c = cfg.label
    if c.score_by not in ("text", "choice"):
        raise ValueError(f"label.score_by must be 'text' or 'choice', got {c.score_by!r}")
    table = map_rows(source, Labeler, c.pool, checkpoint=Path(staging) / PARTIAL, engine_cfg=c.engine, sampling=c.sampling, score_by=c.score_by,
                     calibrate=c.calibrate, prefill=c.prefill_score,
                     max_attempts=c.max_attempts, retry_temperature=c.retry_temperature,
                     scenarios_dir=cfg.scenarios_dir)
    return StageResult(table, rows_in=source.num_rows, extra={
        "engine": engine_label(c.engine),
        "templates": {"evaluation": prompts.template_digest("evaluation")},
        "prompt_tokens": sum(v or 0 for v in table["prompt_tokens"].to_pylist()),
        "completion_tokens": sum(v or 0 for v in table["completion_tokens"].to_pylist()),
    })
